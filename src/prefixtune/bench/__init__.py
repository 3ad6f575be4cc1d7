"""Measuring prefixtune against PEFT: the plan of configs, isolated worker processes, FLOPs,
one worker module per suite, and the report (see docs/PERFORMANCE.md)."""
