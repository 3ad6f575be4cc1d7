"""prefixtune.core."""
