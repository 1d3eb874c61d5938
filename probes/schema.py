"""The Trace contract (probes -> analyses): one table of every variable and coordinate.

A Trace is one ``xarray.Dataset`` per recording, saved as ``.nc`` (h5netcdf). Positions are
left-aligned per sample (``pos`` 0 is each sample's first real token); positions past a
sample's length hold each field's ``fill`` (modality ``pad``, NaN statistics). Layers are
numbered 0..L-1 as in the model's decoder-layer list. A denotes a layer's post-softmax
attention (head-resolved). ``record`` builds the Dataset from ``FIELDS`` (dims, dtype, fill),
``check`` (used by ``io.load_trace`` and the analyses) validates one against it, and the tests
read the same table: nothing here is written twice.

Attrs: SCHEMA_VERSION under ``attnflow_trace``; ``model_path``, ``model_type``,
``num_layers``, ``num_heads``, ``num_kv_heads``, ``hidden_size``, ``intermediate_size`` (the
MLP width, for the cost model), ``attn_implementation``, ``dtype``, ``device`` (of the first
parameter), ``device_map`` (JSON; accelerate's map, {} on one device), ``fingerprint`` (sha256
of the config JSON), ``attnflow_version``, ``level``, ``causal`` (0/1), ``inputs_path``,
``inputs_sha256``, ``layers_full`` (JSON list), ``world_size`` (how many processes recorded it,
each a contiguous block of samples: the ``rank`` coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

SCHEMA_VERSION = 2  # 2: entropy and norm dropped (nothing read them)
MODALITIES: tuple[str, ...] = ("bos", "system", "text", "visual", "answer", "pad")
GROUPS: tuple[str, ...] = ("bos", "system", "text", "visual", "answer")
NO_PATCH = -1
POSITION_DIMS = ("pos", "q", "k")  # padded to the longest sample


@dataclass(frozen=True)
class Field:
    """One variable (``coord=False``) or coordinate of a Trace."""

    dims: tuple[str, ...]
    dtype: str
    meaning: str
    fill: Any = np.nan
    required: bool = True
    coord: bool = False


_SLHP = ("sample", "layer", "head", "pos")
_SLP = ("sample", "layer", "pos")
_SP = ("sample", "pos")

FIELDS: dict[str, Field] = {
    "received": Field(_SLHP, "float32", "mean of A[q, pos] over the real queries q that can see key pos "
                      "(causal: q >= pos; bidirectional: all)"),
    "uniform": Field(_SLP, "float32", "what received would be under uniform attention: mean over the queries "
                     "that see pos of 1 / |keys that query sees|"),
    "n_seen": Field(_SLP, "float32", "how many real queries see key pos"),
    "last_row": Field(_SLHP, "float32", "A[last prompt position, pos] (the last real, non-answer position: "
                      "the one that predicts the answer)"),
    "flow": Field(("sample", "layer", "head", "src", "dst"), "float32",
                  "mean over queries of modality src of the attention they pay to keys of modality dst "
                  "(NaN when the sample has no src query)"),
    "arank": Field(("sample", "layer", "head"), "float32", "numerical rank of the attention map with its "
                   "diagonal zeroed (gamma-MoD ARank, arXiv 2410.13859); NaN past rank_max_tokens"),
    "update_cos": Field(_SLP, "float32", "cos(layer input, layer output) of the residual stream"),
    "max_abs": Field(_SLP, "float32", "max |x| of the layer's output hidden state (pre final norm)"),
    "argmax_dim": Field(_SLP, "float32", "the hidden dimension holding max |x|"),
    "median_abs": Field(_SLP, "float32", "median |x| of the output hidden state"),
    "rms": Field(_SLP, "float32", "root mean square of the output hidden state"),
    "topk_abs": Field(("sample", "layer", "rank", "pos"), "float32", "the 3 largest |x| of the output hidden "
                      "state (a token can carry several massive dimensions)"),
    "topk_dim": Field(("sample", "layer", "rank", "pos"), "float32", "their hidden dimensions"),
    "resid_last": Field(("sample", "depth", "hidden"), "float32", "the residual stream at the last prompt "
                        "position; depth 0 = embeddings ... depth L = last layer's output (pre final norm)"),
    "attn": Field(("sample", "layer_full", "head", "q", "k"), "float32",
                  "full attention maps of the layers in layer_full (level 'full' only)", required=False),
    "modality": Field(_SP, "str", f"one of {MODALITIES}", fill="pad", coord=True),
    "token": Field(_SP, "str", "the token's text", fill="", coord=True),
    "token_id": Field(_SP, "int64", "the token's id", fill=-1, coord=True),
    "image": Field(_SP, "int64", "which of the sample's images a visual token belongs to (-1: none)",
                   fill=-1, coord=True),
    "patch_row": Field(_SP, "int64", "a visual token's patch row (-1: none)", fill=NO_PATCH, coord=True),
    "patch_col": Field(_SP, "int64", "a visual token's patch column (-1: none)", fill=NO_PATCH, coord=True),
    "has_attention": Field(("layer",), "bool", "whether the layer has softmax attention; a hybrid model's "
                           "linear-attention layers have none, and NaN in every attention field (received, "
                           "uniform, n_seen, last_row, flow, arank, attn); absent: all layers have it",
                           fill=True, required=False, coord=True),
    "length": Field(("sample",), "int64", "real tokens in the sample", coord=True),
    "rank": Field(("sample",), "int64", "the process (torch.distributed rank) that recorded the sample; 0 in a "
                  "one-process recording", fill=0, required=False, coord=True),
    "answer": Field(("sample",), "str", "the expected answer ('' when the input has none)", coord=True),
    "qtype": Field(("sample",), "str", "the question type ('' when the input has none)", coord=True),
    "prompt": Field(("sample",), "str", "the prompt text as given", coord=True),
}


def attention_layers(trace: xr.Dataset) -> np.ndarray:
    """Bool per layer of ``trace``: whether it has softmax attention (all True for a trace
    without the optional ``has_attention`` coordinate)."""
    if "has_attention" in trace.coords:
        return trace["has_attention"].values.astype(bool)
    return np.ones(trace.sizes["layer"], dtype=bool)


def padded_axes(name: str) -> tuple[int, ...]:
    """The axes of field ``name`` that run over positions (padded to the longest sample)."""
    return tuple(i for i, d in enumerate(FIELDS[name].dims) if d in POSITION_DIMS)


def as_field(name: str, values: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """(dims, values in the field's dtype): one entry of a Dataset's data_vars or coords."""
    f = FIELDS[name]
    return f.dims, values.astype(str if f.dtype == "str" else f.dtype)


def problems(trace: xr.Dataset) -> list[str]:
    """What keeps ``trace`` from following this schema (empty when it does)."""
    version = trace.attrs.get("attnflow_trace")
    if version is None:
        return ["it is not an attnflow trace (no 'attnflow_trace' attr)"]
    if int(version) != SCHEMA_VERSION:
        return [f"it uses trace schema {version}; this attnflow reads schema {SCHEMA_VERSION}: record it again"]
    out = []
    for name, f in FIELDS.items():
        where = trace.coords if f.coord else trace.data_vars
        if name not in where:
            if f.required:
                out.append(f"it lacks the {'coordinate' if f.coord else 'variable'} {name!r}")
        elif tuple(where[name].dims) != f.dims:
            out.append(f"{name!r} has dims {tuple(where[name].dims)}, not {f.dims}")
    return out
