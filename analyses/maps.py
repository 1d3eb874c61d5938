"""Head-mean attention maps of every layer, for rollout and attention flow.

From the trace when it was recorded at level ``full`` for all layers; otherwise from one
extra forward pass of the model with eager attention switched on for that pass only (the
previous attention implementation of every sub-model is restored afterwards), where a
forward hook on each attention module keeps only the head mean: L·n² numbers per sample
instead of the L·H·n² of full per-head maps.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import reduce
from typing import Any, Iterator

import numpy as np
import torch
import xarray as xr
from torch import nn

from attnflow import parallel
from attnflow.analyses.batches import aligned_batches
from attnflow.probes import adapters
from attnflow.probes.inputs import Example
from attnflow.probes.schema import attention_layers


def _prompt_length(trace: xr.Dataset, s: int) -> int:
    """Real positions of sample ``s`` before any appended answer (answers come last)."""
    modality = trace["modality"].isel(sample=s).values
    return int(np.isin(modality, ("pad", "answer"), invert=True).sum())


def trace_maps(trace: xr.Dataset) -> list[np.ndarray] | None:
    """Per sample, head-mean maps [L, n, n] over its prompt positions, from the trace's full
    maps; None unless every layer's map was recorded (and every layer has one: a hybrid
    model's linear-attention layers do not)."""
    if "attn" not in trace or json.loads(trace.attrs.get("layers_full", "[]")) != list(range(trace.sizes["layer"])):
        return None
    if not attention_layers(trace).all():
        return None
    attn = trace["attn"].transpose("sample", "layer_full", "head", "q", "k")
    out = []
    for s in range(trace.sizes["sample"]):  # one sample's maps at a time: a lazy trace never loads them all
        n = _prompt_length(trace, s)
        out.append(attn.isel(sample=s, q=slice(0, n), k=slice(0, n)).values.mean(1).astype(np.float64))
    return out


def _implementations(config: Any) -> dict[str, Any]:
    """The attention implementation of ``config`` and, nested, of each of its sub-configs."""
    subs = {k: _implementations(getattr(config, k)) for k in getattr(config, "sub_configs", {})
            if getattr(config, k, None) is not None}
    return {"": config._attn_implementation, **subs}


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block, restoring every sub-model's
    implementation afterwards."""
    before = _implementations(model.config)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def model_maps(model: nn.Module, processor: Any, trace: xr.Dataset, examples: list[Example],
               batch_size: int = 1) -> list[np.ndarray]:
    """Per sample, head-mean maps [L, n, n] over its prompt positions from one eager pass (under
    a launcher each rank maps its block of the batches, and all get every sample's maps)."""
    attention = adapters.adapter_for(model).attention.split(".")
    modules = [reduce(getattr, attention, layer) for layer in adapters.decoder_layers(model)]
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def keep_mean(module: nn.Module, args: tuple, output: tuple) -> None:
        captured.append(output[1].float().mean(1).cpu())

    out: list[np.ndarray] = []
    handles = [m.register_forward_hook(keep_mean) for m in modules]
    try:
        with eager_attention(model), torch.no_grad():
            for batch in aligned_batches(trace, processor, examples, batch_size):
                captured.clear()
                model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()})
                maps = torch.stack(captured, 1).numpy()  # [B, L, T, T]
                out += [maps[b][:, where][:, :, where].astype(np.float64) for b, where in enumerate(batch.positions)]
    finally:
        for h in handles:
            h.remove()
    return parallel.concat(out)
