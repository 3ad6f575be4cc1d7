"""Checks that read the same on every model: (4)'s "a step changes only the prefix" and (5) the
artifact round trip. `forward(prefix_kv)` runs the model under test on fixed inputs."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel

from prefixtune.conformance.results import Check
from prefixtune.core.artifact import load_prefix, save_prefix
from prefixtune.core.attention import PrefixKV
from prefixtune.core.prefix_encoder import PrefixEncoder

Forward = Callable[[PrefixKV], Tensor]  # prefix -> logits of the model under test


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of (B, T, V) logits against (B, T) labels."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def step_changes_only_prefix(model: PreTrainedModel, encoder: PrefixEncoder,
                             loss: Callable[[], Tensor]) -> Check:  # fmt: skip
    """(4) one SGD step on `loss` moves every prefix parameter and no base weight or buffer."""
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    prefix_before = [p.detach().clone() for p in encoder.parameters()]
    encoder.zero_grad(set_to_none=True)
    loss().backward()
    torch.optim.SGD(encoder.parameters(), lr=1.0).step()
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, before[n])]
    graded = [n for n, p in model.named_parameters() if p.grad is not None]
    still = sum(torch.equal(p, q) for p, q in zip(encoder.parameters(), prefix_before, strict=True))
    problems = []
    if changed:
        problems.append(f"{len(changed)} base tensors changed, e.g. {changed[0]}")
    if graded:
        problems.append(f"{len(graded)} base parameters got gradients, e.g. {graded[0]}")
    if still:
        problems.append(f"{still} prefix parameters did not move")
    note = "; ".join(problems) or (
        f"{encoder.num_trainable()} prefix numbers moved, {len(before)} base tensors bit-identical"
    )
    return Check("(4) only the prefix trains", not problems, note=note)


@torch.no_grad()
def artifact_round_trip(encoder: PrefixEncoder, forward: Forward, family: str) -> Check:
    """(5) save_prefix then load_prefix: the same tensors, bit-identical logits."""
    baked = encoder.bake()
    with tempfile.TemporaryDirectory() as tmp:
        save_prefix(tmp, baked, base_model=family, prefix_config=encoder.config)
        loaded = load_prefix(tmp)
    same = set(loaded.kv) == set(baked) and all(torch.equal(loaded.kv[k], baked[k]) for k in baked)
    live = forward(PrefixKV({kind: kv[None] for kind, kv in baked.items()}))
    folded = forward(loaded.to_prefix_kv(live.device))
    exact = bool(torch.equal(live, folded))
    error = float((live - folded).abs().max())
    note = (
        f"kinds {sorted(baked)}: tensors {'equal' if same else 'DIFFER'}, logits max diff {error}"
    )
    return Check("(5) artifact round trip", same and exact, error, 0.0, note)
