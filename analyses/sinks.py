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

Every step works on a dask-backed (lazy) trace one chunk of samples at a time: reductions over
samples are xarray's (dask tree reductions), and what is loaded whole is at most [sample, pick]
for the reported (layer, pos) picks, and one layer's [sample, pos] for the typical median.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import dask
import numpy as np
import xarray as xr

from attnflow.analyses.arrays import mean_over, sample_slices
from attnflow.analyses.groups import position_labels
from attnflow.analyses.thresholds import Thresholds

TOPK_ORDER = ("sample", "layer", "pos", "rank")


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, inf where den is 0 and num is not, 1 where both are, NaN where either is NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    out[(den == 0) & (num == 0)] = 1.0
    return out


def _ratio(num: xr.DataArray, den: xr.DataArray) -> xr.DataArray:
    """``_divide`` on DataArrays broadcast by dim name (chunk by chunk when dask-backed)."""
    return xr.apply_ufunc(_divide, num, den, dask="parallelized", output_dtypes=[np.result_type(num.dtype, den.dtype)])


def sink_scores(trace: xr.Dataset) -> xr.DataArray:
    """received / uniform per (sample, layer, head, pos): 1 = what uniform attention gives."""
    return _ratio(trace["received"], trace["uniform"])


def sink_heads(trace: xr.Dataset, th: Thresholds) -> xr.DataArray:
    """Boolean (sample, layer, head, pos): the head makes the key a sink in that sample."""
    return ((sink_scores(trace) >= th.sink_ratio) & (trace["received"] >= th.sink_share)
            & (trace["n_seen"] >= th.sink_min_queries))


def _frequent(mask: xr.DataArray, th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Per (layer, pos) the fraction of all samples in which ``mask`` (sample, layer, pos)
    holds, and the (layer index, pos) pairs frequent enough to report. All samples, not those
    long enough to have the position: a late position present in one sample only would
    otherwise be "always" a sink after one chance event."""
    freq = (mask.sum("sample") / mask.sizes["sample"]).transpose("layer", "pos").values
    return freq, np.argwhere((freq >= th.sink_frequency) & (freq > 0))


def _picks(chosen: np.ndarray) -> dict[str, xr.DataArray]:
    """Indexers that take the chosen (layer index, pos) pairs along a new dim ``pick``; on a
    dask-backed trace each chunk of samples is indexed as it is read."""
    return {"layer": xr.DataArray(chosen[:, 0], dims="pick"), "pos": xr.DataArray(chosen[:, 1], dims="pick")}


def attention_sinks(trace: xr.Dataset, th: Thresholds) -> list[dict[str, Any]]:
    """The (layer, pos) that are attention sinks in at least ``th.sink_frequency`` of the
    samples, with their mean raw share and score over the samples where they are one."""
    freq, chosen = _frequent(sink_heads(trace, th).any("head"), th)
    if not len(chosen):  # dask cannot take a max over an empty pick dim
        return []
    picked = trace.isel(_picks(chosen))
    qualifying = sink_heads(picked, th)  # (sample, head, pick)
    where = qualifying.any("head")
    score = sink_scores(picked)
    share = picked["received"].where(qualifying, 0.0).max("head")
    ratio = score.where(qualifying & np.isfinite(score), 0.0).max("head")
    share, ratio, often, where = dask.compute(
        mean_over(share.where(where), "sample"), mean_over(ratio.where(where), "sample"),
        (qualifying.sum("sample") / where.sum("sample")).transpose("pick", "head"), where.transpose("sample", "pick"))
    labels = position_labels(trace, chosen[:, 1], where.values)
    layers = trace["layer"].values
    return [{"layer": int(layers[li]), "pos": int(pos), "token": token, "modality": modality,
             "share": float(share[i]), "ratio": float(ratio[i]), "frequency": float(freq[li, pos]),
             "heads": [int(h) for h in np.flatnonzero(often.values[i] >= 0.5)]}
            for i, ((li, pos), (token, modality)) in enumerate(zip(chosen, labels))]


def head_scores(trace: xr.Dataset, th: Thresholds) -> np.ndarray:
    """(layer, head): the largest sample-mean sink score any key reaches in that head,
    over keys seen by at least ``th.sink_min_queries`` queries (a heat map for reports)."""
    score = sink_scores(trace).where(trace["n_seen"] >= th.sink_min_queries)
    best = mean_over(score, "sample").max("pos")  # NaN where no key qualifies
    return np.nan_to_num(best.transpose("layer", "head").values, nan=0.0)


def layer_typical(trace: xr.Dataset) -> xr.DataArray:
    """Per layer, the median over samples and positions of the states' median |x|. A median does
    not split over chunks of samples: this loads one layer's [sample, pos] at a time."""
    median_abs = trace["median_abs"]
    return xr.DataArray([np.nanmedian(median_abs.isel(layer=i).values) for i in range(trace.sizes["layer"])],
                        dims="layer")


def massive_entries(trace: xr.Dataset, th: Thresholds, typical: xr.DataArray) -> xr.DataArray:
    """Boolean (sample, layer, rank, pos): that top entry of the hidden state is massive —
    ``massive_ratio`` x the state's median |x| and ``massive_layer_ratio`` x the layer's
    typical median |x| (``typical``: ``layer_typical`` of the whole trace; a scale-free stand-in
    for Sun et al.'s absolute > 100)."""
    top_abs = trace["topk_abs"]
    return (top_abs >= th.massive_ratio * trace["median_abs"]) & (top_abs >= th.massive_layer_ratio * typical)


def _massive_dims(trace: xr.Dataset, th: Thresholds, typical: xr.DataArray) -> list[int]:
    """The hidden dimensions of the massive entries, most frequent first (ties: first seen in
    (sample, layer, pos, rank) order), counted one chunk of samples at a time."""
    counts: Counter[int] = Counter()
    for part in sample_slices(trace["topk_abs"]):
        piece = trace.isel(sample=part)
        entries, dims = dask.compute(massive_entries(piece, th, typical).transpose(*TOPK_ORDER),
                                     piece["topk_dim"].transpose(*TOPK_ORDER))
        counts.update(dims.values[entries.values].astype(int).tolist())
    return [int(d) for d, _ in counts.most_common()]


def massive_activations(trace: xr.Dataset, th: Thresholds) -> tuple[list[dict[str, Any]], list[int]]:
    """Massive activations per (layer, pos) frequent enough to report, and the hidden
    dimensions that hold any massive entry among each state's top 3 (discovered, most
    frequent first: a token may carry several)."""
    typical = layer_typical(trace)
    freq, chosen = _frequent(massive_entries(trace, th, typical).any("rank"), th)
    dims = _massive_dims(trace, th, typical)
    if not len(chosen):  # as in attention_sinks
        return [], dims
    at = _picks(chosen)
    picked = trace.isel(at)
    where = massive_entries(picked, th, typical.isel(layer=at["layer"])).any("rank")
    ratio = mean_over(_ratio(picked["max_abs"], picked["median_abs"]).where(where), "sample")
    ratio, where, argmax = dask.compute(ratio, *(a.transpose("sample", "pick") for a in (where, picked["argmax_dim"])))
    where, argmax = where.values, argmax.values
    labels = position_labels(trace, chosen[:, 1], where)
    layers = trace["layer"].values
    out = []
    for i, ((li, pos), (token, modality)) in enumerate(zip(chosen, labels)):
        dim = Counter(argmax[where[:, i], i].astype(int).tolist()).most_common(1)[0][0]
        out.append({"layer": int(layers[li]), "pos": int(pos), "token": token, "modality": modality,
                    "dim": int(dim), "ratio": float(ratio[i]), "frequency": float(freq[li, pos])})
    return out, dims


def var_phi(trace: xr.Dataset, dims: list[int]) -> xr.DataArray:
    """VAR's phi per (sample, layer, pos) on each layer's output state: the largest |x_d| over
    sink dimensions d among the state's top-3 entries, over rms(x); 0 when none is there."""
    top_abs = trace["topk_abs"]
    phi = _ratio(top_abs.where(trace["topk_dim"].isin(dims), 0.0).max("rank", skipna=False), trace["rms"])
    return phi.where(top_abs.isel(rank=0).notnull())


def visual_sinks(trace: xr.Dataset, th: Thresholds, sinks: list[dict[str, Any]],
                 dims: list[int]) -> list[dict[str, Any]]:
    """Visual positions that are sinks by attention (in ``sinks``) or by VAR's phi >= tau
    (tau = ``th.var_tau_fraction`` x sqrt(hidden size), the largest phi possible)."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for s in sinks:
        if s["modality"] == "visual":
            found[(s["layer"], s["pos"])] = {"layer": s["layer"], "pos": s["pos"], "token": s["token"],
                                             "by": ["attention"], "frequency": s["frequency"]}
    tau = th.var_tau_fraction * np.sqrt(trace.sizes["hidden"])

    def high(t: xr.Dataset) -> xr.DataArray:
        return (var_phi(t, dims) >= tau) & (t["modality"] == "visual")

    freq, chosen = _frequent(high(trace), th)
    if len(chosen):  # dask cannot take a max over an empty pick dim
        where = high(trace.isel(_picks(chosen))).transpose("sample", "pick").values
        layers = trace["layer"].values
        for (li, pos), (token, _) in zip(chosen, position_labels(trace, chosen[:, 1], where)):
            key = (int(layers[li]), int(pos))
            entry = found.setdefault(key, {"layer": key[0], "pos": key[1], "token": token, "by": [],
                                           "frequency": float(freq[li, pos])})
            entry["by"].append("phi")
    return [found[k] for k in sorted(found)]


def find_sinks(trace: xr.Dataset, th: Thresholds) -> dict[str, Any]:
    """The ``sinks`` section of Findings: tokens, massive activations, dims, visual sinks."""
    tokens = attention_sinks(trace, th)
    massive, dims = massive_activations(trace, th)
    return {"tokens": tokens, "dims": dims, "massive": massive,
            "visual": visual_sinks(trace, th, tokens, dims),
            "head_scores": head_scores(trace, th).round(6).tolist()}
