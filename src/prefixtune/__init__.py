"""prefixtune: prefix-tuning (Li & Liang 2021) on frozen Hugging Face transformers models."""

from .artifact import FoldedPrefix, load_prefix, save_prefix
from .attention import PrefixKV, prefixed_forward
from .config import PrefixConfig
from .models import load_model
from .prefix import PrefixEncoder, build_encoder

__version__ = "0.1.0"
__all__ = [
    "FoldedPrefix",
    "PrefixConfig",
    "PrefixEncoder",
    "PrefixKV",
    "build_encoder",
    "load_model",
    "load_prefix",
    "prefixed_forward",
    "save_prefix",
]
