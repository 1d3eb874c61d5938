"""Where a prefill's time goes under each reducer: wall clock, the device's kernel time and host syncs.

On a GPU a prefill whose kernels fill only a small share of its wall clock is bound by the host that
launches them (Python, the framework, the hooks): fewer tokens then shorten the kernels but not the
launches, and no reduction reaches its FLOPs prediction (issue #16: batch-1 FastV ran at 0.46 of it on
an H200). ``busy`` is the kernels' summed time over the wall clock (torch's profiler; CUDA only), and
``syncs`` counts the host's reads of device values per prefill (scalars, ``nonzero``, boolean indexing,
``.cpu()`` and ``.tolist()``), each of which makes the host wait for the device to drain. On the CPU
every tensor is already on the host, so ``syncs`` there counts what would wait on a GPU (an upper
bound: a ``.cpu()`` of a host tensor costs nothing there). One command for a session lent a GPU::

    python -m attnflow.benchmarks.prefill_profile --shape llava-1.5-7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from attnflow import timing
from attnflow.benchmarks import shapes
from attnflow.benchmarks.machine import describe
from attnflow.benchmarks.reducers import configs
from attnflow.reducers.apply import apply
from attnflow.reducers.schedule import Schedule

SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"})
HOST_READS = ("cpu", "tolist")


class _SyncOps(TorchDispatchMode):
    """Counts the dispatched operators whose result the host must wait for."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.__name__.split(".")[0]
        indices = args[1] if name == "index" and len(args) > 1 else ()
        if name in SYNC_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def host_syncs() -> Iterator[Callable[[], int]]:
    """Count, inside the block, the host's reads of device values (see the module); yields the counter."""
    reads = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads["n"] += 1
            return method(self, *args, **kwargs)
        return read

    mode = _SyncOps()
    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, counted(method))
        with mode:
            yield lambda: reads["n"] + mode.count
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def profile_config(model: nn.Module, schedule: Schedule | None, batch: dict[str, torch.Tensor], *,
                   rounds: int, device: str) -> dict[str, Any]:
    """Median wall seconds of ``rounds`` prefills of ``batch`` under ``schedule`` (None: unreduced),
    the share of it the device's kernels were busy (CUDA; None on the CPU) and host syncs per prefill."""
    def prefill() -> None:
        with torch.no_grad(), (apply(model, schedule) if schedule is not None else nullcontext()):
            model(**batch)

    prefill()  # warm-up
    wall = [timing.clock(prefill, device)[0] for _ in range(rounds)]
    with host_syncs() as syncs:
        prefill()
        count = syncs()
    busy = None
    if device.startswith("cuda"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(rounds):
                prefill()
            timing.sync(device)
        kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / rounds
        busy = kernels / statistics.median(wall)
    return {"wall_s": statistics.median(wall), "busy": busy, "syncs": count}


def run(shape: shapes.Shape, *, tokens: int = 600, batch_size: int = 1, rounds: int = 10, device: str = "cpu",
        dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``profile_config`` of the unreduced model and the reducer benchmark's configurations (FastV, PDrop,
    DivPrune) on a ``shape`` random LLaVA of ``tokens`` tokens, the prompt repeated ``batch_size`` times."""
    model, processor, example = shapes.build(shape, tokens, device=device, dtype=dtype)
    batch = {k: v.repeat(batch_size, *[1] * (v.dim() - 1)) for k, v in shapes.encode(processor, example, device).items()}
    rows = {name: profile_config(model, s, batch, rounds=rounds, device=device) for name, s in configs(None, model).items()}
    base = rows["unreduced"]["wall_s"]
    for row in rows.values():
        row["speedup"] = base / row["wall_s"]
    return {"shape": shape.name, "tokens": tokens, "batch_size": batch_size, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "rounds": rounds, "configs": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(shapes.SHAPES), default=shapes.CPU_SHAPE.name)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = run(shapes.SHAPES[args.shape], tokens=args.tokens, batch_size=args.batch_size, rounds=args.rounds,
              device=args.device, dtype=getattr(torch, args.dtype))
    for name, row in out["configs"].items():
        busy = "–" if row["busy"] is None else f"{row['busy']:.0%}"
        print(f"{name:10s} {1000 * row['wall_s']:8.2f} ms  x{row['speedup']:.2f}  kernels busy {busy:>4s}  "
              f"host syncs {row['syncs']}")
    print(json.dumps({**out, "machine": describe()}))


if __name__ == "__main__":
    main()
