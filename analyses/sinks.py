"""Attention sinks, massive activations and visual sinks, from a Trace.

Attention sinks (Xiao et al. 2023; Gu et al. 2024): a key that takes far more attention
than uniform attention would give it. The score is ``received / uniform`` per head, the
trace's query-count-corrected share over what uniform attention would give that key, so
that early keys are not called sinks just because causal masking gives them a large raw
share. The head-max decides (a sink is a per-head phenomenon: the trained toy VLM's BOS sink
is one head of four, which a head-mean would halve), and the same head must give a material
raw share. Massive activations (Sun et al. 2024): hidden-state entries that dwarf the
state's median; the dimensions they sit in are discovered from each state's top-3 entries
(``topk_abs``/``topk_dim``: a token may carry several massive dimensions). Visual sinks
(Kang et al. 2025): visual positions that are attention sinks, or whose VAR score
phi = max_{d in sink dims} |x_d| / rms(x) reaches a fixed fraction of its largest possible
value sqrt(d).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import numpy as np
import xarray as xr

from attnflow.analyses.groups import position_label
from attnflow.analyses.thresholds import Thresholds


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, inf where den is 0 and num is not, NaN where either is NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    out[(den == 0) & (num == 0)] = 1.0
    return out


def sink_scores(trace: xr.Dataset) -> xr.DataArray:
    """received / uniform per (sample, layer, head, pos): 1 = what uniform attention gives."""
    received = trace["received"].transpose("sample", "layer", "head", "pos")
    uniform = trace["uniform"].transpose("sample", "layer", "pos").values[:, :, None, :]
    return received.copy(data=_ratio(received.values, np.broadcast_to(uniform, received.shape)))


def sink_heads(trace: xr.Dataset, th: Thresholds) -> xr.DataArray:
    """Boolean (sample, layer, head, pos): the head makes the key a sink in that sample."""
    received = trace["received"].transpose("sample", "layer", "head", "pos")
    seen = trace["n_seen"].transpose("sample", "layer", "pos").values[:, :, None, :]
    with np.errstate(invalid="ignore"):
        ok = ((sink_scores(trace).values >= th.sink_ratio) & (received.values >= th.sink_share)
              & (seen >= th.sink_min_queries))
    return received.copy(data=ok)


def _frequent(mask: np.ndarray, th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Per (layer, pos) the fraction of all samples in which ``mask`` (sample, layer, pos)
    holds, and the (layer, pos) pairs frequent enough to report. All samples, not those
    long enough to have the position: a late position present in one sample only would
    otherwise be "always" a sink after one chance event."""
    freq = mask.sum(0) / mask.shape[0]
    return freq, np.argwhere((freq >= th.sink_frequency) & (freq > 0))


def attention_sinks(trace: xr.Dataset, th: Thresholds) -> list[dict[str, Any]]:
    """The (layer, pos) that are attention sinks in at least ``th.sink_frequency`` of the
    samples, with their mean raw share and score over the samples where they are one."""
    heads = sink_heads(trace, th).values
    per_pos = heads.any(2)
    freq, chosen = _frequent(per_pos, th)
    received = np.nan_to_num(trace["received"].transpose("sample", "layer", "head", "pos").values)
    score = np.nan_to_num(sink_scores(trace).values, posinf=0.0)
    layers = trace["layer"].values
    out = []
    for li, pos in chosen:
        where = per_pos[:, li, pos]
        qualifying = heads[where, li, :, pos]
        share = np.where(qualifying, received[where, li, :, pos], 0).max(1).mean()
        ratio = np.where(qualifying, score[where, li, :, pos], 0).max(1).mean()
        token, modality = position_label(trace, int(pos), where)
        out.append({"layer": int(layers[li]), "pos": int(pos), "token": token, "modality": modality,
                    "share": float(share), "ratio": float(ratio), "frequency": float(freq[li, pos]),
                    "heads": [int(h) for h in np.flatnonzero(qualifying.mean(0) >= 0.5)]})
    return out


def head_scores(trace: xr.Dataset, th: Thresholds) -> np.ndarray:
    """(layer, head): the largest sample-mean sink score any key reaches in that head,
    over keys seen by at least ``th.sink_min_queries`` queries (a heat map for reports)."""
    score = sink_scores(trace).values
    seen = trace["n_seen"].transpose("sample", "layer", "pos").values[:, :, None, :]
    score = np.where(seen >= th.sink_min_queries, score, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: no key qualifies
        return np.nan_to_num(np.nanmax(np.nanmean(score, 0), -1), nan=0.0)


def _topk(trace: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(|x|, dim) of each state's top entries, (sample, layer, pos, rank)."""
    order = ("sample", "layer", "pos", "rank")
    return trace["topk_abs"].transpose(*order).values, trace["topk_dim"].transpose(*order).values


def massive_entries(trace: xr.Dataset, th: Thresholds) -> np.ndarray:
    """Boolean (sample, layer, pos, rank): that top entry of the hidden state is massive —
    ``massive_ratio`` x the state's median |x| and ``massive_layer_ratio`` x the layer's
    typical median |x| (a scale-free stand-in for Sun et al.'s absolute > 100)."""
    top_abs, _ = _topk(trace)
    median_abs = trace["median_abs"].transpose("sample", "layer", "pos").values
    typical = np.nanmedian(median_abs.transpose(1, 0, 2).reshape(median_abs.shape[1], -1), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((top_abs >= th.massive_ratio * median_abs[..., None])
                & (top_abs >= th.massive_layer_ratio * typical[None, :, None, None]))


def massive_activations(trace: xr.Dataset, th: Thresholds) -> tuple[list[dict[str, Any]], list[int]]:
    """Massive activations per (layer, pos) frequent enough to report, and the hidden
    dimensions that hold any massive entry among each state's top 3 (discovered, most
    frequent first: a token may carry several)."""
    entries = massive_entries(trace, th)
    mask = entries.any(-1)
    _, top_dim = _topk(trace)
    dims = [int(d) for d, _ in Counter(top_dim[entries].astype(int).tolist()).most_common()]
    argmax = trace["argmax_dim"].transpose("sample", "layer", "pos").values
    freq, chosen = _frequent(mask, th)
    ratio = _ratio(trace["max_abs"].transpose("sample", "layer", "pos").values,
                   trace["median_abs"].transpose("sample", "layer", "pos").values)
    layers = trace["layer"].values
    out = []
    for li, pos in chosen:
        where = mask[:, li, pos]
        token, modality = position_label(trace, int(pos), where)
        dim = Counter(argmax[where, li, pos].astype(int).tolist()).most_common(1)[0][0]
        out.append({"layer": int(layers[li]), "pos": int(pos), "token": token, "modality": modality,
                    "dim": int(dim), "ratio": float(ratio[where, li, pos].mean()),
                    "frequency": float(freq[li, pos])})
    return out, dims


def var_phi(trace: xr.Dataset, dims: list[int]) -> np.ndarray:
    """VAR's phi per (sample, layer, pos) on each layer's output state: the largest |x_d| over
    sink dimensions d among the state's top-3 entries, over rms(x); 0 when none is there."""
    top_abs, top_dim = _topk(trace)
    rms = trace["rms"].transpose("sample", "layer", "pos").values
    in_dims = np.isin(top_dim, dims)
    phi = _ratio(np.where(in_dims, top_abs, 0.0).max(-1), rms)
    return np.where(np.isnan(top_abs[..., 0]), np.nan, phi)


def visual_sinks(trace: xr.Dataset, th: Thresholds, sinks: list[dict[str, Any]],
                 dims: list[int]) -> list[dict[str, Any]]:
    """Visual positions that are sinks by attention (in ``sinks``) or by VAR's phi >= tau
    (tau = ``th.var_tau_fraction`` x sqrt(hidden size), the largest phi possible)."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for s in sinks:
        if s["modality"] == "visual":
            found[(s["layer"], s["pos"])] = {"layer": s["layer"], "pos": s["pos"], "token": s["token"],
                                             "by": ["attention"], "frequency": s["frequency"]}
    visual = (trace["modality"].transpose("sample", "pos") == "visual").values
    tau = th.var_tau_fraction * np.sqrt(trace.sizes["hidden"])
    with np.errstate(invalid="ignore"):
        high = (var_phi(trace, dims) >= tau) & visual[:, None, :]
    freq, chosen = _frequent(high, th)
    layers = trace["layer"].values
    for li, pos in chosen:
        key = (int(layers[li]), int(pos))
        entry = found.setdefault(key, {"layer": key[0], "pos": key[1],
                                       "token": position_label(trace, int(pos), high[:, li, pos])[0],
                                       "by": [], "frequency": float(freq[li, pos])})
        entry["by"].append("phi")
    return [found[k] for k in sorted(found)]


def find_sinks(trace: xr.Dataset, th: Thresholds) -> dict[str, Any]:
    """The ``sinks`` section of Findings: tokens, massive activations, dims, visual sinks."""
    tokens = attention_sinks(trace, th)
    massive, dims = massive_activations(trace, th)
    return {"tokens": tokens, "dims": dims, "massive": massive,
            "visual": visual_sinks(trace, th, tokens, dims),
            "head_scores": head_scores(trace, th).round(6).tolist()}
