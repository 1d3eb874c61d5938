"""Token spans: each position's modality and, for visual tokens, its image and patch cell.

Everything is derived from the input ids, the attention mask and the adapter's image-token
id; nothing assumes an offset or a fixed token count. Rules, per sample:

- ``pad``: attention_mask == 0.
- ``bos``: the first real non-visual token when its id is in ``bos_ids`` (the first real
  token always, when that is None: an encoder's CLS).
- ``visual``: the image placeholder id (after the processor expanded it).
- ``system``: real tokens before the first visual token; ``text``: the rest.
- ``answer``: the last ``n_answer`` real tokens when the answer was appended.

Patch cells: per-image grids (Qwen-style ``image_grid_thw``, Pixtral's ``image_sizes``) give
(rows, cols) per image, whose tokens may come in several runs (Pixtral: one per row); otherwise a
contiguous run of n visual tokens is a square grid (n = s²), a CLS token plus a square grid
(n = 1 + s²), or a square base grid of the vision tower's size followed by extra tiles
(LLaVA-NeXT: only the base grid gets cells). Runs are grouped into images when an image
expands to several runs (Idefics3 tiles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from attnflow.probes.schema import GROUPS, NO_PATCH


@dataclass
class Spans:
    """Per (sample, position) labels of one padded batch, as numpy arrays."""

    modality: np.ndarray  # [B, T] str
    image: np.ndarray  # [B, T] int, -1 if not visual
    patch_row: np.ndarray
    patch_col: np.ndarray

    def group_index(self) -> np.ndarray:
        """Index into GROUPS per position, -1 for pad."""
        lookup = {g: i for i, g in enumerate(GROUPS)}
        return np.vectorize(lambda m: lookup.get(m, -1), otypes=[np.int64])(self.modality)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous True runs as (start, length)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), (edges[1::2] - edges[::2]).tolist()))


def _square_cells(n: int, base_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of a run of ``n`` visual tokens (NO_PATCH where a token has no cell)."""
    rows, cols = np.full(n, NO_PATCH, dtype=np.int64), np.full(n, NO_PATCH, dtype=np.int64)
    side = math.isqrt(n)
    if side * side == n:
        start, count = 0, n
    elif n > 1 and math.isqrt(n - 1) ** 2 == n - 1:
        start, count, side = 1, n - 1, math.isqrt(n - 1)
    elif base_side and n > base_side * base_side:
        start, count, side = 0, base_side * base_side, base_side
    else:
        return rows, cols
    j = np.arange(count)
    rows[start:start + count], cols[start:start + count] = j // side, j % side
    return rows, cols


def token_spans(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int | None,
    bos_ids: set[int] | None,
    n_images: list[int] | None = None,
    grid_thw: torch.Tensor | None = None,
    merge_size: int = 1,
    base_side: int | None = None,
    n_answer: list[int] | None = None,
) -> Spans:
    """Label every position of a padded batch (see the module docstring for the rules)."""
    ids = input_ids.cpu().numpy()
    B, T = ids.shape
    real = np.ones_like(ids, dtype=bool) if attention_mask is None else attention_mask.cpu().numpy().astype(bool)
    modality = np.full((B, T), "pad", dtype=object)
    image = np.full((B, T), -1, dtype=np.int64)
    rows = np.full((B, T), NO_PATCH, dtype=np.int64)
    cols = np.full((B, T), NO_PATCH, dtype=np.int64)
    grids = [] if grid_thw is None else [tuple(int(v) for v in g) for g in grid_thw.tolist()]
    grid_cursor = 0
    for b in range(B):
        pos = np.flatnonzero(real[b])
        if pos.size == 0:
            continue
        visual = real[b] & (ids[b] == image_token_id) if image_token_id is not None else np.zeros(T, bool)
        modality[b, pos] = "text"
        vis_pos = np.flatnonzero(visual)
        if vis_pos.size:
            modality[b, pos[pos < vis_pos[0]]] = "system"
        first = pos[~visual[pos]][:1]  # PaliGemma writes its BOS after the image tokens
        if bos_ids is None or (first.size and ids[b, first[0]] in bos_ids):
            modality[b, first[0] if first.size else pos[0]] = "bos"
        if n_answer is not None and n_answer[b]:
            modality[b, pos[-n_answer[b]:]] = "answer"
        runs = _runs(visual)
        k = n_images[b] if n_images else len(runs)
        per_image = len(runs) // k if k and len(runs) % k == 0 else 1
        img, placed, h, w = -1, 0, 1, 1  # with grids: the current image, its tokens placed so far, its cells
        for r, (start, length) in enumerate(runs):
            modality[b, start:start + length] = "visual"
            if grids and (placed or grid_cursor < len(grids)):
                if not placed:  # a new image takes the next grid; its runs fill it row by row
                    t, h, w = grids[grid_cursor]
                    grid_cursor, img, h, w = grid_cursor + 1, img + 1, h // merge_size, w // merge_size
                j = np.arange(placed, placed + length)
                cells = ((j // w) % h, j % w)
                placed = (placed + length) % (h * w) if h * w else 0
                image[b, start:start + length] = img
            else:
                cells = _square_cells(length, base_side)
                image[b, start:start + length] = r // per_image
            rows[b, start:start + length], cols[b, start:start + length] = cells
    return Spans(modality, image, rows, cols)
