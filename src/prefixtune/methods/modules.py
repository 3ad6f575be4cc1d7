"""The model-side parts of the baselines (their Method classes live in baselines.py): the top
layers ft-top2 trains, bottleneck adapters, virtual input tokens (prompt tuning) and infix
placement.

Bottleneck adapters (Houlsby et al. 2019; Lin et al. 2020): down-projection -> ReLU ->
up-projection with a residual, ``y + up(relu(down(y)))``, on the output of every attention output
projection and every MLP output projection (two per layer; BART decoder layers get a third,
after cross-attention). The up-projection starts at zero, so fresh adapters leave the model as it
was. PEFT 0.21.2 has no bottleneck adapter of this kind (its methods are low-rank weight deltas,
scalings, or prompt-style methods such as LLaMA-Adapter), so this is a small module of our own.
The adapters run as forward hooks on the output-projection modules: the base model keeps its
structure and state-dict names, the adapters stay out of ``model.parameters()`` (the base count
is unchanged), and the hooks re-run when gradient checkpointing recomputes a layer.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from prefixtune.config import ConfigError, PrefixConfig
from prefixtune.core.artifact import ArtifactError
from prefixtune.core.attention import KVCapture, PrefixKV, position_ids_for
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.models import is_encoder_decoder
from prefixtune.core.prefix_encoder import word_ids
from prefixtune.data.encoding import IGNORE_INDEX

# ----------------------------------------------------------------------------- top layers

LAYER_STACKS = ("h", "layers", "layer", "blocks")


def layer_stack(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """(qualified name, modules) of the transformer layers (the decoder's for encoder-decoders)."""
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_STACKS]  # fmt: skip
    if is_encoder_decoder(model):
        stacks = [(name, m) for name, m in stacks if "decoder" in name]
    if len(stacks) != 1:
        raise ConfigError(
            f"ft-top2: cannot tell the layer stack of {type(model).__name__} "
            f"(module lists named {LAYER_STACKS}: {[name for name, _ in stacks]})"
        )
    return stacks[0]


def load_layers(model: PreTrainedModel, tensors: dict[str, Tensor]) -> None:
    """Copy saved layer weights (full qualified names) into `model`, all of them or none."""
    state = model.state_dict()
    unknown = [k for k in tensors if k not in state or state[k].shape != tensors[k].shape]
    if unknown:
        raise ArtifactError(f"saved layers do not fit this model: {unknown[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)


# ----------------------------------------------------------------------------- adapters

# Output projections by the last components of their qualified names (GPT-2, Llama family incl.
# SmolLM/Qwen/Mistral/Gemma, BART, Phi-style fc2).
ATTENTION_OUTPUTS = ("attn.c_proj", "self_attn.o_proj", "self_attn.out_proj",
                     "encoder_attn.out_proj")  # fmt: skip
MLP_OUTPUTS = ("mlp.c_proj", "mlp.down_proj", "fc2")


class Bottleneck(nn.Module):
    """y -> y + up(relu(down(y))), computed in the adapter's dtype; identity at initialisation."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: Tensor) -> Tensor:
        delta = self.up(self.down(y.to(self.down.weight.dtype)).relu())
        return y + delta.to(y.dtype)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _out_width(name: str, module: nn.Module) -> int:
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)  # Linear, Conv1D
    if not isinstance(width, int):
        raise ConfigError(f"adapter site {name}: cannot tell the output width of {module}")
    return width


def adapter_sites(model: PreTrainedModel) -> dict[str, int]:
    """Qualified names of the attention/MLP output projections -> their output widths."""
    sites = {
        name: _out_width(name, module)
        for name, module in model.named_modules()
        if _matches(name, ATTENTION_OUTPUTS + MLP_OUTPUTS)
    }
    attention = [n for n in sites if _matches(n, ATTENTION_OUTPUTS)]
    mlp = [n for n in sites if _matches(n, MLP_OUTPUTS)]
    if not attention or not mlp:
        raise ConfigError(
            f"adapters: {type(model).__name__} is not a supported architecture (found "
            f"{len(attention)} attention outputs named like {ATTENTION_OUTPUTS} and {len(mlp)} "
            f"MLP outputs named like {MLP_OUTPUTS}); add its module names to "
            "prefixtune.methods.modules.ATTENTION_OUTPUTS / MLP_OUTPUTS"
        )
    return sites


def adapter_parameters(widths: list[int], bottleneck: int) -> int:
    """Trainable numbers of adapters of size m on outputs of widths d_i: sum 2*d_i*m + m + d_i."""
    return sum(2 * d * bottleneck + bottleneck + d for d in widths)


def bottleneck_for(num_base: int, widths: list[int], share: float) -> int:
    """The bottleneck m (>= 1) whose adapters come closest to `share` * num_base parameters."""
    if not 0 < share < 1:
        raise ConfigError(f"adapter_share must be in (0, 1), got {share}")
    total = sum(widths)
    best = round((share * num_base - total) / (2 * total + len(widths)))
    return max(1, best)


def _key(name: str) -> str:
    return name.replace(".", "-")  # ModuleDict keys cannot hold dots


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Adapters


class Adapters(nn.Module):
    """One Bottleneck per site, attached to a model with forward hooks (`attach`/`detach`)."""

    def __init__(self, sites: dict[str, int], bottleneck: int) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.sites = dict(sites)
        self.blocks = nn.ModuleDict(
            {_key(name): Bottleneck(width, bottleneck) for name, width in sites.items()}
        )
        self._handles: list[RemovableHandle] = []
        self._model: weakref.ref | None = None

    def attach(self, model: PreTrainedModel) -> Adapters:
        """Hook every site of `model` (names as the adapters were made for). Adapters already on
        `model` are detached first, so a model never runs two sets."""
        self.detach()
        previous = _ATTACHED.get(model)
        if previous is not None:
            previous.detach()
        modules = dict(model.named_modules())
        missing = [name for name in self.sites if name not in modules]
        if missing:
            raise ConfigError(f"adapters do not fit this model: no modules {missing[:3]}")
        for name in self.sites:
            block = self.blocks[_key(name)]
            handle = modules[name].register_forward_hook(lambda _m, _a, out, b=block: b(out))
            self._handles.append(handle)
        _ATTACHED[model] = self
        self._model = weakref.ref(model)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model() if self._model is not None else None
        if model is not None and _ATTACHED.get(model) is self:
            del _ATTACHED[model]
        self._model = None


def build_adapters(model: PreTrainedModel, share: float) -> Adapters:
    """Adapters sized so their parameters are closest to `share` of the model's (not attached)."""
    sites = adapter_sites(model)
    num_base = sum(p.numel() for p in model.parameters())
    return Adapters(sites, bottleneck_for(num_base, list(sites.values()), share))


# ----------------------------------------------------------------------------- virtual tokens


class VirtualTokens(nn.Module):
    """n trainable input embeddings (n, d)."""

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(init.clone())


def initial_embeddings(model: PreTrainedModel, prefix: PrefixConfig, tokenizer) -> Tensor:
    """(n, d): real words' embeddings (init 'words'), zeros, or random with the embedding
    matrix's per-dimension mean/std (times the model's embedding scale, e.g. Gemma's)."""
    table = model.get_input_embeddings()
    if prefix.init == "words":
        if tokenizer is None:
            raise ConfigError("prefix init 'words' needs the model's tokenizer")
        ids = word_ids(tokenizer, prefix.init_text, prefix.length).to(table.weight.device)
        with torch.no_grad():
            return table(ids)[0].float()
    weight = table.weight.detach().float()
    if prefix.init == "zero":
        return torch.zeros(prefix.length, weight.shape[1], device=weight.device)
    scale = float(getattr(table, "embed_scale", 1.0))
    noise = torch.randn(prefix.length, weight.shape[1], device=weight.device)
    return (noise * weight.std(0) + weight.mean(0)) * scale


def prepend_virtual(
    model: PreTrainedModel, virtual: Tensor, batch: dict[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """Model inputs for [virtual; x] (inputs_embeds, mask, positions) and labels (-100 in front).

    Virtual tokens take positions 0..n-1, real tokens n.. (as a prefix of length n would).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, n = ids.shape[0], virtual.shape[0]
    real = model.get_input_embeddings()(ids)  # (B, T, d)
    embeds = torch.cat([virtual.to(real.dtype).expand(rows, -1, -1), real], 1)  # (B, n+T, d)
    front = torch.arange(n, device=ids.device).expand(rows, n)
    offset = torch.full((rows,), n, dtype=torch.long, device=ids.device)
    inputs = {
        "inputs_embeds": embeds,
        "attention_mask": torch.cat([mask.new_ones(rows, n), mask], 1),
        "position_ids": torch.cat([front, position_ids_for(mask, offset)], 1),  # (B, n+T)
    }
    labels = torch.cat([batch["labels"].new_full((rows, n), IGNORE_INDEX), batch["labels"]], 1)
    return inputs, labels


@torch.no_grad()
def virtual_prefix(model: PreTrainedModel, embeddings: Tensor) -> PrefixKV:
    """The frozen LM's keys/values of the virtual tokens (n, d), as a prefix (N = 1)."""
    enable_prefixes(model)
    capture = KVCapture()
    embeds = embeddings[None].to(model.device, model.dtype)  # (1, n, d)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=model.device)
    model.base_model(inputs_embeds=embeds, attention_mask=mask, prefix_kv=capture, use_cache=False)
    layers = sorted(capture.records.items(), key=lambda item: item[0].layer)
    kv = torch.stack([torch.stack([k[0], v[0]]) for _, (k, v) in layers])  # (L, 2, H_kv, n, D)
    return PrefixKV({"self": kv[None]})


# ----------------------------------------------------------------------------- infix


def infix_boundary(labels: Tensor) -> Tensor:
    """(B,) index of each row's last prompt token (first target index - 1): where the infix sits.

    The infix goes just before the last prompt token (the separator): that token and every target
    attend to it, the source tokens before it do not, and positions from it on shift by the infix
    length. A keys/values infix has no query position of its own, so this is what lets the first
    target depend on it (before the first target, that token's probability would stay the frozen
    model's).
    """
    is_target = labels != IGNORE_INDEX
    first = torch.where(is_target.any(1), is_target.long().argmax(1), labels.shape[1])
    return (first - 1).clamp(min=0)


def place_infix(
    prefix: PrefixKV, attention_mask: Tensor, boundary: Tensor
) -> tuple[PrefixKV, Tensor]:
    """The prefix seen from `boundary` (B,) on, and position ids (B, T) that skip the infix."""
    rows, width = attention_mask.shape
    device = attention_mask.device
    length = prefix.row_lengths(rows, device)  # (B,)
    after = torch.arange(width, device=device)[None, :] >= boundary[:, None]  # (B, T)
    positions = attention_mask.long().cumsum(-1) - 1 + after * length[:, None]
    positions = positions.masked_fill(attention_mask == 0, 0)
    placed = PrefixKV(prefix.kv, prefix.rows, prefix.valid, visible_from=boundary.to(device))
    return placed, positions


def infix_prompt_inputs(prefix: PrefixKV, attention_mask: Tensor) -> tuple[PrefixKV, Tensor]:
    """For left-padded prompts (B, T): the infix sits before the last prompt token (index T-1)."""
    rows, width = attention_mask.shape
    boundary = torch.full((rows,), width - 1, dtype=torch.long, device=attention_mask.device)
    return place_infix(prefix, attention_mask, boundary)
