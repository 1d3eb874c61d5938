"""Token groups (all / text / visual) and labels of aligned positions.

``text`` means the language tokens that carry the prompt (system, text, answer); BOS is in
``all`` only, because as the usual sink its state barely changes and would make text
layers look redundant. Positions are left-aligned per sample, so a position can hold
different tokens in different samples: its label is the most common one.
"""

from __future__ import annotations

from collections import Counter

import dask
import numpy as np
import xarray as xr

GROUPS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "text": ("system", "text", "answer"),
    "visual": ("visual",),
}


def group_mask(trace: xr.Dataset, group: str) -> xr.DataArray:
    """Boolean (sample, pos): the positions of ``group`` (pad is never in any group)."""
    if group not in GROUPS:
        raise ValueError(f"unknown token group {group!r}; known: {sorted(GROUPS)}")
    modality = trace["modality"]
    members = GROUPS[group]
    if members is None:
        return modality != "pad"
    return modality.isin(list(members))


def is_causal(trace: xr.Dataset) -> bool:
    """Whether the traced model attends causally (decoders) or bidirectionally (encoders)."""
    return bool(int(trace.attrs.get("causal", 1)))


def has_visual(trace: xr.Dataset) -> bool:
    """Whether any sample holds visual tokens."""
    return bool((trace["modality"] == "visual").any())


def position_labels(trace: xr.Dataset, pos: np.ndarray, samples: np.ndarray) -> list[tuple[str, str]]:
    """(token, modality) most common at each ``pos[i]`` over the samples where ``samples[:, i]``
    holds (``samples``: boolean [sample, len(pos)]); reads only those positions' columns."""
    at = xr.DataArray(np.asarray(pos, dtype=np.int64), dims="pick")
    columns = dask.compute(*(trace[c].isel(pos=at).transpose("sample", "pick") for c in ("token", "modality")))
    tokens, modalities = (c.values for c in columns)
    return [Counter(zip(map(str, tokens[where, i]), map(str, modalities[where, i]))).most_common(1)[0][0]
            for i, where in enumerate(np.asarray(samples, dtype=bool).T)]


def position_label(trace: xr.Dataset, pos: int, samples: np.ndarray | None = None) -> tuple[str, str]:
    """(token, modality) most common at ``pos`` over ``samples`` (a boolean mask; all if None)."""
    where = np.ones(trace.sizes["sample"], dtype=bool) if samples is None else np.asarray(samples, dtype=bool)
    return position_labels(trace, np.array([pos]), where[:, None])[0]
