"""prefixtune.serving."""
