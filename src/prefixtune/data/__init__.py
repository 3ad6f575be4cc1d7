"""prefixtune.data.encoding."""
