"""prefixtune.generation."""
