"""prefixtune: prefix-tuning (Li & Liang 2021) on frozen Hugging Face transformers models.

The public API; the packages below it are laid out in docs/ARCHITECTURE.md."""

from prefixtune import _quiet  # noqa: F401 (first: silences import-time noise)
from prefixtune._version import __version__
from prefixtune.config import PrefixConfig
from prefixtune.core.artifact import FoldedPrefix, load_prefix, save_prefix
from prefixtune.core.attention import PrefixKV, prefixed_forward
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.models import load_model
from prefixtune.core.prefix_encoder import PrefixEncoder, build_encoder
from prefixtune.core.verdict import UnsupportedModelError
from prefixtune.interop.hf_trainer import PrefixTuningModel

__all__ = [
    "__version__",
    "FoldedPrefix",
    "PrefixConfig",
    "PrefixEncoder",
    "PrefixKV",
    "PrefixTuningModel",
    "UnsupportedModelError",
    "build_encoder",
    "enable_prefixes",
    "load_model",
    "load_prefix",
    "prefixed_forward",
    "save_prefix",
]
