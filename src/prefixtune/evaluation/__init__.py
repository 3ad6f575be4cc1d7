"""prefixtune.evaluation."""
