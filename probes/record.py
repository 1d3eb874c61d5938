"""record(): run a model on inputs under nnsight and reduce attention and residual
statistics inside the trace into a Trace (see attnflow.probes.schema for the contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import nnsight
import numpy as np
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

import attnflow
from attnflow import compat, parallel
from attnflow.probes import adapters, onepass
from attnflow.probes.inputs import Example, InputError, as_examples, check_images, encode, file_sha256, placeholder
from attnflow.probes import schema
from attnflow.probes.schema import GROUPS, SCHEMA_VERSION
from attnflow.probes.spans import Spans, token_spans
from attnflow.probes.stats import Layout, attention_stats, hidden_stats, no_attention_stats

# what the reductions return per layer, stacked along the schema's layer dim
LAYER_FIELDS = ("received", "uniform", "n_seen", "last_row", "flow", "arank", "update_cos", "max_abs",
                "argmax_dim", "median_abs", "rms", "topk_abs", "topk_dim")


def _submodule(envoy: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        envoy = getattr(envoy, name)
    return envoy


def _n_answer(processor: Any, examples: list[Example], with_answer: bool) -> list[int] | None:
    if not with_answer:
        return None
    tok = getattr(processor, "tokenizer", processor)
    return [len(tok(ex.answer, add_special_tokens=False)["input_ids"]) if ex.answer else 0 for ex in examples]


def _trace_batch(nm: nnsight.NNsight, model: nn.Module, batch: dict, layout: Layout, *,
                 level: str, full_layers: set[int], chunk: int, rank_max_tokens: int, fused: bool) -> dict[str, torch.Tensor]:
    """One nnsight trace of one batch; returns each reduced field stacked over the layers, [B, L, ...]
    on the CPU ("attn": over the layers whose full map was kept)."""
    adapter = adapters.adapter_for(model)
    eager = adapters.attn_implementation(model) == "eager"
    envoys = _submodule(nm, adapters.layers_path(model))
    attention = adapters.attention_modules(model)
    heads = adapters.dims(model)["num_heads"]
    modules = {m: i for i, m in enumerate(attention) if m is not None}
    state = onepass.Pass(layout, modules, full_layers, chunk, rank_max_tokens, fused)
    results: list[dict] = []
    with torch.no_grad(), onepass.one_pass(state), nm.trace(**batch):
        for i, layer in enumerate(envoys):
            h_in = layer.inputs[0][0]
            keep_full = level == "full" and i in full_layers
            if attention[i] is None:  # a linear-attention layer: hidden-state statistics only
                stats = no_attention_stats(layout, heads, keep_full=keep_full)
            elif eager:  # the weights the model returned
                call = compat.attention_call(_submodule(layer, adapter.attention))
                args, kwargs = call.inputs
                stats = attention_stats(layout, weights=call.output[1], mask=args[4], chunk=chunk,
                                        keep_full=keep_full, rank_max_tokens=rank_max_tokens)
            else:  # computed in the layer's one attention pass (attnflow.probes.onepass)
                stats = compat.attention_call(_submodule(layer, adapter.attention)).output[1]
            h_out = compat.layer_hidden(layer.output)
            stats.update(hidden_stats(h_in, h_out))
            rows = torch.arange(h_in.shape[0], device=h_in.device)
            stats["resid_in_last"] = h_in[rows, layout.last].float()
            stats["resid_out_last"] = h_out[rows, layout.last].float()
            results.append(nnsight.save({k_: v.detach() for k_, v in stats.items()}))
    # stacked on the device: one host copy per field, not per field and layer (each copy waits for the device)
    stacked = {name: torch.stack([r[name] for r in results], 1) for name in set(results[0]) - {"attn"}}
    kept = [r["attn"] for r in results if "attn" in r]
    if kept:
        stacked["attn"] = torch.stack(kept, 1)
    return _to_host(stacked)


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU; from a GPU into pinned memory without waiting per tensor (a
    pageable copy is synchronous and moves a few GB/s), then one wait for them all."""
    if not tensors or next(iter(tensors.values())).device.type != "cuda":
        return {name: t.cpu() for name, t in tensors.items()}
    host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for name, t in tensors.items()}
    torch.cuda.current_stream().synchronize()
    return host


def _left_align(x: np.ndarray, real: np.ndarray, T: int, fill: Any) -> np.ndarray:
    """Move each sample's real positions (last axis) to the front, padded to length T."""
    out = np.full(x.shape[:-1] + (T,), fill, dtype=x.dtype)
    for b in range(x.shape[0]):
        idx = np.flatnonzero(real[b])
        out[b, ..., : idx.size] = np.take(x[b], idx, axis=-1)
    return out


def _batch_dataset(layers: dict[str, torch.Tensor], spans: Spans, ids: np.ndarray, real: np.ndarray,
                   tokens: list[list[str]], full_layers: list[int]) -> dict[str, np.ndarray]:
    """One batch's layer-stacked tensors as numpy arrays in the schema's dim order, positions
    left-aligned per sample."""
    T = int(real.sum(1).max())
    arrays: dict[str, np.ndarray] = {}
    for name in LAYER_FIELDS:  # [B, L, ...]
        stacked = layers[name].numpy()
        arrays[name] = _left_align(stacked, real, T, np.nan) if schema.padded_axes(name) else stacked
    arrays["resid_last"] = np.concatenate([layers["resid_in_last"][:, :1].numpy(), layers["resid_out_last"].numpy()], 1)
    if full_layers:
        full = _left_align(layers["attn"].numpy(), real, T, np.nan)  # [B, Lf, H, T, T]
        arrays["attn"] = np.moveaxis(_left_align(np.moveaxis(full, -1, -2), real, T, np.nan), -1, -2)
    per_position = {"modality": spans.modality, "image": spans.image, "patch_row": spans.patch_row,
                    "patch_col": spans.patch_col, "token_id": ids,
                    "token": np.array([t + [""] * (ids.shape[1] - len(t)) for t in tokens], dtype=object)}
    for name, values in per_position.items():
        arrays[name] = _left_align(values, real, T, schema.FIELDS[name].fill)
    arrays["length"] = real.sum(1)
    return arrays


def _pad_to(x: np.ndarray, T: int, axes: tuple[int, ...], fill: Any) -> np.ndarray:
    """``x`` padded with ``fill`` to length ``T`` along ``axes`` (the position axes)."""
    if not axes:
        return x
    widths = [(0, 0)] * x.ndim
    for a in axes:
        widths[a] = (0, T - x.shape[a])
    if x.dtype == object:
        out = np.full([s + w[1] for s, w in zip(x.shape, widths)], fill, dtype=object)
        out[tuple(slice(0, s) for s in x.shape)] = x
        return out
    return np.pad(x, widths, constant_values=fill)


def record(
    model: nn.Module,
    inputs: str | Path | Iterable[Example | dict],
    *,
    processor: Any,
    level: str = "summary",
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    with_answer: bool = False,
    chunk: int = 64,
    rank_max_tokens: int = 256,
    fused: bool = True,
    progress: bool = True,
    model_path: str = "",
) -> xr.Dataset:
    """Record per-layer, per-head attention and residual statistics of ``model`` on ``inputs``.

    ``level="summary"`` keeps O(L·H·n) numbers per sample, reduced inside the trace;
    ``level="full"`` also keeps the n×n attention maps of ``layers`` (default: all).
    Works with eager attention (reads the returned weights) and with SDPA/FlashAttention
    (recomputes attention rows from q and k in chunks of ``chunk`` queries). Layers without
    softmax attention (a hybrid model's linear attention) get the hidden-state statistics only:
    their attention fields are NaN, and the ``has_attention`` coordinate says which they are.
    On a GPU with Triton, ``fused`` computes the SDPA statistics with attnflow.probes.fused's
    kernels (no probabilities written; ``False``: the chunked torch path everywhere).
    """
    if level not in ("summary", "full"):
        raise ValueError(f"level must be 'summary' or 'full', not {level!r}")
    adapter = adapters.adapter_for(model)
    examples = as_examples(inputs)
    check_images(examples, placeholder(processor))  # before any batch runs, with the examples' own numbers
    dims = adapters.dims(model)
    L = dims["num_layers"]
    full_layers = sorted(set(range(L) if layers is None else layers)) if level == "full" else []
    bad = [i for i in full_layers if not 0 <= i < L]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {L} layers (0..{L - 1})")
    nm = nnsight.NNsight(model)
    tok = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    world = parallel.world()
    starts = range(0, len(examples), batch_size)
    if len(starts) < world.size:
        raise InputError(f"{len(starts)} batch(es) of {batch_size} for {world.size} processes: use a smaller batch size or fewer "
                         "processes")
    mine = [starts[i] for i in world.share(len(starts))]
    samples = range(mine[0], min(mine[-1] + batch_size, len(examples)))
    chunks: list[dict[str, np.ndarray]] = []
    for s in tqdm(mine, desc="record", unit="batch", disable=not progress or not world.main):
        group = examples[s:s + batch_size]
        batch = encode(processor, group, with_answer=with_answer)
        ids, am = batch["input_ids"], batch.get("attention_mask")
        if am is None:
            am = torch.ones_like(ids)
            batch["attention_mask"] = am
        spans = token_spans(
            ids, am, image_token_id=adapters.image_token_id(model), bos_ids=adapters.bos_ids(model),
            n_images=[len(ex.images) for ex in group], grid_thw=adapters.image_grids(model, batch),
            **adapters.patch_geometry(model), n_answer=_n_answer(processor, group, with_answer))
        real = am.bool()
        prompt = real & torch.as_tensor(spans.modality != "answer")  # the last prompt position predicts the answer
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        layout = Layout(valid=real.to(device), group=torch.as_tensor(spans.group_index()).to(device),
                        last=torch.where(prompt, positions, -1).max(1).values.to(device),
                        n_groups=len(GROUPS), causal=adapter.causal, all_valid=bool(real.all()))
        layers = _trace_batch(nm, model, {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()},
                                 layout, level=level, full_layers=set(full_layers), chunk=chunk,
                                 rank_max_tokens=rank_max_tokens, fused=fused)
        tokens = [tok.convert_ids_to_tokens(row) for row in ids.tolist()]
        chunks.append(_batch_dataset(layers, spans, ids.numpy(), real.numpy(), tokens, full_layers))
    length = max(parallel.gather(max(int(c["length"].max()) for c in chunks)))  # shards share one pos axis
    return _dataset(chunks, [examples[i] for i in samples], model, dims, level, full_layers, model_path, inputs,
                    length, samples, world)


def _dataset(chunks, examples, model, dims, level, full_layers, model_path, inputs, T, samples: range,
             world: parallel.World) -> xr.Dataset:
    per_sample = {"answer": [ex.answer or "" for ex in examples], "qtype": [ex.qtype or "" for ex in examples],
                  "prompt": [ex.prompt for ex in examples]}
    data_vars, coords = {}, {}
    for name, f in schema.FIELDS.items():
        if name in per_sample:
            values = np.array(per_sample[name], dtype=object)
        elif name in chunks[0]:
            values = np.concatenate([_pad_to(c[name], T, schema.padded_axes(name), f.fill) for c in chunks], 0)
        else:
            continue  # an optional field this level does not record
        (coords if f.coord else data_vars)[name] = schema.as_field(name, values)
    coords["rank"] = ("sample", np.full(len(samples), world.rank, dtype=np.int64))
    coords.update({"sample": np.asarray(samples), "layer": np.arange(dims["num_layers"]),
                   "head": np.arange(dims["num_heads"]), "pos": np.arange(T), "src": list(GROUPS),
                   "dst": list(GROUPS), "depth": np.arange(dims["num_layers"] + 1)})
    coords["has_attention"] = schema.as_field("has_attention", np.array(adapters.attention_layers(model)))
    if full_layers:
        coords["layer_full"] = np.array(full_layers)
    attrs = {
        "attnflow_trace": SCHEMA_VERSION,
        "model_path": str(model_path or getattr(model.config, "_name_or_path", "")),
        "model_type": str(model.config.model_type),
        **{k: int(v) for k, v in dims.items()},
        "attn_implementation": adapters.attn_implementation(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "device_map": json.dumps({k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}),
        "fingerprint": adapters.fingerprint(model),
        "attnflow_version": attnflow.__version__,
        "level": level,
        "causal": int(adapters.adapter_for(model).causal),
        "layers_full": json.dumps(full_layers),
        "inputs_path": str(inputs) if isinstance(inputs, (str, Path)) else "",
        "inputs_sha256": file_sha256(inputs) if isinstance(inputs, (str, Path)) else "",
        "world_size": world.size,
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
