"""Cross-modal flow: the layer x src x dst matrix, attention rollout and attention flow.

The matrix is the trace's ``flow`` (mean over samples, and over heads or per head).
Rollout and flow (Abnar & Zuidema 2020) need each layer's head-mean attention map A^l;
both use the residual-augmented map Â^l = 0.5 A^l + 0.5 I and trace the answer (last
prompt) position back to the input tokens:

- rollout: r <- r Â^l from the last layer down, exact at any length (O(L n^2) per sample);
- flow: max-flow from node (L, last) to each input node in the layered graph with
  capacities Â^l[i, j] on (l+1, i) -> (l, j). Token-level max-flow at 600 tokens means 600
  max-flow problems on a 600 x L-node graph, so positions are first pooled into spans:
  every non-visual token stays its own node, visual tokens are pooled into
  ``block`` x ``block`` patch blocks (capacities summed: merging nodes can only raise a
  max-flow, so the pooled value is an upper bound of the token-level one, equal to it at
  block 1 with one token per node). Capacities are scaled to integers for scipy's
  ``maximum_flow`` (resolution ``CAPACITY_SCALE``^-1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import maximum_flow

from attnflow.analyses.arrays import mean_over
from attnflow.probes.schema import GROUPS, NO_PATCH, attention_layers

CAPACITY_SCALE = 1_000_000


def flow_matrix(trace: xr.Dataset) -> dict[str, Any]:
    """The layer x src x dst attention matrix (sample- and head-mean), with its labels; the
    rows of ``layers_without_attention`` (a hybrid model's linear attention) are zeros."""
    matrix = mean_over(mean_over(trace["flow"], "sample"), "head").transpose("layer", "src", "dst").values
    return {"matrix": np.nan_to_num(matrix).round(6).tolist(),
            "labels": {"layer": [int(l) for l in trace["layer"].values],
                       "src": [str(s) for s in trace["src"].values],
                       "dst": [str(d) for d in trace["dst"].values]},
            "axes": ["layer", "src", "dst"],
            "layers_without_attention": np.flatnonzero(~attention_layers(trace)).tolist()}


def augmented(maps: np.ndarray) -> np.ndarray:
    """Â = 0.5 A + 0.5 I per layer, rows renormalised (maps: [L, n, n] head-mean)."""
    aug = 0.5 * maps + 0.5 * np.eye(maps.shape[-1])[None]
    return aug / aug.sum(-1, keepdims=True)


def rollout(maps: np.ndarray, last: int) -> np.ndarray:
    """Rollout from position ``last``: row d is its attribution over positions at depth d
    (d = 0 the input tokens, d = L the last position itself); shape [L + 1, n]."""
    aug = augmented(maps)
    rows = np.zeros((maps.shape[0] + 1, maps.shape[-1]))
    rows[-1, last] = 1.0
    for layer in range(maps.shape[0] - 1, -1, -1):
        rows[layer] = rows[layer + 1] @ aug[layer]
    return rows


MAX_BLOCKS_PER_SIDE = 8


def auto_block(patch_row: np.ndarray, patch_col: np.ndarray) -> int:
    """The smallest block side leaving at most MAX_BLOCKS_PER_SIDE blocks along either side
    of any image's patch grid."""
    side = int(max(patch_row.max(initial=-1), patch_col.max(initial=-1))) + 1
    return max(1, -(-side // MAX_BLOCKS_PER_SIDE))


def span_groups(modality: np.ndarray, image: np.ndarray, patch_row: np.ndarray,
                patch_col: np.ndarray, block: int) -> np.ndarray:
    """Group index per position: non-visual positions alone, visual ones by
    (image, patch_row // block, patch_col // block)."""
    keys: dict[tuple, int] = {}
    out = np.empty(len(modality), dtype=np.int64)
    for i, mod in enumerate(modality):
        key = (("v", int(image[i]), int(patch_row[i]) // block, int(patch_col[i]) // block)
               if mod == "visual" and patch_row[i] != NO_PATCH else ("t", i))
        out[i] = keys.setdefault(key, len(keys))
    return out


def pooled_capacities(maps: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per layer, Â summed over the positions of each (query group, key group): [L, G, G]."""
    n_groups = int(groups.max()) + 1
    onehot = np.zeros((len(groups), n_groups))
    onehot[np.arange(len(groups)), groups] = 1.0
    return onehot.T @ augmented(maps) @ onehot


def max_flows(capacity: np.ndarray, source: int) -> np.ndarray:
    """Max-flow from node (L, ``source``) to every input node (0, g) through the layered graph
    whose edges (l+1, i) -> (l, j) carry ``capacity[l, i, j]`` ([L, G, G]); returns [G]."""
    n_layers, n_groups, _ = capacity.shape
    ints = np.rint(capacity * CAPACITY_SCALE).astype(np.int64)
    if ints.max() >= np.iinfo(np.int32).max:
        raise ValueError("a pooled capacity overflows int32: use a smaller flow block")
    layer, i, j = np.nonzero(ints)
    rows = (layer + 1) * n_groups + i
    cols = layer * n_groups + j
    size = (n_layers + 1) * n_groups
    graph = coo_matrix((ints[layer, i, j].astype(np.int32), (rows, cols)), shape=(size, size)).tocsr()
    top = n_layers * n_groups + source
    return np.array([maximum_flow(graph, top, g).flow_value for g in range(n_groups)]) / CAPACITY_SCALE


def _per_modality(values: np.ndarray, modality: np.ndarray) -> dict[str, float]:
    return {g: float(values[modality == g].sum()) for g in GROUPS}


def _patch_grid(values: np.ndarray, modality: np.ndarray, image: np.ndarray, patch_row: np.ndarray,
                patch_col: np.ndarray) -> dict[int, np.ndarray]:
    """Per image index, its attribution on the patch grid (rows x cols)."""
    grids = {}
    visual = (modality == "visual") & (patch_row != NO_PATCH)
    for img in np.unique(image[visual]):
        on = visual & (image == img)
        grid = np.zeros((int(patch_row[on].max()) + 1, int(patch_col[on].max()) + 1))
        np.add.at(grid, (patch_row[on].astype(int), patch_col[on].astype(int)), values[on])
        grids[int(img)] = grid
    return grids


def sample_attribution(maps: np.ndarray, modality: np.ndarray, image: np.ndarray, patch_row: np.ndarray,
                       patch_col: np.ndarray, block: int) -> dict[str, Any]:
    """Rollout and pooled max-flow from one sample's last position (maps: [L, n, n])."""
    last = len(modality) - 1
    rows = rollout(maps, last)
    groups = span_groups(modality, image, patch_row, patch_col, block)
    flows = max_flows(pooled_capacities(maps, groups), int(groups[last]))
    # A&Z normalise the flows of a source over its inputs; a pooled group's share is spread
    # evenly over its positions for per-token and per-patch display
    sizes = np.bincount(groups)
    flow_tokens = flows[groups] / sizes[groups] / max(flows.sum(), 1e-12)
    visual = modality == "visual"
    return {"rollout": _per_modality(rows[0], modality),
            "rollout_visual_by_depth": rows[:, visual].sum(1),
            "flow": _per_modality(flow_tokens, modality),
            "rollout_patches": _patch_grid(rows[0], modality, image, patch_row, patch_col),
            "flow_patches": _patch_grid(flow_tokens, modality, image, patch_row, patch_col),
            "flow_nodes": int(len(sizes))}


def _mean_grids(grids: list[dict[int, np.ndarray]]) -> list[list[list[float]]]:
    """Mean per image index over the samples with a grid of the same shape as the first."""
    out = []
    for img in sorted({k for g in grids for k in g}):
        found = [g[img] for g in grids if img in g]
        same = [g for g in found if g.shape == found[0].shape]
        out.append(np.mean(same, 0).round(6).tolist())
    return out


def attribution(maps: list[np.ndarray], trace: xr.Dataset, block: int = 0) -> dict[str, Any]:
    """Rollout and flow from each sample's last position, averaged over samples, per modality
    and per visual patch. ``maps[s]``: sample s's head-mean maps [L, n_s, n_s]; ``block`` 0
    chooses the pooling with ``auto_block``."""
    block = block or auto_block(trace["patch_row"].values, trace["patch_col"].values)
    per_sample = []
    for s, sample_maps in enumerate(maps):
        n = sample_maps.shape[-1]
        coords = [trace[c].isel(sample=s).values[:n] for c in ("modality", "image", "patch_row", "patch_col")]
        per_sample.append(sample_attribution(sample_maps, *coords, block=block))
    mean = {k: {g: float(np.mean([p[k][g] for p in per_sample])) for g in GROUPS} for k in ("rollout", "flow")}
    return {"rollout": {"by_modality": mean["rollout"],
                        "visual_by_depth": np.mean([p["rollout_visual_by_depth"] for p in per_sample], 0)
                        .round(6).tolist(),
                        "patches": _mean_grids([p["rollout_patches"] for p in per_sample])},
            "maxflow": {"by_modality": mean["flow"],
                        "patches": _mean_grids([p["flow_patches"] for p in per_sample]),
                        "block": block, "nodes_per_layer": max(p["flow_nodes"] for p in per_sample),
                        "note": "visual tokens pooled into block x block patch blocks "
                                "(an upper bound of token-level max-flow)"},
            "source": "last prompt position", "samples": len(per_sample)}
