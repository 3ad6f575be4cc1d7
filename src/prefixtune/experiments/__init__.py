"""prefixtune.experiments.grid."""
