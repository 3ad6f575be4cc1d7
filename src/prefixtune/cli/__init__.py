"""prefixtune.cli.main."""
