"""A frozen base larger than one device: its blocks sharded with FSDP2, the prefix replicated.

    torchrun --nproc-per-node 2 -m prefixtune train --shard-base --data e2e --out runs/e2e

`shard_base` applies PyTorch's `fully_shard` (FSDP2) to every transformer block of the frozen
model (transformers' `GradientCheckpointingLayer` instances): each rank keeps 1/world of each
block's weights and all-gathers a block just before it runs (and again in backward), freeing it
right after. Frozen weights get no gradient, so backward only all-gathers; nothing is
reduce-scattered. The embeddings, final norm and LM head stay whole on every rank (the
prefix-tuning objective calls them directly, outside the root module's forward; with a tied head
they are one tensor). The prefix (the only trainable module) is replicated and its gradients
summed by `Distributed.all_reduce_grads`, exactly as in data-parallel runs (distributed.py).

Every forward of a sharded block is a collective, so ranks must run the same forwards in the
same order: a rank without rows in a batch runs one row at loss weight 0 (`Distributed.lockstep`),
and every rank scores the whole dev split (the same number on each rank; no all-reduce needed).
Works on CPU (gloo) and CUDA (NCCL).
"""

from __future__ import annotations

from torch import nn

from prefixtune.config import ConfigError, TrainConfig
from prefixtune.training.distributed import Distributed


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (the layers transformers can checkpoint)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def shard_base(model: nn.Module, dist: Distributed) -> int:
    """Shard every block of the frozen `model` across the job's ranks with FSDP2 (in place);
    returns the number of blocks sharded. Raises ConfigError naming --shard-base when the model
    has no blocks to shard or a block's weight trains (fine-tuning and adapter methods)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    found = blocks(model)
    if not found:
        raise ConfigError("--shard-base: this model has no transformer blocks FSDP2 can shard")
    for block in found:
        for name, param in block.named_parameters():
            if param.requires_grad:
                raise ConfigError(
                    f"--shard-base shards the frozen base only, but a block's {name} requires a "
                    "gradient (a method that trains base weights); use plain data-parallel "
                    "training (torchrun without --shard-base)"
                )
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    model.to(dist.device)
    for block in found:
        fully_shard(block, mesh=mesh)
    dist.lockstep = True
    return len(found)


def shard_for_run(model: nn.Module, dist: Distributed | None, config: TrainConfig) -> int:
    """`shard_base` for a training run with --shard-base, after checking the run allows it."""
    if dist is None:
        raise ConfigError(
            "--shard-base needs a torchrun job with 2 or more processes "
            "(torchrun --nproc-per-node N -m prefixtune train --shard-base ...)"
        )
    if config.fuse_projections:
        raise ConfigError(
            "--shard-base and --fuse-projections do not combine: the fused copy "
            "would hold every block's weights whole; drop one of them"
        )
    return shard_base(model, dist)
