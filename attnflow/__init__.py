"""attnflow: how attention flows through vision-language transformers, and the faster models
it suggests. probes -> analyses -> reducers -> reports.

The main API is re-exported lazily (importing attnflow stays cheap, and the subpackages can
import ``attnflow`` for its version without a cycle)::

    model, processor = attnflow.load_model("toy-vlm")
    trace = attnflow.record(model, "inputs.jsonl", processor=processor)
    findings = attnflow.analyze(trace, model, "inputs.jsonl", processor=processor)
    schedule = attnflow.derive(findings, model, "inputs.jsonl", processor)
    with attnflow.apply(model, schedule):
        model.generate(...)
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
# The bundled model `attnflow run` and `make demo` use unless told otherwise (README: "The scene VLMs").
DEFAULT_MODEL = "toy-llava-scenes"

_EXPORTS = {
    "load_model": "attnflow.models",
    "record": "attnflow.probes.record",
    "save_trace": "attnflow.probes.io",
    "load_trace": "attnflow.probes.io",
    "analyze": "attnflow.analyses.analyze",
    "Findings": "attnflow.analyses.findings",
    "derive": "attnflow.reducers.derive",
    "Budget": "attnflow.reducers.derive",
    "apply": "attnflow.reducers.apply",
    "verify": "attnflow.reducers.verify",
    "load_schedule": "attnflow.reducers.schedule",
    "build_report": ("attnflow.reports.build", "build"),
    "run": "attnflow.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'attnflow' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(import_module(module), attr)
