"""File names and facts of PEFT's prefix-tuning adapter format, shared by conversion and cards."""

from __future__ import annotations

PEFT_CONFIG = "adapter_config.json"


PEFT_WEIGHTS = "adapter_model.safetensors"


PEFT_WEIGHTS_BIN = "adapter_model.bin"


PEFT_KEY = "prompt_embeddings"


DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


SEQ2SEQ_REFUSAL = (
    "PEFT cannot represent prefixtune's encoder-decoder prefixes: PEFT 0.21 gives the encoder "
    "and cross-attention no prefix, shares decoder prefixes between layers i and i + L/2, and "
    "shifts decoder positions by the prefix length (see prefixtune.interop.peft)"
)
