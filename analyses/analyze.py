"""analyze(): a Trace (and optionally its model and inputs) in, Findings out.

Trace-only parts always run: sinks, redundancy, the observational exit curve, the flow
matrix. With the model: the logit lens (from the trace's residual stream). With the model,
its processor and the trace's inputs: the knockout exit and, unless the trace holds full
maps of every layer, one eager pass for rollout and attention flow. Every threshold comes
from ``Thresholds`` and is written into the Findings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import xarray as xr
from torch import nn

from attnflow.analyses import flow as flow_mod
from attnflow.analyses.batches import trace_examples
from attnflow.analyses.exits import find_exit
from attnflow.analyses.findings import Findings
from attnflow.analyses.groups import has_visual
from attnflow.analyses.knockout import knockout
from attnflow.analyses.lens import logit_lens
from attnflow.analyses.maps import model_maps, trace_maps
from attnflow.analyses.redundancy import find_redundancy
from attnflow.analyses.sinks import find_sinks
from attnflow.analyses.thresholds import Thresholds
from attnflow.analyses.validate import check_model, check_trace
from attnflow.probes import adapters
from attnflow.probes.inputs import Example
from attnflow.probes.io import load_trace
from attnflow.probes.schema import attention_layers


class _Clock:
    """Seconds spent per part, for ``Findings.costs``."""

    def __init__(self) -> None:
        self.costs: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.costs[name] = round(time.perf_counter() - start, 4)
        return out


def _inputs_of(trace: xr.Dataset, inputs: Any) -> Any:
    """The inputs passed, else the file the trace was recorded from when it still exists."""
    if inputs is not None:
        return inputs
    path = trace.attrs.get("inputs_path", "")
    return path if path and Path(path).is_file() else None


def _provenance(trace: xr.Dataset, source: str) -> dict[str, Any]:
    keys = ("model_path", "inputs_path", "inputs_sha256", "level", "attn_implementation", "dtype", "world_size",
            "attnflow_version", "attnflow_trace")
    values = {k: trace.attrs.get(k) for k in keys}
    return {"path": source, "samples": int(trace.sizes["sample"]),
            **{k: v.item() if hasattr(v, "item") else v for k, v in values.items()}}


def analyze(trace: xr.Dataset | str | Path, model: nn.Module | None = None,
            inputs: str | Path | Iterable[Example | dict] | None = None, *, processor: Any = None,
            batch_size: int = 8, attribution: bool = True, chunks: int | None = None,
            **thresholds: Any) -> Findings:
    """Analyse ``trace`` (a Dataset or a .nc path) into Findings.

    ``model`` must be the model the trace was recorded from (else TraceMismatchError);
    ``inputs`` (default: the trace's own inputs file, if it still exists) and ``processor``
    enable the knockout and, for summary traces, rollout/flow. ``thresholds`` override
    ``Thresholds`` fields by name; ``attribution=False`` skips rollout and max-flow. A path is
    read whole, or with ``chunks`` lazily that many samples at a time (dask: for traces larger
    than memory). Under a launcher (attnflow.parallel) the model-driven parts split their
    batches across ranks and every rank returns the same Findings.
    """
    source = str(trace) if isinstance(trace, (str, Path)) else ""
    if source:
        trace = load_trace(source, chunks=chunks)
    check_trace(trace)
    th = Thresholds.from_kwargs(**thresholds)
    clock = _Clock()
    examples = None
    if model is not None:
        check_model(trace, model)
        inputs = _inputs_of(trace, inputs)
        if inputs is not None:
            if processor is None:
                raise ValueError("the knockout re-encodes the inputs: pass the model's processor "
                                 "(processor=...) with the model and inputs")
            examples = trace_examples(trace, inputs)

    sinks = clock.run("sinks", find_sinks, trace, th)
    redundancy = clock.run("redundancy", find_redundancy, trace, th)

    ko = lens = None
    notes: list[str] = []
    if model is not None and has_visual(trace):
        if examples is not None:
            ko = clock.run("knockout", knockout, model, processor, trace, examples, th, batch_size)
        else:
            notes.append("knockout skipped: no inputs given and the trace's inputs file is not found")
        if (trace["modality"] == "answer").any():
            notes.append("logit lens skipped: the trace was recorded with appended answers, so its "
                         "last position is not the one that predicts the answer")
        else:
            lens = clock.run("logit_lens", logit_lens, model, trace, processor, th)
    exit_ = find_exit(trace, th, ko, lens)
    if notes:
        exit_["notes"] = notes + exit_.get("notes", [])

    flow = flow_mod.flow_matrix(trace)
    linear = np.flatnonzero(~attention_layers(trace)).tolist()
    if attribution:
        maps = trace_maps(trace)
        if maps is None and examples is not None and not linear:
            maps = clock.run("attention_maps", model_maps, model, processor, trace, examples)
        if maps is not None:
            flow["attribution"] = clock.run("rollout_and_flow", flow_mod.attribution, maps, trace,
                                            th.flow_block)
        else:
            flow["attribution"] = None
            flow["attribution_note"] = "rollout and flow need every layer's attention map: " + (
                f"layers {linear} have none (linear attention)" if linear else
                "record with --level full, or pass the model, processor and inputs")

    num_layers = int(trace.attrs.get("num_layers", trace.sizes["layer"]))
    model_info = {"model_type": trace.attrs.get("model_type"), "fingerprint": trace.attrs.get("fingerprint"),
                  "num_layers": num_layers, "num_heads": int(trace.sizes["head"]),
                  "causal": bool(int(trace.attrs.get("causal", 1)))}
    if model is not None:
        model_info["checked_against"] = adapters.fingerprint(model)
    return Findings(sinks=sinks, redundancy=redundancy, exit=exit_, flow=flow, thresholds=th.to_dict(),
                    model=model_info, trace=_provenance(trace, source), costs=clock.costs)
