"""prefixtune.bench.suites."""
