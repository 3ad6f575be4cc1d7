"""The heart of prefixtune: attention injection, the prefix encoder, folded artifacts, model
loading and runtime choices. Depends on nothing in prefixtune but the config."""
