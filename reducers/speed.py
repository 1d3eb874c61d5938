"""Wall-clock of a model under several schedules, the one harness ``verify`` and the
benchmarks share.

Each configuration (a Schedule, or None for the unreduced model) is timed on one batch as a
prefill (one forward) and as greedy ``generate`` of 1 and of N+1 tokens, all configurations
alternated within every round (attnflow.timing.interleaved), so a slow spell of a shared
machine falls on all of them alike. Decode time per token is (generate N+1 − generate 1) / N,
taken within each round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from attnflow import timing
from attnflow.reducers.apply import apply
from attnflow.reducers.schedule import Schedule


def _calls(model: nn.Module, schedule: Schedule | None, batch: dict[str, Any], new_tokens: int,
           pad: int) -> dict[str, Callable[[], Any]]:
    """Prefill, generate-1 and generate-(N+1) of ``model`` under ``schedule`` (None: unreduced)."""

    def under(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad(), (apply(model, schedule) if schedule is not None else nullcontext()):
                return fn()
        return call

    def gen(n: int) -> Callable[[], Any]:
        return under(lambda: model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                            pad_token_id=pad))
    return {"prefill": under(lambda: model(**batch)), "gen1": gen(1), "genN": gen(new_tokens + 1)}


def speed(model: nn.Module, configs: dict[str, Schedule | None], batch: dict[str, Any], *, new_tokens: int,
          repeats: int, pad: int) -> dict[str, dict[str, list[float]]]:
    """Per configuration and round, seconds: ``prefill`` and ``decode`` (per token), by the wall
    clock and, under ``cpu_prefill``/``cpu_decode``, by this process's CPU time."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, not {new_tokens}")
    device = str(batch["input_ids"].device)
    fns = {f"{name}/{part}": fn for name, s in configs.items()
           for part, fn in _calls(model, s, batch, new_tokens, pad).items()}
    samples = timing.interleaved(fns, repeats, device=device)
    out: dict[str, dict[str, list[float]]] = {}
    for name in configs:
        out[name] = {}
        for tag, times in (("", samples.wall), ("cpu_", samples.cpu)):
            out[name][f"{tag}prefill"] = times[f"{name}/prefill"]
            out[name][f"{tag}decode"] = [(n - one) / new_tokens
                                         for n, one in zip(times[f"{name}/genN"], times[f"{name}/gen1"])]
    return out


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Median prefill milliseconds and decode milliseconds per token of one configuration."""
    return {"prefill_ms": 1000 * statistics.median(times["prefill"]),
            "decode_ms_per_token": 1000 * statistics.median(times["decode"])}
