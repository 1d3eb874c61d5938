"""Data parallelism on torch.distributed: ranks split the batches, then gather what they computed.

Launched by ``torchrun`` or ``accelerate launch`` (they set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous), every rank holds its own copy of the
model — on its own GPU (``cuda:LOCAL_RANK``), on its own block of GPUs under a device map, or on
the CPU — and takes a contiguous block of the batches, so rank order is input order and every
batch is padded exactly as in one process. Results travel as Python objects over gloo (also on
GPU runs, where the group is ``cpu:gloo,cuda:nccl``): they are per-prompt summaries, small
beside the model's work. Without a launcher ``world()`` is one rank and every helper here is
the identity, so nothing changes.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from attnflow.errors import UserError
from attnflow.fileio import atomic_dir

T = TypeVar("T")


class RankFailed(UserError, RuntimeError):
    """Another rank failed: this one stops too, writing nothing."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the launcher's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that prints and writes shared files."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous block of ``n`` items (batches); blocks differ by at most one item."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)


def world() -> World:
    """This process's World from the launcher's environment (one rank without a launcher)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    return World(rank=int(env.get("RANK", 0)), size=size, local_rank=int(env.get("LOCAL_RANK", 0)),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", size)))


def _joined() -> None:
    """Join the launcher's process group on first use: gloo, with nccl beside it for CUDA tensors;
    left at exit (a gloo group still alive when the interpreter ends can abort the process)."""
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """``device`` for this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher."""
    w = world()
    return f"cuda:{w.local_rank}" if w.size > 1 and device == "cuda" else device


def rank_max_memory() -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` for a device map on this rank: the node's GPUs split into
    LOCAL_WORLD_SIZE equal blocks, this rank's block only (None: no launcher or no GPU)."""
    from accelerate.utils import get_max_memory

    w = world()
    if w.size == 1 or not torch.cuda.is_available():
        return None
    per = torch.cuda.device_count() // w.local_size
    if per < 1:
        raise ValueError(f"{w.local_size} processes on this node but {torch.cuda.device_count()} GPU(s): "
                         "a device map needs at least one GPU per process")
    mine = range(w.local_rank * per, (w.local_rank + 1) * per)
    return {k: v for k, v in get_max_memory().items() if not isinstance(k, int) or k in mine}


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order ([obj] alone)."""
    w = world()
    if w.size == 1:
        return [obj]
    _joined()
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def concat(parts: list[T]) -> list[T]:
    """This rank's list of per-batch results joined with the other ranks', in input order."""
    return [x for ranked in gather(parts) for x in ranked]


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if world().size == 1:
        return obj
    _joined()
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fill(part: np.ndarray) -> np.ndarray:
    """An array each rank filled along its own samples only (zeros or False elsewhere), combined
    over ranks: the array one process would have filled."""
    if world().size == 1:
        return part
    parts = gather(part)
    return np.any(parts, axis=0) if part.dtype == bool else np.sum(parts, axis=0, dtype=part.dtype)


def agree(ok: bool, error: str) -> None:
    """Raise RankFailed(``error``) on every rank unless every rank's ``ok`` holds."""
    if not all(gather(ok)):
        raise RankFailed(error)


@contextmanager
def atomic_shared_dir(out: str | Path) -> Iterator[Path]:
    """``fileio.atomic_dir`` for all ranks: rank 0 makes the temporary folder and tells the others;
    each rank writes its part inside the block; the folder replaces ``out`` only when every rank's
    block succeeded, and is removed otherwise (every rank then raises)."""
    main = world().main
    with atomic_dir(out) if main else nullcontext(None) as made:
        tmp = Path(broadcast(str(made) if main else None))
        try:
            yield tmp
        except BaseException:
            gather(False)
            raise
        agree(True, f"another rank failed to write its part of {out}")
