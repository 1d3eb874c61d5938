"""What recording attention costs: attnflow's summary against a plain forward and the usual
alternatives (HF ``output_attentions``, TransformerLens ``run_with_cache``), in time and memory.

All methods run on one LLaVA-shaped random model (attnflow.benchmarks.shapes) and one prompt of N
tokens. Times come from one process with the methods alternated (attnflow.timing); peak
memory from a fresh process per method on the CPU, or torch's CUDA peak on a GPU
(attnflow.benchmarks.memory). ``python -m attnflow.benchmarks.probe --tokens N`` prints the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from attnflow import timing
from attnflow.probes import fused
from attnflow.probes.inputs import Example
from attnflow.probes.record import record
from attnflow.benchmarks import memory, shapes
from attnflow.benchmarks.machine import describe, gpu_name

METHODS: dict[str, str] = {
    "plain_sdpa": "plain forward (SDPA)",
    "processor": "processor only (encode the prompt)",
    "summary_sdpa": "attnflow summary, SDPA (attention recomputed from q, k)",
    "summary_sdpa_chunked": "attnflow summary, SDPA, chunked torch path (fused=False; the path before the kernels)",
    "summary_eager": "attnflow summary, eager model (attention weights read)",
    "hf_output_attentions": "HF output_attentions=True (eager)",
    "transformerlens": "TransformerLens run_with_cache (TransformerBridge; patterns + resid_post)",
}
BASELINE = "plain_sdpa"
def summary_target(tokens: int) -> float:
    """The most a summary recording may cost, as a multiple of the plain forward: 1.15x up to 600
    tokens, 1.25x beyond (at 2,400 and more)."""
    return 1.15 if tokens <= 600 else 1.25

ADVANTAGE_TARGET = 3.0  # at 2,400 tokens, >= 3x cheaper in time or memory than each alternative
ALTERNATIVES = ("hf_output_attentions", "transformerlens")
# What attnflow's summary is computed from: the attention patterns and the residual stream.
TL_HOOKS = ("hook_pattern", "hook_resid_post")


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return fn()
    return call


def _under(model: nn.Module, backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run without gradients, the model switched to attention ``backend``, then back to SDPA."""
    def call() -> Any:
        model.set_attn_implementation(backend)
        try:
            return _no_grad(fn)()
        finally:
            model.set_attn_implementation("sdpa")
    return call


def _bridge(model: nn.Module) -> Any:
    """A TransformerBridge over a copy of ``model`` (building one rewrites the module it wraps)."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    twin = copy.deepcopy(model)
    return build_bridge_from_module(twin, type(twin).__name__, hf_config=twin.config)


def methods(model: nn.Module, processor: Any, example: Example, names: list[str],
            device: str = "cpu") -> dict[str, Callable[[], Any]]:
    """One zero-argument callable per method name, each doing the whole job once."""
    unknown = set(names) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    batch = shapes.encode(processor, example, device)
    fns: dict[str, Callable[[], Any]] = {
        "plain_sdpa": _under(model, "sdpa", lambda: model(**batch)),
        "processor": lambda: shapes.encode(processor, example, device),
        "summary_sdpa": _under(model, "sdpa", lambda: record(model, [example], processor=processor, progress=False)),
        "summary_sdpa_chunked": _under(model, "sdpa", lambda: record(model, [example], processor=processor,
                                                                     fused=False, progress=False)),
        "summary_eager": _under(model, "eager", lambda: record(model, [example], processor=processor, progress=False)),
        "hf_output_attentions": _under(model, "eager", lambda: model(**batch, output_attentions=True)),
    }
    if "transformerlens" in names:
        bridge = _bridge(model)
        keep = lambda name: name.endswith(TL_HOOKS)  # noqa: E731
        fns["transformerlens"] = _no_grad(lambda: bridge.run_with_cache(
            batch["input_ids"], pixel_values=batch["pixel_values"], names_filter=keep))
    return {name: fns[name] for name in names}


def _advantage(rows: dict[str, dict[str, Any]], other: str) -> dict[str, Any]:
    """How many times cheaper the SDPA summary is than ``other``, in time and in memory."""
    ours, theirs = rows["summary_sdpa"], rows[other]
    time_x = theirs["ratio_median"] / ours["ratio_median"]  # both paired with the plain forward, per round
    mem_x = theirs["peak_mb"] / ours["peak_mb"] if ours.get("peak_mb") and theirs.get("peak_mb") else None
    best = max(x for x in (time_x, mem_x) if x is not None)
    return {"time_x": time_x, "cpu_time_x": theirs["cpu_min_s"] / ours["cpu_min_s"], "memory_x": mem_x,
            "met": best >= ADVANTAGE_TARGET}


def _peaks_cpu(tokens: int, shape: shapes.Shape, threads: int) -> dict[str, int]:
    """Peak RSS growth of every method, each in its own fresh process (two at a time: memory
    is not disturbed by a neighbour the way time is)."""
    def one(name: str) -> int:
        args = ["--tokens", str(tokens), "--shape", shape.name, "--threads", str(threads), "--memory-of", name]
        return int(memory.in_fresh_process("attnflow.benchmarks.probe", args)["peak_bytes"])
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(available(), pool.map(one, available())))


def _peaks_cuda(fns: dict[str, Callable[[], Any]]) -> dict[str, int | None]:
    """Torch's CUDA peak growth of every method, in this process; None where it ran out of memory."""
    peaks: dict[str, int | None] = {}
    for name, fn in fns.items():
        try:
            peaks[name] = memory.cuda_peak_growth(fn)
        except torch.cuda.OutOfMemoryError:
            peaks[name] = None
            torch.cuda.empty_cache()
    return peaks


def available(device: str = "cpu") -> list[str]:
    """Every method whose library is installed (TransformerLens is an optional extra); the chunked
    torch path as a row of its own only where the fused kernels would replace it."""
    from importlib.util import find_spec
    return [m for m in METHODS if (m != "transformerlens" or find_spec("transformer_lens") is not None)
            and (m != "summary_sdpa_chunked" or fused.available(torch.device(device)))]


def run(tokens: int, *, repeats: int = 5, warmup: int = 1, shape: shapes.Shape = shapes.CPU_SHAPE,
        device: str = "cpu", dtype: torch.dtype = torch.float32, measure_memory: bool = True,
        threads: int = 1) -> dict[str, Any]:
    """Time (and peak memory of) every available method at ``tokens`` tokens; one JSON-ready dict."""
    model, processor, example = shapes.build(shape, tokens, device=device, dtype=dtype)
    names, left_out = available(device), {}
    if device != "cpu":  # HF keeps every layer's n x n weights: leave it out where they cannot fit
        need = shape.layers * shape.heads * tokens ** 2 * torch.finfo(dtype).bits // 8
        if need > torch.cuda.mem_get_info()[0] * 0.8:
            names.remove("hf_output_attentions")
            left_out["hf_output_attentions"] = f"its {need / 2**30:.0f} GiB of attention weights do not fit"
    fns = methods(model, processor, example, names, device)
    rows = timing.summarize(timing.interleaved(fns, repeats, device=device, warmup=warmup), BASELINE)
    if measure_memory:
        peaks = _peaks_cuda(fns) if device != "cpu" else _peaks_cpu(tokens, shape, threads)
        for name, peak in peaks.items():
            rows[name]["peak_mb"] = None if peak is None else peak / 2**20
    for name, row in rows.items():
        row["label"] = METHODS[name]
    result: dict[str, Any] = {
        "tokens": tokens, "shape": asdict(shape), "device": gpu_name() if device != "cpu" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "warmup": warmup,
        "memory": ("peak RSS growth of one call in a fresh process" if device == "cpu"
                   else "torch CUDA peak allocation growth of one call") if measure_memory else None,
        "methods": rows,
        "left_out": left_out,
        # the median of per-round ratios: robust both to slow spells and to one lucky round
        "summary_ratio": rows["summary_sdpa"]["ratio_median"],
        "summary_ratio_min": rows["summary_sdpa"]["ratio_min"],
        "summary_ratio_cpu": rows["summary_sdpa"]["cpu_ratio_min"],
        "summary_target": {"max_ratio": summary_target(tokens),
                           "met": rows["summary_sdpa"]["ratio_median"] <= summary_target(tokens)},
    }
    if measure_memory:
        result["advantage"] = {other: _advantage(rows, other) for other in ALTERNATIVES if other in rows}
    return result


def memory_of(name: str, tokens: int, shape: shapes.Shape) -> dict[str, Any]:
    """Peak RSS growth of one call of method ``name``; run in a fresh process."""
    model, processor, example = shapes.build(shape, tokens)
    fn = methods(model, processor, example, [name])[name]
    return {"method": name, "tokens": tokens, "peak_bytes": memory.rss_peak_growth(fn)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(shapes.SHAPES), default=shapes.CPU_SHAPE.name)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-of", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        out = memory_of(args.memory_of, args.tokens, shapes.SHAPES[args.shape])
    else:
        out = run(args.tokens, repeats=args.repeats, shape=shapes.SHAPES[args.shape], measure_memory=not args.no_memory,
                  threads=args.threads)
    print(json.dumps({**out, "machine": describe()} if not args.memory_of else out))


if __name__ == "__main__":
    main()
