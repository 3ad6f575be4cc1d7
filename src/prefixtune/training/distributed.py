"""Data-parallel training under torchrun: the frozen base replicated, only trainable grads summed.

    torchrun --nproc-per-node 2 -m prefixtune train --data e2e --out runs/e2e

Every rank builds the same global batches (their order depends only on the seed and the global
batch size) and takes a contiguous slice of each batch's rows. A rank scales its local mean loss
by its share of the batch's target tokens (N_r / N), so the summed gradient is the gradient of
the global batch's mean loss: the same as single-process training, up to float summation order.
The trainable parameters' gradients (a prefix: a few MB) go through one all-reduce per optimizer
step, after gradient accumulation; no DistributedDataParallel wrapper is needed because the
optimizer steps are then identical on every rank. Rank 0 alone writes logs, artifacts and
checkpoints; a checkpoint stores the global step, so it resumes under any world size.

Backend: NCCL when the run's device is CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prefixtune.core.runtime import resolve_device


@dataclass
class Distributed:
    """This process's place in a torchrun job: rank, world size and device."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # True when from_env() initialised the process group
    lockstep: bool = False  # every rank runs every forward (set by fsdp.shard_base)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, rows: int) -> tuple[int, int]:
        """[start, stop) of this rank's rows in a global batch of `rows` (sizes differ by <= 1)."""
        base, extra = divmod(rows, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def shard(
        self, batch: dict[str, Tensor], count_targets: Callable[[dict[str, Tensor]], int]
    ) -> tuple[dict[str, Tensor], float]:
        """This rank's rows of a global batch (every value is (B, ...)) and its loss weight
        N_r / N, the share of the batch's target tokens; weight 0 means: nothing to do (under
        `lockstep`, a rank without rows gets the batch's first row at weight 0, to run anyway)."""
        start, stop = self.bounds(batch["input_ids"].shape[0])
        if stop == start and self.lockstep:  # no rows here: run the first one at weight 0
            return {key: value[:1] for key, value in batch.items()}, 0.0
        part = {key: value[start:stop] for key, value in batch.items()}
        total = count_targets(batch)
        local = count_targets(part) if stop > start else 0
        return part, (local / total if total else 0.0)

    def all_reduce_grads(self, params: Iterable[nn.Parameter], loss: float) -> float:
        """Sum every parameter's gradient (and the loss) over ranks in one flat all-reduce.

        A parameter whose gradient is None on every rank keeps None (AdamW then skips it, as in
        single-process training); one with a gradient on any rank gets the sum (zeros elsewhere).
        """
        params = list(params)
        parts = [
            p.grad.detach().float().flatten() if p.grad is not None
            else torch.zeros(p.numel(), device=self.device)
            for p in params
        ]  # fmt: skip
        flags = [float(p.grad is not None) for p in params]
        tail = torch.tensor(flags + [loss], dtype=torch.float32, device=self.device)
        buffer = torch.cat([part.to(self.device) for part in parts] + [tail])  # (numel + n + 1,)
        dist.all_reduce(buffer)
        offset, count = 0, len(params)
        have = buffer[-count - 1 : -1] > 0
        for param, seen in zip(params, have.tolist(), strict=True):
            grad = buffer[offset : offset + param.numel()].view_as(param)
            offset += param.numel()
            param.grad = grad.to(param.dtype) if seen else None
        return float(buffer[-1])

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    @torch.no_grad()
    def broadcast_parameters(self, params: Iterable[nn.Parameter]) -> None:
        """Make every rank hold rank 0's values (a guard against any init difference)."""
        for param in params:
            dist.broadcast(param.data, src=0)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Destroy the process group if from_env() created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _device_for(requested: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when the run's device is CUDA ('auto' with a GPU, 'cuda'), else cpu."""
    device = resolve_device(requested)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def from_env(device: str = "auto", timeout_s: float = 1800.0) -> Distributed | None:
    """The torchrun job this process belongs to (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR in the
    environment), initialising the process group unless one exists; None for a single process."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if world == 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Distributed(rank, world, _device_for(device, local))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    target = _device_for(device, local)
    backend = "nccl" if target.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))  # fmt: skip
    return Distributed(rank, world, target, owns_group=True)
