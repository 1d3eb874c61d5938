"""The Findings contract (analyses -> reducers, reports): plain data with a JSON form.

Keys other folders and outside checks rely on:

- ``sinks.tokens``: ``[{layer, pos, token, modality, share, frequency, ratio, heads}]``, one
  per (layer, position) judged an attention sink (``share``: mean raw attention share the
  key receives in its sink head; ``ratio``: that over the uniform-attention share;
  ``frequency``: fraction of the samples in which it is a sink);
  ``sinks.dims``: the massive-activation dimensions (most frequent first); ``sinks.massive``;
  ``sinks.visual``: visual sinks (by attention and/or VAR's phi); ``sinks.head_scores``.
- ``redundancy.block_influence.{all,text,visual}``: one number per layer (null: no token);
  ``redundancy.candidates``: layers, most redundant first; ``angular_distance[n-1][l]``;
  ``attention_rank``.
- ``exit.layer`` (null when it does not apply), ``exit.criterion``,
  ``exit.curves.{observational,knockout,logit_lens}`` (one number per layer; the last two
  null without a model), ``exit.layers.<criterion>.{layer,tolerance}``.
- ``flow.matrix`` [layer][src][dst] with ``flow.labels``; ``flow.attribution`` (rollout and
  max-flow from the last position) when attention maps were available.
- ``thresholds`` (every threshold used), ``model`` {model_type, fingerprint, num_layers},
  ``trace`` (provenance), ``costs`` (seconds per part).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from attnflow.errors import UserError
from attnflow.fileio import read_json, write_json

FINDINGS_VERSION = 1


class FindingsError(UserError, ValueError):
    """A file is not a readable attnflow findings file of this version."""


@dataclass
class Findings:
    """What the analyses found in one trace (see the module docstring for the keys)."""

    sinks: dict[str, Any]
    redundancy: dict[str, Any]
    exit: dict[str, Any]
    flow: dict[str, Any]
    thresholds: dict[str, Any]
    model: dict[str, Any]
    trace: dict[str, Any]
    costs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"attnflow_findings": FINDINGS_VERSION, **asdict(self)}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write the JSON to ``path`` atomically."""
        return write_json(path, self.to_dict())

    @property
    def exit_applies(self) -> bool:
        """Whether the exit analysis applies (the trace has visual tokens)."""
        return bool(self.exit["applies"])

    @classmethod
    def load(cls, source: "str | Path | dict[str, Any] | Findings") -> "Findings":
        """Findings from a findings file, its JSON dict or a Findings; another version, a damaged
        file or a missing section is a FindingsError naming the source."""
        if isinstance(source, Findings):
            return source
        source, name = read_json(source, FindingsError, "findings file")
        data = dict(source) if isinstance(source, dict) else {}
        version = data.pop("attnflow_findings", None)
        if version != FINDINGS_VERSION:
            raise FindingsError(f"{name!r} is not an attnflow findings file of version "
                                f"{FINDINGS_VERSION} (found {version!r}): analyze the trace again")
        required = [f.name for f in fields(cls) if f.name != "costs"]
        missing = [k for k in required if not isinstance(data.get(k), dict)]
        if missing or not isinstance(data["exit"].get("applies"), bool):
            raise FindingsError(f"{name!r} lacks the section(s) {missing or ['exit.applies']}: analyze the trace again")
        try:
            return cls(**data)
        except TypeError as exc:
            raise FindingsError(f"{name!r} has unexpected keys: {exc}") from exc
