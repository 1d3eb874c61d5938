"""Redundant layers from a Trace: Block Influence, angular distance, attention rank.

- Block Influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean cos(input, output of layer l)
  over the tokens of a group (all / text / visual), from the trace's ``update_cos`` (the
  layer's own input and output, so HF's post-norm last hidden state never enters).
- Angular distance (Gromov et al. 2024): d(l, l+n) = arccos(cos(x^l, x^{l+n})) / pi on the
  last token, depth l = input of layer l, averaged over samples; the best block of n layers
  to drop starts at argmin_l d(l, l+n).
- ARank (gamma-MoD, Luo et al. 2024): head- and sample-mean numerical rank of each layer's
  causal attention map with its diagonal zeroed, as recorded.
Candidates: layers other than the last (removing it is known to be harmful) whose BI is at
most ``redundant_bi``, most redundant first.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr

from attnflow.analyses.arrays import listed, mean_over, sample_slices
from attnflow.analyses.groups import GROUPS, group_mask
from attnflow.analyses.thresholds import Thresholds


def block_influence(trace: xr.Dataset) -> dict[str, np.ndarray]:
    """Per group, BI per layer (NaN where the group has no token); one pass over ``update_cos``."""
    cos = trace["update_cos"]
    (means,) = dask.compute({g: mean_over(cos.where(group_mask(trace, g)), ["sample", "pos"]) for g in GROUPS})
    return {g: 1.0 - m.values for g, m in means.items()}


def angular_distances(trace: xr.Dataset) -> list[np.ndarray]:
    """``d[n-1][l]`` = mean over samples of arccos(cos(x^l, x^{l+n})) / pi, for n = 1..L; summed
    one chunk of samples at a time (each holds [chunk, depth, hidden] in float64)."""
    resid_last = trace["resid_last"].transpose("sample", "depth", "hidden")
    depths = resid_last.sizes["depth"]
    sums = [np.zeros(depths - n) for n in range(1, depths)]
    counts = [np.zeros(depths - n) for n in range(1, depths)]
    for part in sample_slices(resid_last):
        resid = resid_last.isel(sample=part).values.astype(np.float64)
        unit = resid / np.maximum(np.linalg.norm(resid, axis=-1, keepdims=True), 1e-30)
        for n in range(1, depths):
            angle = np.arccos(np.clip((unit[:, :-n] * unit[:, n:]).sum(-1), -1.0, 1.0)) / np.pi
            sums[n - 1] += np.nansum(angle, 0)
            counts[n - 1] += (~np.isnan(angle)).sum(0)
    return [np.divide(s, c, out=np.full_like(s, np.nan), where=c > 0) for s, c in zip(sums, counts)]


def attention_rank(trace: xr.Dataset) -> np.ndarray:
    """Per layer, the mean ARank over samples and heads (NaN where not recorded)."""
    if "arank" not in trace:
        return np.full(trace.sizes["layer"], np.nan)
    return mean_over(trace["arank"], ["sample", "head"]).values


def candidates(bi: np.ndarray, layers: np.ndarray, num_layers: int, th: Thresholds) -> list[int]:
    """Layers (never the model's last) with BI <= ``th.redundant_bi``, most redundant first;
    ``bi[i]`` belongs to layer ``layers[i]``."""
    order = np.argsort(np.where(np.isnan(bi), np.inf, bi), kind="stable")
    return [int(layers[i]) for i in order if layers[i] < num_layers - 1 and bi[i] <= th.redundant_bi]


def find_redundancy(trace: xr.Dataset, th: Thresholds) -> dict[str, Any]:
    """The ``redundancy`` section of Findings."""
    bi = block_influence(trace)
    layers = trace["layer"].values
    num_layers = int(trace.attrs.get("num_layers", layers.max() + 1))
    angular = angular_distances(trace)
    return {
        "block_influence": {g: listed(v) for g, v in bi.items()},
        "angular_distance": [listed(d) for d in angular],
        "attention_rank": listed(attention_rank(trace)),
        "candidates": candidates(bi["all"], layers, num_layers, th),
    }
