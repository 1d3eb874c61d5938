"""The trace-only analyses on a trace larger than memory (issue #15): peak memory and time.

``python -m attnflow.benchmarks.bigtrace [--samples 10000] [--chunk 256]`` writes a synthetic,
schema-valid trace (16 layers, 16 heads, 256 positions, hidden 512: about 0.8 MB a sample in
memory) as a folder of shards of ``--piece`` samples each (as several recording processes write it), chunked by sample on disk, so that writing
never holds the whole trace either. A fresh process then opens the files lazily (dask, ``--chunk``
samples a chunk) and runs ``attnflow.analyses.analyze`` on it without a model (sinks, redundancy,
exit, flow: what ``attnflow analyze TRACE --chunks N`` runs). One JSON line on stdout and in
``benchmarks/results/bigtrace.json``: the trace's size in memory,
the child's peak resident set (VmHWM) and its resident set before the analyses (interpreter and
libraries), the wall times, and what the analyses found. The data plant what they should find:
an attention sink and a massive activation (dim 7) at BOS, a visual token that is a sink by
attention in the last layer, another by VAR's phi from layer L/4, identity layers L/3 and 2L/3,
and text that stops reading the image half-way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from attnflow.analyses import analyze
from attnflow.benchmarks.machine import describe
from attnflow.benchmarks.memory import status_kib, in_fresh_process
from attnflow.fileio import write_json
from attnflow.probes.io import load_trace, shard_name
from attnflow.probes.schema import FIELDS, GROUPS, NO_PATCH, SCHEMA_VERSION, as_field


@dataclass(frozen=True)
class Sizes:
    """Trace sizes; ``side`` x ``side`` visual tokens follow BOS, text fills the rest."""

    layers: int = 16
    heads: int = 16
    positions: int = 256
    hidden: int = 512
    side: int = 12


SINK_DIM = 7  # the planted massive dimension
DISK_CHUNK = 16  # samples per netCDF chunk


def _shares(rng: np.random.Generator, shape: tuple[int, ...], real: np.ndarray) -> np.ndarray:
    """Random attention rows over the last axis, summing to 1 over ``real`` keys (NaN elsewhere)."""
    rows = np.where(real, rng.random(shape, dtype=np.float32) + 0.1, 0.0).astype(np.float32)
    return np.where(real, rows / rows.sum(-1, keepdims=True), np.nan).astype(np.float32)


def synthetic_piece(start: int, n: int, sizes: Sizes = Sizes(), seed: int = 0) -> xr.Dataset:
    """Samples ``start`` .. ``start + n - 1`` of a synthetic trace (random, seeded by ``seed`` and ``start``)."""
    rng = np.random.default_rng([seed, start])
    L, H, P, D = sizes.layers, sizes.heads, sizes.positions, sizes.hidden
    visual_end = 1 + sizes.side ** 2
    length = P - rng.integers(0, P // 8, n)
    pos = np.arange(P)
    real = pos[None, :] < length[:, None]  # [n, P]
    modality = np.where(pos == 0, "bos", np.where(pos < visual_end, "visual", "text"))[None].repeat(n, 0)
    modality[~real] = "pad"
    is_visual = modality == "visual"
    token_id = np.where(is_visual, 32000, rng.integers(2, 32000, (n, P)))
    token_id[:, 0] = 1
    patch = np.where(is_visual, pos - 1, NO_PATCH)
    real4 = real[:, None, None, :]

    n_seen = np.where(real, length[:, None] - pos, np.nan)  # causal: queries pos .. length - 1 see pos
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, P + 1))])
    uniform = ((harmonic[length][:, None] - harmonic[pos][None, :]) / n_seen).astype(np.float32)
    received = uniform[:, None, None, :] * np.exp(0.3 * rng.standard_normal((n, L, H, P), dtype=np.float32))
    received[:, 2:, 0, 0] = 0.6  # an attention sink at BOS from layer 2 on
    received[:, -1, 1, 1] = 0.3  # and on the first visual token in the last layer
    received = np.where(real4, received, np.nan)

    last_row = _shares(rng, (n, L, H, P), real4)
    exit_layer = L // 2
    flow = np.full((n, L, H, len(GROUPS), len(GROUPS)), np.nan, dtype=np.float32)
    present = [GROUPS.index(g) for g in ("bos", "text", "visual")]
    flow[..., present, :] = 0.0
    flow[:, :, :, np.array(present)[:, None], np.array(present)[None, :]] = _shares(
        rng, (n, L, H, len(present), len(present)), np.ones(len(present), dtype=bool))
    text, vis = GROUPS.index("text"), GROUPS.index("visual")
    flow[:, exit_layer:, :, text, vis] *= 0.01  # text stops reading the image half-way

    cos = np.where(real[:, None, :], 0.5 + 0.3 * rng.random((n, L, P)), np.nan)
    identity = [L // 3, 2 * L // 3]  # two layers that leave the state (nearly) as it is
    cos[:, identity] = np.where(real[:, None, :], 0.99, np.nan)
    median_abs = 0.6 + 0.1 * rng.random((n, L, P))
    top_abs = -np.sort(-median_abs[:, :, None, :] * (5 + 3 * rng.random((n, L, 3, P))), 2)
    top_dim = rng.integers(0, D, (n, L, 3, P)).astype(np.float32)
    rms = 0.8 + 0.1 * rng.random((n, L, P))
    for first, p, value in ((1, 0, 2000.0), (L // 4, 5, 800.0)):  # massive at BOS; VAR's phi on visual token 5
        top_abs[:, first:, 0, p], top_dim[:, first:, 0, p] = value, SINK_DIM
        rms[:, first:, p] = value / np.sqrt(D)
    resid = np.cumsum(rng.standard_normal((n, L + 1, D)), 1)
    for layer in identity:
        resid[:, layer + 1:] -= (resid[:, layer + 1] - resid[:, layer])[:, None]

    pad3 = real[:, None, :]
    values = {
        "received": received, "uniform": np.broadcast_to(uniform[:, None], (n, L, P)),
        "n_seen": np.broadcast_to(n_seen[:, None], (n, L, P)), "last_row": last_row, "flow": flow,
        "arank": rng.random((n, L, H)) * length[:, None, None], "update_cos": cos,
        "max_abs": np.where(pad3, top_abs[:, :, 0], np.nan), "argmax_dim": np.where(pad3, top_dim[:, :, 0], np.nan),
        "median_abs": np.where(pad3, median_abs, np.nan), "rms": np.where(pad3, rms, np.nan),
        "topk_abs": np.where(real[:, None, None], top_abs, np.nan),
        "topk_dim": np.where(real[:, None, None], top_dim, np.nan), "resid_last": resid,
        "modality": modality, "token": np.where(is_visual, "<image>", np.char.add("w", token_id.astype(str))),
        "token_id": np.where(real, token_id, -1), "image": np.where(is_visual, 0, -1),
        "patch_row": np.where(is_visual, patch // sizes.side, NO_PATCH),
        "patch_col": np.where(is_visual, patch % sizes.side, NO_PATCH), "length": length,
        "rank": np.zeros(n), "answer": np.full(n, ""), "qtype": np.full(n, ""), "prompt": np.full(n, "synthetic"),
    }
    values["token"][:, 0], values["token"][~real] = "<s>", ""
    fields = {name: as_field(name, np.asarray(v)) for name, v in values.items()}
    coords = {**{k: v for k, v in fields.items() if FIELDS[k].coord},
              "sample": start + np.arange(n), "layer": np.arange(L), "head": np.arange(H), "pos": pos,
              "src": list(GROUPS), "dst": list(GROUPS), "depth": np.arange(L + 1),
              "has_attention": as_field("has_attention", np.ones(L, dtype=bool))}
    attrs = {"attnflow_trace": SCHEMA_VERSION, "model_type": "synthetic", "num_layers": L, "num_heads": H,
             "hidden_size": D, "fingerprint": "sha256:synthetic", "causal": 1, "level": "summary",
             "layers_full": "[]"}
    return xr.Dataset({k: v for k, v in fields.items() if not FIELDS[k].coord}, coords=coords, attrs=attrs)


def write_trace(folder: Path, samples: int, piece: int, sizes: Sizes = Sizes()) -> list[Path]:
    """The synthetic trace as a folder of shards of ``piece`` samples (the layout several recording
    processes write), each variable chunked by DISK_CHUNK samples."""
    starts = range(0, samples, piece)
    files = []
    for i, start in enumerate(starts):
        part = synthetic_piece(start, min(piece, samples - start), sizes)
        encoding = {name: {"chunksizes": tuple(min(DISK_CHUNK, size) if dim == "sample" else size
                                               for dim, size in var.sizes.items())}
                    for name, var in part.data_vars.items()}
        files.append(folder / shard_name(i, len(starts)))
        part.to_netcdf(files[-1], engine="h5netcdf", encoding=encoding)
    return files


def analyse(folder: Path, chunk: int) -> dict[str, Any]:
    """``attnflow analyze FOLDER --chunks CHUNK`` without a model, in this process (call it in a
    fresh one): the trace is read lazily, ``chunk`` samples at a time."""
    before = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    findings = analyze(folder, chunks=chunk)
    seconds = round(time.perf_counter() - start, 2)
    sinks, trace = findings.sinks, load_trace(folder, chunks=chunk)
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts from its parent's resident set, the writer's
    return {"trace_bytes": int(trace.nbytes), "peak_rss_bytes": status_kib("VmHWM") * 1024,
            "rss_before_analyses_bytes": before, "seconds": seconds, "costs": findings.costs,
            "found": {"sinks": [(t["layer"], t["pos"]) for t in sinks["tokens"]], "dims": sinks["dims"],
                      "massive": sorted({m["pos"] for m in sinks["massive"]}),
                      "visual": [(v["layer"], v["pos"], v["by"]) for v in sinks["visual"]],
                      "candidates": findings.redundancy["candidates"], "exit_layer": findings.exit["layer"]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=256, help="samples per dask chunk when analysing")
    parser.add_argument("--piece", type=int, default=500, help="samples per file")
    parser.add_argument("--analyse", type=Path, help=argparse.SUPPRESS)  # the child: analyse this folder
    args = parser.parse_args(argv)
    if args.analyse:
        print(json.dumps(analyse(args.analyse, args.chunk)))
        return
    with tempfile.TemporaryDirectory(prefix="bigtrace-") as tmp:
        start = time.perf_counter()
        write_trace(Path(tmp), args.samples, args.piece)
        written = time.perf_counter() - start
        start = time.perf_counter()
        child = in_fresh_process("attnflow.benchmarks.bigtrace", ["--analyse", tmp, "--chunk", str(args.chunk)],
                                 timeout=3600)
        wall = time.perf_counter() - start
    result = {"samples": args.samples, "chunk": args.chunk, **child, "child_wall_seconds": round(wall, 1),
              "write_seconds": round(written, 1), "machine": describe()}
    write_json(Path("benchmarks") / "results" / "bigtrace.json", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
