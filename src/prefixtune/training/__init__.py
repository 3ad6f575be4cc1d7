"""prefixtune.training."""
