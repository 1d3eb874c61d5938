"""Small array helpers shared by the analyses: quiet NaN means and JSON-ready lists."""

from __future__ import annotations

import warnings

import numpy as np


def nanmean(a: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``np.nanmean`` that returns NaN for all-NaN slices without a warning (an empty token
    group or a layer with no query of a modality is a normal case, not an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def listed(values: np.ndarray | None) -> list[float | None] | None:
    """A 1-D array as a JSON-ready list, NaN as None."""
    if values is None:
        return None
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=float)]
