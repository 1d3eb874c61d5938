"""Small array helpers shared by the analyses: quiet NaN means, sample-wise reductions that work
the same on in-memory and dask-backed (lazy) traces, and JSON-ready lists."""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr


def nanmean(a: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``np.nanmean`` that returns NaN for all-NaN slices without a warning (an empty token
    group or a layer with no query of a modality is a normal case, not an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def mean_over(values: xr.DataArray, dims: str | list[str]) -> xr.DataArray:
    """Mean over ``dims`` skipping NaN (NaN, without a warning, where all are NaN), summed in
    float64 so that any split of the samples into chunks gives the same result to rounding.
    Lazy on a dask-backed trace: a tree reduction, one chunk at a time."""
    return values.mean(dims, skipna=True, dtype=np.float64)


def sample_slices(values: xr.DataArray) -> list[slice]:
    """Consecutive sample ranges that cover ``values``: one per dask chunk along ``sample`` (one
    when in memory), for the few steps done with numpy a slice of samples at a time."""
    sizes = values.chunksizes.get("sample") or (values.sizes["sample"],)
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for size, end in zip(sizes, ends)]


def listed(values: np.ndarray | None) -> list[float | None] | None:
    """A 1-D array as a JSON-ready list, NaN as None."""
    if values is None:
        return None
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=float)]
