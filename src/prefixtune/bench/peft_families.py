"""Side by side with PEFT, on the families where PEFT's prefix-tuning is reported broken.

Each family's tiny random model (built in-process from a config of that class; the same weights
for both sides) is checked once through PEFT's `PrefixTuningConfig` and once through prefixtune:

(1) forward: a prefix holding the model's own keys/values of tokens w, read from transformers'
    own KV cache of a plain forward on w, makes the model on x equal the plain model on [w; x]
    (relative error: max |logit difference| / max |reference logit|; pass at <= 1e-4, float32);
(3) generate: greedy generation with that prefix equals the plain model's own `generate` on
    [w; x] (the new tokens, up to the first EOS);
trains: the prefix's gradient (float64, eval mode) is finite, non-zero, and along a random
    direction equals a central finite difference of the same loss within 2% (relative; some
    families keep parts in float32, which bounds a finite difference's precision).

A side that raises records the error (a refusal by prefixtune's `build_encoder` is one).
Run it with the environment to report on (`make test` pins transformers below 5.24 for the bench;
`.venv-latest` has the newest):

    python -m prefixtune.bench.peft_families [--families qwen2,gemma3] [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from prefixtune.config import GenerateConfig, PrefixConfig
from prefixtune.core.attention import PrefixKV, prefixed_forward
from prefixtune.core.prefix_encoder import build_encoder, flatten_stack
from prefixtune.core.verdict import relative_error
from prefixtune.generation.engine import generate

TOLERANCE = 1e-4  # check (1), relative, float32
FD_TOLERANCE = 2e-2  # autograd vs finite difference, relative (float64; fp32 rotary noise)
W = torch.tensor([[5, 17, 9, 23]])  # (1, P) the prefix's words
X = torch.tensor([[11, 30, 7, 41, 3]])  # (1, T) the input after them
NEW_TOKENS = 6
VOCAB = 96
_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)  # fmt: skip
_SLIDING = dict(sliding_window=64, layer_types=["sliding_attention", "full_attention"])
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)  # fmt: skip


@dataclass(frozen=True)
class Family:
    """A family to compare: its transformers model type, config overrides and what it shows."""

    model_type: str
    overrides: dict
    note: str

    def config(self) -> PretrainedConfig:
        return AutoConfig.for_model(self.model_type, **{**_TINY, **self.overrides})


FAMILIES: dict[str, Family] = {
    "llama-3.1": Family(
        "llama",
        dict(num_key_value_heads=2, rope_parameters=_LLAMA3_ROPE),
        "Llama-3.1: llama3 RoPE scaling, grouped-query",
    ),
    "mistral": Family(
        "mistral",
        dict(num_key_value_heads=2, sliding_window=64),
        "Mistral: grouped-query, sliding window",
    ),
    "qwen2": Family("qwen2", dict(num_key_value_heads=2), "Qwen2: grouped-query, q/k/v bias"),
    "qwen3": Family("qwen3", dict(num_key_value_heads=2, head_dim=8), "Qwen3: q/k norms"),
    "gemma3": Family(
        "gemma3_text",
        dict(num_key_value_heads=1, head_dim=16, **_SLIDING),
        "Gemma-3: sliding + global layers, q/k norms",
    ),
    "gemma4": Family(
        "gemma4_text",
        dict(
            num_key_value_heads=1,
            head_dim=16,
            global_head_dim=16,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            **_SLIDING,
        ),
        "Gemma-4 (text): sliding + global layers",
    ),  # fmt: skip
    "gemma2": Family(
        "gemma2",
        dict(num_key_value_heads=1, head_dim=16, sliding_window=64),
        "Gemma-2: attention logit soft-capping",
    ),
    "starcoder2": Family(
        "starcoder2",
        dict(num_key_value_heads=1, sliding_window=64),
        "StarCoder2: multi-query (one kv head)",
    ),
    "gpt_bigcode": Family(
        "gpt_bigcode", dict(multi_query=True), "StarCoder (gpt_bigcode): fused multi-query"
    ),
    "falcon": Family(
        "falcon", dict(multi_query=True, new_decoder_architecture=False), "Falcon: multi-query"
    ),
    "glm4": Family(
        "glm4",
        dict(num_key_value_heads=2, head_dim=8),
        "GLM-4 (ChatGLM's successor): partial rotary",
    ),
    "phi3": Family("phi3", dict(num_key_value_heads=2), "Phi-3: fused qkv"),
    "bloom": Family("bloom", {}, "BLOOM: ALiBi"),
    "gpt2": Family("gpt2", {}, "GPT-2 (control)"),
}


@dataclass
class Outcome:
    """One family through one side. forward: check (1)'s relative error (None: did not run);
    generate: check (3) held; trains: the gradient check held; error: what was raised."""

    family: str
    side: str
    forward: float | None = None
    generate: bool | None = None
    trains: bool | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """All three checks hold."""
        good_forward = self.forward is not None and self.forward <= TOLERANCE
        return good_forward and bool(self.generate) and bool(self.trains)


def build(family: str, seed: int = 0) -> PreTrainedModel:
    """The family's tiny random model in eval mode (the same weights for the same seed)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family].config()).eval()


@torch.no_grad()
def own_kv(model: PreTrainedModel, words: Tensor) -> Tensor:
    """(L, 2, H_kv, P, D): the keys/values of `words` in transformers' own cache (plain forward)."""
    cache = model(input_ids=words, use_cache=True).past_key_values
    return torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers]).float()


@torch.no_grad()
def reference(model: PreTrainedModel) -> tuple[Tensor, list[int]]:
    """The plain model on [w; x]: logits (1, T, V) at x's positions and its greedy new tokens."""
    ids = torch.cat([W, X], 1)
    logits = model(input_ids=ids).logits[:, W.shape[1] :]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
    return logits, until_eos(out[0, ids.shape[1] :].tolist(), model)


def until_eos(tokens: list[int], model: PreTrainedModel) -> list[int]:
    """`tokens` up to (without) the model's first EOS."""
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def next_token_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of x's next tokens in the logits' dtype (transformers' loss casts to fp32)."""
    return F.cross_entropy(logits[0, :-1], X[0, 1:].to(logits.device))


def gradient_check(loss_fn: Callable[[], Tensor], param: torch.nn.Parameter) -> bool:
    """Autograd's derivative of `loss_fn` along a random direction equals a central finite
    difference, and the gradient is finite and non-zero."""
    param.grad = None
    loss_fn().backward()
    grad = param.grad.detach().clone()
    if not torch.isfinite(grad).all() or grad.abs().max() == 0:
        return False
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(param.shape, generator=generator, dtype=param.dtype)
    eps = 1e-2 / float(direction.norm())  # not smaller: some families keep rotary tables in fp32
    with torch.no_grad():
        base = param.detach().clone()
        param.copy_(base + eps * direction)
        up = float(loss_fn())
        param.copy_(base - eps * direction)
        down = float(loss_fn())
        param.copy_(base)
    numeric, analytic = (up - down) / (2 * eps), float((grad * direction).sum())
    return abs(numeric - analytic) <= FD_TOLERANCE * max(abs(analytic), 1e-8)


def _error(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def check_peft(family: str) -> Outcome:
    """PEFT's PrefixTuningConfig on the family's tiny model: checks (1), (3) and training."""
    from peft import PrefixTuningConfig, get_peft_model

    outcome = Outcome(family, "peft")
    try:
        model = build(family)
        ref_logits, ref_tokens = reference(model)
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=W.shape[1])
        peft_model = get_peft_model(copy.deepcopy(model), config)
        table = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        with torch.no_grad():  # PEFT's layout is ours (interop.peft): layer, k/v, heads
            table.copy_(flatten_stack(own_kv(model, W)))
            mask = torch.ones_like(X)
            logits = peft_model(input_ids=X, attention_mask=mask).logits
            outcome.forward = relative_error(logits, ref_logits)
            out = peft_model.generate(input_ids=X, attention_mask=mask, do_sample=False,
                                      max_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
        outcome.generate = until_eos(out[0, X.shape[1] :].tolist(), model) == ref_tokens
        peft_model.double()
        outcome.trains = gradient_check(
            lambda: next_token_loss(peft_model(input_ids=X, attention_mask=mask).logits), table
        )
    except Exception as err:  # noqa: BLE001 - the table records any failure
        outcome.error = _error(err)
    return outcome


def check_prefixtune(family: str) -> Outcome:
    """prefixtune on the same tiny model: checks (1), (3) and training."""
    outcome = Outcome(family, "prefixtune")
    try:
        model = build(family)
        ref_logits, ref_tokens = reference(model)
        kv = own_kv(model, W)
        encoder = build_encoder(model, PrefixConfig(length=W.shape[1], reparam=False))
        table = encoder.parts["self"].table
        mask = torch.ones_like(X)
        with torch.no_grad():
            table.copy_(flatten_stack(kv))
            outcome.forward = relative_error(
                prefixed_forward(model, X, mask, encoder()).logits, ref_logits
            )
        prefix = PrefixKV({"self": kv[None].to(model.dtype)})  # (1, L, 2, H_kv, P, D)
        rows = generate(model, X, mask, prefix, GenerateConfig(max_new_tokens=NEW_TOKENS),
                        eos_token_id=model.config.eos_token_id, pad_token_id=0)  # fmt: skip
        outcome.generate = rows[0] == ref_tokens
        model.double(), encoder.double()
        outcome.trains = gradient_check(
            lambda: next_token_loss(prefixed_forward(model, X, mask, encoder()).logits), table
        )
    except Exception as err:  # noqa: BLE001 - a refusal is recorded like any failure
        outcome.error = _error(err)
    return outcome


def compare(families: list[str] | None = None) -> list[tuple[Outcome, Outcome]]:
    """(PEFT, prefixtune) outcomes per family, in FAMILIES order."""
    return [(check_peft(name), check_prefixtune(name)) for name in families or list(FAMILIES)]


def _cell(outcome: Outcome) -> str:
    if outcome.error:
        refused = outcome.error.startswith("UnsupportedModelError")
        return ("refused: " if refused else "error: ") + outcome.error.split(": ", 1)[-1][:110]
    verdict = "ok" if outcome.ok else "WRONG"
    return (f"{verdict} (1) {outcome.forward:.1e}, (3) {'=' if outcome.generate else 'differs'},"
            f" trains {'yes' if outcome.trains else 'no'}")  # fmt: skip


def markdown(pairs: list[tuple[Outcome, Outcome]]) -> str:
    """A markdown table: family, what it shows, PEFT's result, prefixtune's."""
    lines = [
        "| family | what it has | PEFT `PrefixTuningConfig` | prefixtune |",
        "|---|---|---|---|",
    ]
    for peft, ours in pairs:
        lines.append(
            f"| {peft.family} | {FAMILIES[peft.family].note} | {_cell(peft)} | {_cell(ours)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help=f"comma-separated, of {sorted(FAMILIES)}")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; choose from {sorted(FAMILIES)}")
    torch.set_num_threads(1)
    pairs = compare(names)
    if args.markdown:
        print(markdown(pairs))
    else:
        print(json.dumps([[asdict(p), asdict(o)] for p, o in pairs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
