"""Process-group helpers for several processes (torchrun / accelerate launch): who am I, one device
per rank, gradient all-reduce, broadcasts and barriers for the LoRA/generative trainers, and the
``device_map`` for one model split over a node's GPUs. The sharded embed/predict runners that
build on ``dist_context`` live in ``parallel/shards.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

# --------------------------------------------------------------------------- who am I

@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def dist_context(environ=None) -> DistContext:
    """Rank, world size and local rank as torchrun / accelerate launch set them (one process
    without them)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or 0)
        local = int(env.get("LOCAL_RANK") or rank)
    except ValueError:
        raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun or "
                         "accelerate launch)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return DistContext(rank, world, local)


def shard_range(n: int, rank: int, world: int, batch_size: int = 1) -> range:
    """Rank ``rank``'s contiguous block of ``n`` items, cut on multiples of ``batch_size``."""
    n_batches = -(-n // batch_size)
    lo, hi = rank * n_batches // world, (rank + 1) * n_batches // world
    return range(min(lo * batch_size, n), min(hi * batch_size, n))


def rank_device(requested: str, ctx: DistContext) -> str:
    """One device per rank: ``auto``/``cuda`` → cuda:LOCAL_RANK when CUDA is there, else cpu."""
    if not ctx.is_distributed or requested not in ("auto", "cuda"):
        return requested
    import torch

    if torch.cuda.is_available():
        return f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    return "cpu" if requested == "auto" else requested   # "cuda" without CUDA: the usual error


# --------------------------------------------------------------------------- training (DDP)

def ensure_process_group() -> DistContext:
    """Join the launcher's process group once (nccl on CUDA, gloo on CPU, through accelerate);
    nothing to do for one process."""
    ctx = dist_context()
    if ctx.is_distributed:
        import torch

        # accelerate only uses gloo when told the run is CPU-only; otherwise it would silently
        # fall back to one process on a machine without CUDA
        _accelerate().PartialState(cpu=not torch.cuda.is_available())
    return ctx


def _accelerate():
    try:
        import accelerate
    except ImportError:
        raise ImportError("multi-process training needs accelerate: pip install accelerate") from None
    return accelerate


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_batch(indices: Sequence[int], ctx: DistContext | None = None) -> list[int]:
    """This rank's contiguous part of a global batch (all ranks draw the same global batch)."""
    ctx = ctx or dist_context()
    return [indices[i] for i in shard_range(len(indices), ctx.rank, ctx.world_size)]


def all_reduce_gradients(params, local_count: int | None = None) -> None:
    """Average ``.grad`` over ranks, by hand (for loops whose forward bypasses a DDP wrapper).
    With ``local_count`` (examples behind this rank's loss) ranks are weighted by it, so the
    result is the gradient of the mean loss over the global batch even for unequal parts."""
    import torch
    import torch.distributed as dist

    if not _group_ready():
        return
    params = [p for p in params if p.requires_grad]
    world = dist.get_world_size()
    if local_count is None:
        weight = 1.0 / world
    else:
        total = torch.tensor([float(local_count)], dtype=torch.float64, device=params[0].device)
        dist.all_reduce(total)
        weight = float(local_count) / float(total.item())
    for dtype in sorted({p.dtype for p in params}, key=str):     # one all_reduce per dtype
        group = [p for p in params if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        flat.mul_(weight)
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            g = flat[offset:offset + p.numel()].view_as(p)
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
            offset += p.numel()


def broadcast_parameters(params, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s weights (DDP does this when it wraps a model)."""
    import torch.distributed as dist

    if _group_ready():
        for p in params:
            dist.broadcast(p.data, src)


def mean_across_ranks(value: float) -> float:
    """Mean of a Python number over ranks (e.g. the loss of equal per-rank batches, for logging)."""
    if not _group_ready():
        return float(value)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank: for decisions all ranks must take alike (early
    stopping on a validation each rank ran itself: a one-ulp difference must not split them)."""
    if not _group_ready():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- big models

def device_map_kwargs(max_memory_fraction: float = 0.9, gpu_free_bytes: Sequence[int] | None = None,
                      cpu_offload_bytes: int | None = None, ctx: DistContext | None = None) -> dict:
    """``from_pretrained`` kwargs placing one model on this node's GPUs.

    One process: ``device_map="auto"`` with a ``max_memory`` budget per GPU (fraction of its free
    memory), so a model too large for one card is split layer by layer across all of them
    (pipeline-style: one GPU busy at a time — it is for fitting, not speed). Under torchrun each
    rank keeps a whole copy on its own GPU (``{"": local_rank}``). No GPU: {} (plain CPU load).
    ``gpu_free_bytes`` overrides the measured free memory (tests, or to leave room)."""
    ctx = ctx or dist_context()
    if gpu_free_bytes is None:
        import torch

        gpu_free_bytes = ([torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
                          if torch.cuda.is_available() else [])
    if not gpu_free_bytes:
        return {}
    if ctx.is_distributed:
        return {"device_map": {"": ctx.local_rank % len(gpu_free_bytes)}}
    max_memory: dict = {i: f"{int(b * max_memory_fraction) // 2**20}MiB" for i, b in enumerate(gpu_free_bytes)}
    if cpu_offload_bytes:
        max_memory["cpu"] = f"{int(cpu_offload_bytes) // 2**20}MiB"
    return {"device_map": "auto", "max_memory": max_memory}
