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

import numpy as np
import xarray as xr

from attnflow.analyses.arrays import listed, nanmean
from attnflow.analyses.groups import GROUPS, group_mask
from attnflow.analyses.thresholds import Thresholds


def block_influence(trace: xr.Dataset) -> dict[str, np.ndarray]:
    """Per group, BI per layer (NaN where the group has no token)."""
    cos = trace["update_cos"].transpose("sample", "layer", "pos").values
    out = {}
    for group in GROUPS:
        mask = group_mask(trace, group).transpose("sample", "pos").values[:, None, :]
        out[group] = 1.0 - nanmean(np.where(mask, cos, np.nan), (0, 2))
    return out


def angular_distances(trace: xr.Dataset) -> list[np.ndarray]:
    """``d[n-1][l]`` = mean over samples of arccos(cos(x^l, x^{l+n})) / pi, for n = 1..L."""
    resid = trace["resid_last"].transpose("sample", "depth", "hidden").values.astype(np.float64)
    unit = resid / np.maximum(np.linalg.norm(resid, axis=-1, keepdims=True), 1e-30)
    depths = unit.shape[1]
    out = []
    for n in range(1, depths):
        cos = np.clip((unit[:, :-n] * unit[:, n:]).sum(-1), -1.0, 1.0)
        out.append(nanmean(np.arccos(cos) / np.pi, 0))
    return out


def attention_rank(trace: xr.Dataset) -> np.ndarray:
    """Per layer, the mean ARank over samples and heads (NaN where not recorded)."""
    if "arank" not in trace:
        return np.full(trace.sizes["layer"], np.nan)
    return nanmean(trace["arank"].transpose("sample", "layer", "head").values, (0, 2))


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
