"""prefixtune.interop.peft."""
