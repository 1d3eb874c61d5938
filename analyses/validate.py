"""Checks that a Trace can be analysed, and analysed together with a given model.

A trace from another schema version, one missing the summary variables, or one recorded
from a different model than the one passed for interventions is refused with an error that
names the problem: numbers computed from a mismatched pair would look valid and be wrong.
"""

from __future__ import annotations

import xarray as xr
from torch import nn

from attnflow.probes import adapters
from attnflow.probes.io import TraceError
from attnflow.probes import schema

class TraceMismatchError(TraceError):
    """The trace cannot be analysed (schema version, missing data, or another model or
    inputs than the ones passed). A TraceError, so the CLI reports it as bad input."""


def check_trace(trace: xr.Dataset) -> None:
    """Raise TraceMismatchError unless ``trace`` follows this version of the Trace contract."""
    wrong = schema.problems(trace)
    if wrong:
        raise TraceMismatchError("this trace cannot be analysed: " + "; ".join(wrong))


def check_model(trace: xr.Dataset, model: nn.Module) -> None:
    """Raise TraceMismatchError unless ``trace`` was recorded from ``model``'s config."""
    expected = adapters.fingerprint(model)
    found = trace.attrs.get("fingerprint")
    if found != expected:
        raise TraceMismatchError(
            f"trace was recorded from another model (fingerprint {found}, "
            f"model {trace.attrs.get('model_path', '?')!r}) than the one passed "
            f"(fingerprint {expected}); pass the model the trace was recorded from")
    layers = len(adapters.decoder_layers(model))
    if int(trace.attrs.get("num_layers", layers)) != layers:
        raise TraceMismatchError(f"trace has {trace.attrs['num_layers']} layers, model {layers}")
