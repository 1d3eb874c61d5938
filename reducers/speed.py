"""Wall-clock of a model under several schedules, the one harness ``verify`` and the
benchmarks share.

Each configuration (a Schedule, or None for the unreduced model) is timed on one batch as a
prefill (one forward) and as greedy ``generate`` of N+1 tokens, all configurations alternated
within every round (attnflow.timing.interleaved), so a slow spell of a shared machine falls on all
of them alike. Decode time per token is read inside the generation: a logits processor stamps the
clock as each new token's logits arrive, and the N steps between the first stamp and the last are
the decode steps alone, the prefill before them left out. (The difference of two generations, of
N+1 and of 1 tokens, carried the noise of both and was at times negative on a few-millisecond step.)

``attainable`` is the reference a shortening mechanism is judged against on a given machine: the
prefill speedup if dropping tokens cost nothing. FLOPs predict time only where every layer's time
is proportional to its tokens; a small model at batch size 1 spends a fixed share of each layer
call in framework overhead, so no token reduction reaches its FLOPs prediction there. Each
decoder layer is called alone on its own inputs (captured from an unreduced forward) cut to the
widths the schedules give it, and the seconds it saves are taken off the unreduced prefill.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import nullcontext
from time import perf_counter, process_time
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from attnflow import compat, timing
from attnflow.probes import adapters
from attnflow.reducers.apply import apply
from attnflow.reducers.schedule import Schedule
from attnflow.reducers.shorten import Cut, gather_seq, sliced_kwargs

WARMUP = 1  # untimed rounds before the timed ones


class _Stamps(LogitsProcessor):
    """Wall and CPU clock at each generation step, as its logits arrive (the device synchronised):
    the span from the first stamp to the last is the decode steps' time, without the prefill."""

    def __init__(self, device: str) -> None:
        self.device, self.wall, self.cpu = device, [], []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        timing.sync(self.device)
        self.wall.append(perf_counter())
        self.cpu.append(process_time())
        return scores


def _calls(model: nn.Module, schedule: Schedule | None, batch: dict[str, Any], new_tokens: int, pad: int,
           decode: dict[str, list[float]]) -> dict[str, Callable[[], Any]]:
    """Prefill and generate-(N+1) of ``model`` under ``schedule`` (None: unreduced); each generation
    appends its decode seconds per token, wall and CPU, to ``decode``."""
    device = str(batch["input_ids"].device)

    def under(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad(), (apply(model, schedule) if schedule is not None else nullcontext()):
                return fn()
        return call

    def generate() -> None:
        stamps = _Stamps(device)
        model.generate(**batch, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                       pad_token_id=pad, logits_processor=LogitsProcessorList([stamps]))
        for clock, times in (("wall", stamps.wall), ("cpu", stamps.cpu)):
            decode[clock].append((times[-1] - times[0]) / new_tokens)
    return {"prefill": under(lambda: model(**batch)), "generate": under(generate)}


def speed(model: nn.Module, configs: dict[str, Schedule | None], batch: dict[str, Any], *, new_tokens: int,
          repeats: int, pad: int) -> dict[str, dict[str, list[float]]]:
    """Per configuration and round, seconds: ``prefill`` and ``decode`` (per token), by the wall
    clock and, under ``cpu_prefill``/``cpu_decode``, by this process's CPU time."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, not {new_tokens}")
    device = str(batch["input_ids"].device)
    decode = {name: {"wall": [], "cpu": []} for name in configs}
    fns = {f"{name}/{part}": fn for name, s in configs.items()
           for part, fn in _calls(model, s, batch, new_tokens, pad, decode[name]).items()}
    samples = timing.interleaved(fns, repeats, device=device, warmup=WARMUP)
    return {name: {"prefill": samples.wall[f"{name}/prefill"], "cpu_prefill": samples.cpu[f"{name}/prefill"],
                   "decode": decode[name]["wall"][WARMUP:], "cpu_decode": decode[name]["cpu"][WARMUP:]}
            for name in configs}


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Median prefill milliseconds and decode milliseconds per token of one configuration."""
    return {"prefill_ms": 1000 * statistics.median(times["prefill"]),
            "decode_ms_per_token": 1000 * statistics.median(times["decode"])}


def layer_widths(model: nn.Module, schedule: Schedule, batch: dict[str, Any]) -> list[int]:
    """Tokens each decoder layer processes in one prefill of ``batch`` under ``schedule`` (the
    batch's rectangular width, filler included: what the layer really computes)."""
    with torch.no_grad(), apply(model, schedule) as planner:
        model(**batch)
    return [planner.layer_tokens[layer][0].shape[1] for layer in range(schedule.num_layers)]


def _layer_calls(model: nn.Module, batch: dict[str, Any]) -> list[tuple[tuple, dict[str, Any]]]:
    """Each decoder layer's (args, kwargs) in one unreduced forward of ``batch`` without a cache."""
    layers = adapters.decoder_layers(model)
    calls: list[tuple[tuple, dict[str, Any]]] = [((), {})] * len(layers)

    def keep(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            calls[i] = (args, kwargs)
        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _layer_fn(layer: nn.Module, call: tuple[tuple, dict[str, Any]], width: int, bool_mask: bool) -> Callable[[], Any]:
    """A call of ``layer`` on its captured inputs ``call`` cut to their last ``width`` tokens."""
    args, kwargs = call
    hidden = args[0] if args else kwargs[compat.HIDDEN_STATES]
    b, n = hidden.shape[:2]
    rows = torch.arange(n - width, n, device=hidden.device).expand(b, width)
    cut = Cut(take=rows, rows=rows, row_keys=rows, cols=rows, blocked=torch.zeros_like(rows, dtype=torch.bool))
    new_kwargs = {**kwargs, **sliced_kwargs(cut, kwargs, hidden.dtype, bool_mask)}
    short = gather_seq(hidden, rows, 1)
    if args:
        new_args = (short, *args[1:])
    else:
        new_args, new_kwargs[compat.HIDDEN_STATES] = args, short
    return lambda: layer(*new_args, **new_kwargs)


def attainable(model: nn.Module, widths: dict[str, list[int]], batch: dict[str, Any], unreduced_prefill_s: float,
               *, repeats: int) -> dict[str, float]:
    """Per configuration, the prefill speedup if its shortening cost nothing: the unreduced
    prefill (``unreduced_prefill_s``) less what its decoder layers save at the ``widths`` it
    gives them (``layer_widths``), each layer timed alone at each width it runs at, all
    (layer, width) calls alternated in every round, medians."""
    calls = _layer_calls(model, batch)
    layers = adapters.decoder_layers(model)
    full = (calls[0][0][0] if calls[0][0] else calls[0][1][compat.HIDDEN_STATES]).shape[1]
    bool_mask = adapters.attn_implementation(model) != "eager"
    fns: dict[str, Callable[[], Any]] = {}
    for i, call in enumerate(calls):
        for width in {full, *(w[i] for w in widths.values())}:
            fns[f"{i}/{width}"] = _layer_fn(layers[i], call, width, bool_mask)
    device = str(batch["input_ids"].device)
    with torch.no_grad():
        wall = timing.interleaved(fns, repeats, device=device).wall
    seconds = {key: statistics.median(times) for key, times in wall.items()}
    saved = {name: sum(seconds[f"{i}/{full}"] - seconds[f"{i}/{w}"] for i, w in enumerate(ws))
             for name, ws in widths.items()}
    return {name: unreduced_prefill_s / max(unreduced_prefill_s - s, 1e-12) for name, s in saved.items()}
