"""Data-parallel helpers for the training loops (fine-tuning, mask training, IMP) under `torchrun`.

Everything here is a no-op (rank 0 of a world of 1) when no `torch.distributed` process group is
initialised, so single-process code calls it unconditionally.

* `init_from_env()`: initialise the process group from torchrun's environment (RANK, WORLD_SIZE,
  MASTER_ADDR, ...): NCCL when CUDA is available, gloo otherwise.
* `rank()`, `world_size()`, `is_main_process()`, `barrier()`; `save_on_main` / `write_text_on_main`:
  rank 0 writes (atomically), then every rank waits for the file.
* `broadcast_module_state(model)`: copy rank 0's parameters and buffers to every rank.
* `all_reduce_mean`, `masks_checksum`, `check_same_across_ranks`: the reductions the pruning code needs.
* `shard_loader(loader, seed)`: the loader's dataset under a `DistributedSampler` (per-rank batch =
  global batch / world size); `wrap_ddp` / `unwrap`.

What is exact across world sizes (see `sparsebert.train.finetune`): the examples of global step t are
the same for every world size that divides the global batch (the sampler's shuffle depends on the seed
and the epoch only; rank r takes every world_size-th index of it); the gradient is the same mean over
the global batch, summed in another order (equal within fp rounding, not bitwise). Not exact: dropout
(each rank draws its own masks for its slice of the batch) and an epoch's last, partial global batch
when the dataset size is not a multiple of the world size (the sampler pads it with repeated examples).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import atomic_save, atomic_write_text


# ------------------------------------------------------------------------------------------ who am I
def is_distributed() -> bool:
    """Whether a process group is initialised (any world size, 1 included)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables are set (WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialise the process group from torchrun's environment; returns True when this call did it.

    Does nothing (False) without torchrun's variables or when a group already exists. `backend` None:
    "nccl" when CUDA is available (and selects the GPU LOCAL_RANK), "gloo" otherwise."""
    if is_distributed() or not launched_by_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"backend must be 'nccl', 'gloo', 'mpi' or 'ucc', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def rank_device(device) -> torch.device:
    """`device` for this rank: a bare "cuda" becomes cuda:LOCAL_RANK under a process group."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return dev


# ------------------------------------------------------------------------------------------ writing
def save_on_main(obj: Any, path) -> Path:
    """`checkpoint.atomic_save` on rank 0, then a barrier (every rank returns once the file exists)."""
    path = Path(path)
    if is_main_process():
        atomic_save(obj, path)
    barrier()
    return path


def write_text_on_main(text: str, path) -> Path:
    """`checkpoint.atomic_write_text` on rank 0, then a barrier."""
    path = Path(path)
    if is_main_process():
        atomic_write_text(text, path)
    barrier()
    return path


# ------------------------------------------------------------------------------------------ collectives
def _collective_view(t: Tensor) -> Tensor:
    return t.to(torch.uint8) if t.dtype == torch.bool else t


@torch.no_grad()
def broadcast_module_state(model: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank `src`'s parameters and buffers (persistent or not) into every rank's `model`, in place."""
    if not is_distributed():
        return model
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for t in tensors:
        view = _collective_view(t)
        buf = view if view.is_contiguous() and view is t else view.contiguous()
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf.to(t.dtype))
    return model


def all_reduce_mean(t: Tensor) -> Tensor:
    """The mean of `t` over the ranks (a new tensor; `t` itself without a process group). No host sync."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


@torch.no_grad()
def masks_checksum(masks: Iterable[Tensor]) -> Tensor:
    """An int64 fingerprint of a list of masks: per mask, the number kept and the sum of the kept flat
    indices (shape (2 * len(masks),)); equal masks give equal fingerprints."""
    parts = []
    for m in masks:
        flat = m.reshape(-1) != 0
        idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
        parts.append(torch.stack([flat.sum(dtype=torch.int64), (idx * flat).sum()]))
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(parts)


@torch.no_grad()
def check_same_across_ranks(t: Tensor, what: str) -> None:
    """Raise RuntimeError naming `what` when `t` (integer, same shape on every rank) differs between ranks.

    A debugging check: it synchronises with the host (reads the comparison)."""
    if not is_distributed() or world_size() == 1:
        return
    if t.is_floating_point():
        raise TypeError(f"check_same_across_ranks: expected an integer tensor for {what}, got {t.dtype}")
    lo, hi = t.detach().clone(), t.detach().clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    differ = (lo != hi).nonzero().reshape(-1)
    if differ.numel():
        raise RuntimeError(f"{what} differs between ranks (rank {rank()} of {world_size()}); first differing "
                           f"entries {differ[:8].tolist()}: min {lo[differ[:8]].tolist()}, max {hi[differ[:8]].tolist()}")


# ------------------------------------------------------------------------------------------ data and model
def shard_loader(loader, seed: int = 0, *, shuffle: Optional[bool] = None):
    """A DataLoader over `loader`'s dataset whose sampler is a DistributedSampler for this rank (world of 1
    without a process group), with batch size `loader.batch_size` (the global batch) / world size.

    `shuffle` None: shuffled when `loader` was (a RandomSampler). The order depends on (`seed`, epoch)
    only: call `loader.sampler.set_epoch(epoch)` at each epoch. Keeps collate_fn, num_workers, drop_last."""
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler
    if not isinstance(loader, DataLoader):
        raise TypeError(f"train_loader: sharding across ranks needs a torch DataLoader, got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ValueError("train_loader: sharding across ranks needs a DataLoader built with batch_size "
                         "(not a custom batch_sampler)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"data_seed must be an int, got {seed!r}")
    world = world_size()
    if loader.batch_size % world:
        raise ValueError(f"train_loader: the global batch size {loader.batch_size} is not divisible by the world "
                         f"size {world}; use a batch size that is a multiple of the number of processes")
    if len(loader.dataset) < world:
        raise ValueError(f"train_loader: {len(loader.dataset)} examples for {world} processes")
    if shuffle is None:
        shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank(), shuffle=shuffle, seed=seed,
                                 drop_last=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world, sampler=sampler,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or Accelerate/DataParallel) wrapper; `model` otherwise."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def wrap_ddp(model: nn.Module, device=None) -> nn.Module:
    """`model` in DistributedDataParallel under a process group (as is when already wrapped or without one).

    Buffers are not re-broadcast at every forward (`broadcast_buffers=False`): the BERT buffers are
    constants, and the masks/thresholds are computed identically on every rank (checked by
    `check_same_across_ranks` where asked)."""
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ids = [dev.index if dev.index is not None else local_rank()] if dev.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.13 names the option forward_sync_buffers (broadcast_buffers is deprecated there)
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else {"broadcast_buffers": False}
    return ddp(model, device_ids=ids, **no_sync)


def sampler_of(loader) -> Optional[Any]:
    """The loader's DistributedSampler, or None."""
    from torch.utils.data.distributed import DistributedSampler
    s = getattr(loader, "sampler", None)
    return s if isinstance(s, DistributedSampler) else None


__all__: Sequence[str] = (
    "is_distributed", "rank", "world_size", "local_rank", "is_main_process", "barrier", "launched_by_torchrun",
    "init_from_env", "rank_device", "save_on_main", "write_text_on_main", "broadcast_module_state",
    "all_reduce_mean", "masks_checksum", "check_same_across_ranks", "shard_loader", "unwrap", "wrap_ddp",
    "sampler_of")
