"""Prefixes to and from other formats (PEFT adapters) and Hub-style model cards."""
