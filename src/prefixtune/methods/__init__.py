"""prefixtune.methods.registry."""
