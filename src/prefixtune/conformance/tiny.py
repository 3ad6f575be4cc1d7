"""Tiny random models of any transformers model type, derived from its config class's defaults:
every size attribute the config has is shrunk (2 layers, hidden 64, 4 heads of 16, 2 key/value
heads where the family groups them, 1 where it shares one, 4 experts choosing 2, vocabulary 128),
per-layer type lists keep each distinct type once, and special token ids move inside the
vocabulary. Generic on purpose: no per-family table."""

from __future__ import annotations

import warnings

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

VOCAB = 128
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
LAYERS = 2
FFN = 64
EXPERTS = 4
MAX_PARAMETERS = 5_000_000  # a tiny config larger than this was not shrunk enough

EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# config attribute -> tiny value (set only where the attribute exists and holds an int)
SIZES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (LAYERS, ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers",
             "decoder_layers", "num_decoder_layers")),
    (HIDDEN, ("hidden_size", "n_embd", "d_model", "embedding_size", "attention_hidden_size",
              "emb_dim")),
    (HEADS, ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
            "decoder_attention_heads", "linear_num_value_heads", "linear_num_heads",
            "swa_num_attention_heads")),
    (HEAD_DIM, ("head_dim", "d_kv", "attention_head_dim", "kv_channels", "dim_head", "v_head_dim",
               "qk_head_dim", "index_head_dim", "linear_key_head_dim", "linear_value_head_dim",
               "linear_head_dim", "swa_head_dim", "kv_lora_rank", "mamba_d_head",
               "hidden_size_per_layer_input")),
    (FFN, ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
          "ffn_hidden_size", "dim_ff", "dff", "intermediate_size_mlp", "dense_intermediate_size")),
    (32, ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
         "shared_experts_intermediate_size", "expert_ffn_hidden_size", "q_lora_rank",
         "moe_layer_end_index")),
    (EXPERTS, EXPERT_COUNTS),
    (8, ("qk_rope_head_dim", "qk_nope_head_dim", "mamba_d_state", "state_size", "mamba_n_heads",
        "mamba_dt_rank", "time_step_rank", "rotary_dim")),
    (VOCAB, ("vocab_size", "decoder_vocab_size", "src_vocab_size", "tgt_vocab_size", "n_words",
             "pronunciation_vocab_size", "shape_vocab_size", "vocab_size_per_layer_input")),
    (1, ("n_group", "topk_group", "num_expert_group", "first_k_dense_replace", "n_shared_experts")),
)  # fmt: skip
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "linear_num_key_heads",
            "swa_num_key_value_heads", "index_n_heads")  # fmt: skip
TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "index_topk")
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types")
MULTIMODAL = (
    "vision",
    "audio",
    "speech",
    "image",
    "video",
    "patcher",
    "vq",
    "acoustic",
    "semantic",
)


def families() -> dict[str, str]:
    """Every text causal-LM and seq2seq model type of the installed transformers -> 'causal'
    or 'seq2seq' (a type in both counts as seq2seq)."""
    found = {name: "causal" for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    found.update({name: "seq2seq" for name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES})
    return dict(sorted(found.items()))


def multimodal_reason(config: PretrainedConfig) -> str | None:
    """Why a model type is not a text-only model (a multimodal wrapper), or None."""
    names = {name for part in _parts(config) for name in getattr(part, "sub_configs", None) or {}}
    subs = sorted(name for name in names if any(word in name for word in MULTIMODAL))
    if subs:
        return (
            f"multimodal wrapper (sub-configs {', '.join(subs)}): not a text-only model; its "
            "text model is a family of its own where transformers has one"
        )
    return None


def _shrink(config: PretrainedConfig) -> None:
    values = config.__dict__
    rope_head = values.get("head_dim") == values.get("qk_rope_head_dim") is not None  # MLA
    for size, names in SIZES:
        for name in names:
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                setattr(config, name, size)
            elif name == "n_inner" and name in values:
                setattr(config, name, FFN)
    if rope_head:
        config.head_dim = values["qk_rope_head_dim"]
    heads = HEADS
    for name in KV_HEADS:
        old = values.get(name)
        if isinstance(old, int):
            setattr(config, name, 1 if old == 1 else heads // 2)
    experts = any(isinstance(values.get(name), int) for name in EXPERT_COUNTS)
    for name in TOP_K:
        old = values.get(name)
        if isinstance(old, int) or (old is None and name in values and experts):
            setattr(config, name, min(old or 2, 2))
    for name in LAYER_LISTS:
        kinds = values.get(name)
        if isinstance(kinds, (list, tuple)) and kinds:
            distinct = list(dict.fromkeys(kinds))
            tiny = (distinct * 2)[: max(LAYERS, len(distinct))]
            setattr(config, name, tiny)
            for layers in SIZES[0][1]:
                if isinstance(values.get(layers), int):
                    setattr(config, layers, len(tiny))
    for name in ("attn_layer_period", "expert_layer_period"):
        if isinstance(values.get(name), int):
            setattr(config, name, 2)
            setattr(config, name.replace("period", "offset"), 1)
    for name, value in list(values.items()):
        if (
            name.endswith(("_token_id", "_token_index"))
            and isinstance(value, int)
            and value >= VOCAB
        ):
            setattr(config, name, VOCAB - 1 - len(name) % 8)
        elif name.endswith("_token_id") and isinstance(value, list):
            setattr(config, name, [v if v < VOCAB else 2 for v in value])
    if values.get("is_encoder_decoder") and values.get("decoder_start_token_id") is None:
        config.decoder_start_token_id = 0  # generation needs one (T5-style: the pad id)
    for name, default in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if values.get(name) is None or values.get(name) == VOCAB - 1 - len(name) % 8:
            setattr(config, name, default)


def tiny_config(model_type: str) -> PretrainedConfig:
    """The config class's defaults with every size shrunk (2 layers, hidden 64, 4 heads...).
    Text sub-configs (`text_config`, `encoder`, `decoder`...) are shrunk too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type)
    for part in _parts(config):
        _shrink(part)
    return config


def _parts(config: PretrainedConfig) -> list[PretrainedConfig]:
    """The config and its sub-configs, nested ones included."""
    found = [config]
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if isinstance(sub, PretrainedConfig):
            found += _parts(sub)
    return found


def build_tiny(model_type: str, kind: str = "causal", config: PretrainedConfig | None = None,
               seed: int = 0) -> PreTrainedModel:  # fmt: skip
    """A float32 random model of `model_type` from `tiny_config` (or `config`); kind 'causal' or
    'seq2seq' picks the auto class. Raises ValueError when the config is still not tiny
    (counted on the meta device, nothing allocated)."""
    config = config or tiny_config(model_type)
    if kind == "causal" and hasattr(config, "is_decoder"):
        config.is_decoder = True  # encoder families listed as causal LMs run as decoders
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    with torch.device("meta"):
        count = sum(p.numel() for p in auto.from_config(config).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"{count:,} parameters after shrinking (limit {MAX_PARAMETERS:,})")
    torch.manual_seed(seed)
    model = auto.from_config(config).float().eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    extra = {"decoder_input_ids": ids} if kind == "seq2seq" else {}
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
    except Exception as err:  # noqa: BLE001 - the family's own code failed on this config
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        message = f"the tiny model fails its own forward ({type(err).__name__}: {first})"
        raise ValueError(message) from err
    return model
