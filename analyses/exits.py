"""Where visual tokens stop mattering: the observational curves and the exit-layer rule.

Observational (FastV's attention allocation, per layer): the share of attention that text
queries pay to visual keys (the trace's ``flow[text, visual]``), the same for the last
prompt position alone (``last_row`` summed over visual keys), and the cumulative profile.
The causal curves (knockout, logit lens) come from ``knockout`` and ``lens``; this module
turns any curve into an exit layer with one rule and assembles the ``exit`` section.

Exit layer ``l`` means: from layer ``l`` on, visual tokens can go. ``l = L`` (the number of
layers) when they matter up to the last layer.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr

from attnflow.analyses.arrays import listed, mean_over
from attnflow.analyses.groups import has_visual, is_causal
from attnflow.analyses.thresholds import Thresholds
from attnflow.probes.schema import attention_layers


def first_stable(ok: np.ndarray) -> int:
    """The smallest index from which ``ok`` holds to the end (``len(ok)`` if it ends False)."""
    bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
    return 0 if bad.size == 0 else int(bad[-1]) + 1


def text_to_visual(trace: xr.Dataset) -> np.ndarray:
    """Per layer, the mean share of attention text queries pay to visual keys."""
    return mean_over(trace["flow"].sel(src="text", dst="visual"), ["sample", "head"]).values


def last_to_visual(trace: xr.Dataset) -> np.ndarray:
    """Per layer, the mean share of attention the last prompt position pays to visual keys."""
    share = trace["last_row"].fillna(0.0).where(trace["modality"] == "visual", 0.0).sum("pos")
    return mean_over(share, ["sample", "head"]).values


def cumulative(curve: np.ndarray) -> np.ndarray:
    """Fraction of the curve's total reached by each layer (its cumulative profile)."""
    total = np.nansum(curve)
    return np.nancumsum(curve) / total if total > 0 else np.zeros_like(curve)


def uniform_to_visual(trace: xr.Dataset) -> float:
    """The share text queries would pay to visual keys under uniform attention (the mean
    fraction of the keys each text query sees that are visual)."""
    modality = trace["modality"]
    visual, real, text = modality == "visual", modality != "pad", modality == "text"
    if is_causal(trace):
        count, seen = visual.cumsum("pos"), real.cumsum("pos")
    else:
        count, seen = visual.sum("pos"), real.sum("pos")
    total, n_text = dask.compute((count.where(text) / seen.where(text)).sum(), text.sum())
    return float(total / n_text) if n_text else float("nan")


def observational_exit(curve: np.ndarray, uniform: float, th: Thresholds,
                       unseen: np.ndarray | None = None) -> int:
    """First layer after which ``curve`` stays at most ``th.exit_share_tol`` x its peak, or x
    the uniform-attention share when the peak is below it (a model whose text never reads
    visual tokens exits at 0, not wherever noise peaks). Layers flagged in ``unseen`` (no
    softmax attention to observe) count as still reading visual tokens."""
    reference = np.nanmax(np.append(curve, uniform))
    ok = np.nan_to_num(curve, nan=0.0) <= th.exit_share_tol * reference
    return first_stable(ok if unseen is None else ok & ~unseen)


def find_exit(trace: xr.Dataset, th: Thresholds, knockout: dict[str, Any] | None = None,
              lens: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``exit`` section of Findings; ``knockout`` and ``lens`` are the results of the
    model-based analyses (None without a model)."""
    if not has_visual(trace):
        return {"layer": None, "criterion": None, "applies": False,
                "reason": "the trace has no visual tokens (text-only or encoder model): "
                          "there is nothing to exit",
                "layers": {}, "curves": {"observational": None, "knockout": None, "logit_lens": None}}
    unseen = ~attention_layers(trace)  # no softmax attention (linear-attention layers)
    last = np.where(unseen, np.nan, last_to_visual(trace))
    curve = np.where(unseen, np.nan, text_to_visual(trace))
    if np.isnan(curve).all():  # no text query after the image: fall back to the last position
        curve = last
    layers = {"observational": {"layer": observational_exit(curve, uniform_to_visual(trace), th, unseen),
                                "tolerance": th.exit_share_tol,
                                "rule": "text->visual share stays at most tolerance x max(peak, uniform share)"}}
    curves: dict[str, Any] = {"observational": listed(curve), "observational_last": listed(last),
                              "observational_cumulative": listed(cumulative(curve)),
                              "knockout": None, "logit_lens": None}
    if knockout is not None:
        layers["knockout"] = {"layer": knockout["exit_layer"], "tolerance": th.knockout_tol,
                              "metric": th.knockout_metric, "by_qtype": knockout["exit_by_qtype"],
                              "scored_samples": knockout["scored_samples"],
                              "base_accuracy": knockout["base_accuracy"],
                              "rule": "smallest l such that cutting from every l' >= l on changes "
                                      "the output by less than tolerance"}
        curves["knockout"] = listed(knockout["curves"][th.knockout_metric])
        curves["knockout_all"] = {k: listed(v) for k, v in knockout["curves"].items()}
    if lens is not None:
        layers["logit_lens"] = {"layer": lens["exit_layer"], "tolerance": th.lens_tol,
                                "rule": "first depth from which the final token stays top-1 "
                                        "in >= 1 - tolerance of samples"}
        curves["logit_lens"] = listed(lens["curves"]["prob"])
        curves["logit_lens_all"] = {k: listed(v) for k, v in lens["curves"].items()}
    criterion = "knockout" if knockout is not None else "observational"
    out = {"layer": layers[criterion]["layer"], "criterion": criterion, "applies": True,
           "layers": layers, "curves": curves}
    if unseen.any():
        out["notes"] = [f"layers {np.flatnonzero(unseen).tolist()} have no softmax attention (linear attention): "
                        "the observational curve has no value there and counts them as still reading visual "
                        "tokens, and the knockout cuts attention in the other layers only"]
    return out
