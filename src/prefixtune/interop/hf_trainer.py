"""PrefixTuningModel: a prefix on a frozen model as one torch module that `transformers.Trainer`,
TRL's `SFTTrainer` and `accelerate` train like any model (docs/INTEGRATIONS.md).

It wraps prefixtune's own pieces: the method is `build_method("prefix", ...)` (so the prefix
starts where `prefixtune train` starts it for the same seed), the loss is the objective of
`methods/objective.py` (target-token cross-entropy, the LM head only on target positions), and
`save_pretrained` writes the folded artifact `prefixtune train` writes (`core/artifact.py`),
which `prefixtune serve --prefixes DIR` and `prefixtune generate` load.

What a trainer sees: `state_dict()` holds the prefix encoder only (so checkpoints are small and
`resume_from_checkpoint` restores it), `train()` never switches the frozen base out of eval mode
(its dropout stays off, as in prefixtune's loop), and `accepts_loss_kwargs = False`: the loss
is each micro-batch's mean over its target tokens and Trainer averages micro-batches over
gradient accumulation, as prefixtune's trainer does.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from prefixtune.config import ConfigError, GenerateConfig, PrefixConfig
from prefixtune.core.atomic_files import atomic_write
from prefixtune.core.models import is_encoder_decoder, lm_logits, load_model
from prefixtune.core.runtime import enable_gradient_checkpointing
from prefixtune.generation.engine import generate as engine_generate
from prefixtune.methods.objective import hidden_states, target_loss
from prefixtune.methods.prefix_method import PrefixMethod
from prefixtune.methods.registry import build_method

TRAINER_STATE = "model.safetensors"  # what Trainer's resume_from_checkpoint reads back
ENCODER_KEY = "prefix_encoder."
# what trainers pass along and the objective has no use for (num_items_in_batch: see the
# module docstring; a KV cache is never used in training)
IGNORED = ("use_cache", "return_dict", "num_items_in_batch", "output_attentions",
           "output_hidden_states", "output_router_logits")  # fmt: skip


def _packed(position_ids: Tensor, attention_mask: Tensor | None) -> bool:
    """True when a row's positions restart between two real tokens (several sequences packed
    into one row); padding may restart them."""
    restarts = position_ids[..., 1:] <= position_ids[..., :-1]
    if attention_mask is not None:
        restarts &= attention_mask[..., 1:].bool() & attention_mask[..., :-1].bool()
    return bool(restarts.any())


def model_inputs(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                 token_type_ids: Tensor | None, extra: dict[str, Any]) -> dict[str, Tensor]:  # fmt: skip
    """The batch prefixtune's objective takes, from what a trainer passes; refuses what it
    cannot honour with the setting to change."""
    known = (*IGNORED, "decoder_attention_mask")
    unknown = sorted(k for k, v in extra.items() if k not in known and v is not None)
    if unknown:
        raise TypeError(
            f"PrefixTuningModel.forward got unsupported inputs {unknown}; padding-free or packed "
            "batches (cu_seq_lens_*, max_length_*) need SFTConfig(padding_free=False, "
            "packing=False), and other extra columns need remove_unused_columns=True"
        )
    if token_type_ids is not None and bool(token_type_ids.ne(0).any()):
        raise ValueError("token_type_ids other than 0 are not supported by PrefixTuningModel")
    if position_ids is not None and _packed(position_ids, attention_mask):
        raise ValueError(
            "packed sequences (position_ids that restart within a row) are not supported: "
            "set SFTConfig(padding_free=False, packing=False)"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # position ids are prefixtune's own: real tokens counted from the attention mask, after
    # the prefix (a collator's plain 0..T-1 would overlap the prefix positions)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if extra.get("decoder_attention_mask") is not None:
        batch["decoder_attention_mask"] = extra["decoder_attention_mask"]
    return batch


class PrefixedBackbone:
    """`model.base_model` of a PrefixTuningModel: the frozen backbone with the prefix in
    front. TRL's fused LM head (SFTTrainer) runs it and then `get_output_embeddings()`."""

    def __init__(self, owner: PrefixTuningModel) -> None:
        self.owner = owner

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                 labels: Tensor | None = None, **extra: Any) -> BaseModelOutput:  # fmt: skip
        batch = model_inputs(input_ids, attention_mask, position_ids, token_type_ids, extra)
        return BaseModelOutput(last_hidden_state=self.owner.hidden(batch, labels))


class PrefixTuningModel(PreTrainedModel):
    """A frozen transformers model with a trainable prefix (prefixtune's PrefixEncoder).

    `forward(input_ids, attention_mask, labels)` returns a CausalLMOutput whose `loss` is
    prefixtune's objective (labels aligned with input_ids, -100 off target: the usual causal-LM
    convention) and whose `logits` are the LM head at every position (`return_logits=False`
    skips them: a trainer needs only the loss). Only `prefix_encoder` has trainable parameters.
    """

    accepts_loss_kwargs = False  # per-micro-batch mean; Trainer averages over accumulation
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_save = None
    base_model_prefix = ""

    def __init__(self, model: PreTrainedModel, prefix_config: PrefixConfig | None = None, *,
                 tokenizer: Any = None, seed: int = 0, return_logits: bool = True) -> None:  # fmt: skip
        """Freezes `model` and routes its attention through prefixtune (verified; raises
        UnsupportedModelError for a model it cannot serve). `tokenizer` is needed for the
        real-word init (PrefixConfig(init="words")) and gives the saved chat template."""
        method = build_method("prefix", model, tokenizer, prefix_config or PrefixConfig(),
                              seed=seed)  # fmt: skip
        super().__init__(model.config)
        assert isinstance(method, PrefixMethod)
        self.model = model
        self.prefix_encoder = method.encoder
        self.method = method  # not a module: the same encoder, prefixtune's save/bake
        self.tokenizer = tokenizer
        self.return_logits = return_logits
        self.generation_config = getattr(model, "generation_config", None)

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str, prefix_config: PrefixConfig | None = None,
                        *, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                        **options: Any) -> PrefixTuningModel:  # fmt: skip
        """Load a base model (hub id, local folder, or 'smollm2' / 'gemma3-270m', as
        prefixtune.core.models resolves them) with its tokenizer, and put a new prefix on it."""
        model, tokenizer = load_model(model_id_or_dir, dtype=dtype, device=device)
        return cls(model, prefix_config, tokenizer=tokenizer, seed=seed, **options)

    # ------------------------------------------------------------------ forward
    def hidden(self, batch: dict[str, Tensor], labels: Tensor | None = None) -> Tensor:
        """Last hidden states (B, T, d) of the base with this step's prefix."""
        if is_encoder_decoder(self.model):
            if labels is None:
                raise ValueError("an encoder-decoder PrefixTuningModel needs labels (the targets)")
            batch = {**batch, "labels": labels}
        return hidden_states(self.model, batch, self.method.prefix_kv())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, position_ids: Tensor | None = None,
                token_type_ids: Tensor | None = None, return_logits: bool | None = None,
                **extra: Any) -> CausalLMOutput:  # fmt: skip
        batch = model_inputs(input_ids, attention_mask, position_ids, token_type_ids, extra)
        hidden = self.hidden(batch, labels)  # (B, T, d)
        loss = None if labels is None else target_loss(self.model, hidden, labels)
        want = self.return_logits if return_logits is None else return_logits
        logits = lm_logits(self.model, hidden) if want or labels is None else None  # (B, T, V)
        return CausalLMOutput(loss=loss, logits=logits)

    @property
    def base_model(self) -> PrefixedBackbone:  # type: ignore[override]
        return PrefixedBackbone(self)

    # ------------------------------------------------------------------ what trainers call
    def train(self, mode: bool = True) -> PrefixTuningModel:
        """Only the prefix switches mode; the frozen base stays in eval (dropout off)."""
        self.training = mode
        self.prefix_encoder.train(mode)
        return self

    def state_dict(self, *args: Any, destination=None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Tensor]:  # fmt: skip
        """The trainable prefix encoder only (keys `prefix_encoder.*`)."""
        return self.prefix_encoder.state_dict(destination=destination, keep_vars=keep_vars,
                                              prefix=prefix + ENCODER_KEY)  # fmt: skip

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load `prefix_encoder.*` keys (what `state_dict` gives); other keys are unexpected."""
        mine = {k.removeprefix(ENCODER_KEY): v for k, v in state_dict.items()
                if k.startswith(ENCODER_KEY)}  # fmt: skip
        result = self.prefix_encoder.load_state_dict(mine, strict=strict, assign=assign)
        result.unexpected_keys.extend(k for k in state_dict if not k.startswith(ENCODER_KEY))
        if strict and result.unexpected_keys:
            raise RuntimeError(f"unexpected keys in state_dict: {result.unexpected_keys[:5]}")
        return result

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **_: Any) -> None:
        """prefixtune's checkpointing of the base (non-reentrant, dropout kept off)."""
        enable_gradient_checkpointing(self.model)

    activation_checkpointing_enable = gradient_checkpointing_enable

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def num_trainable(self) -> int:
        return self.method.num_trainable()

    # ------------------------------------------------------------------ save and generate
    def save_pretrained(self, save_directory: str | Path, state_dict: dict | None = None,
                        is_main_process: bool = True, dtype: str = "float32",
                        **_: Any) -> None:  # fmt: skip
        """Write the folded prefix artifact (prefix.safetensors + prefix.json, base model id,
        the tokenizer's chat template) and the encoder's state (model.safetensors, which
        Trainer's resume_from_checkpoint reads). Transformers' other options are ignored."""
        if not is_main_process:
            return
        directory = Path(save_directory)
        meta: dict[str, Any] = {"trained_with": "PrefixTuningModel"}
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, str) and template:
            meta["chat_template"] = template
        self.method.save_artifact(directory, dtype=dtype, **meta)
        state = {k: v.detach().cpu().contiguous()
                 for k, v in (state_dict or self.state_dict()).items()}  # fmt: skip
        atomic_write(directory / TRAINER_STATE,
                     lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))  # fmt: skip

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 generate_config: GenerateConfig | None = None,
                 **options: Any) -> list[list[int]]:  # fmt: skip
        """prefixtune's decoding (generation/engine.py) with this prefix: per row the new token
        ids (no prompt, EOS or padding). `options` set GenerateConfig fields (max_new_tokens,
        num_beams, do_sample, temperature, top_p, ...); decoder-only prompts are left-padded."""
        names = {f.name for f in fields(GenerateConfig)}
        unknown = sorted(set(options) - names - {"eos_token_id", "pad_token_id"})
        if unknown:
            raise ConfigError(f"generate() options {unknown} are not GenerateConfig fields "
                              f"(one of {sorted(names)})")  # fmt: skip
        config = replace(generate_config or GenerateConfig(),
                         **{k: v for k, v in options.items() if k in names})  # fmt: skip
        eos, pad = self._special_ids(options)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return engine_generate(self.model, input_ids, attention_mask, self.method.prefix_kv(),
                               config, eos_token_id=eos, pad_token_id=pad)  # fmt: skip

    def _special_ids(self, options: dict[str, Any]) -> tuple[int | list[int], int]:
        """(EOS ids, pad id): the caller's, else the tokenizer's, else the model config's."""
        sources = [options, self.tokenizer, self.generation_config, self.model.config]
        eos = next((v for s in sources if (v := _get(s, "eos_token_id")) is not None), None)
        if eos is None:
            raise ConfigError("generate() needs eos_token_id (no tokenizer or config gives one)")
        pad = next((v for s in sources if (v := _get(s, "pad_token_id")) is not None), None)
        return eos, pad if pad is not None else (eos if isinstance(eos, int) else eos[0])


def _get(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)
