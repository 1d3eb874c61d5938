"""The files of a run directory that reports read, loaded and checked once.

A run directory (what ``attnflow run`` writes) holds ``trace.nc`` and ``findings.json``
(required: every section starts from them), and optionally ``schedule.json``,
``verdict.json`` and ``run.json`` (the command and versions of the run). Reports only read
these files; a missing optional file makes its sections say so instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from attnflow.analyses.findings import Findings, FindingsError
from attnflow.errors import UserError
from attnflow.probes.io import load_trace
from attnflow.reducers.schedule import ScheduleError, load_schedule
from attnflow.reducers.verdict import VerdictError, load_verdict

TRACE, FINDINGS, SCHEDULE, VERDICT, RUN = "trace.nc", "findings.json", "schedule.json", "verdict.json", "run.json"


class ReportError(UserError, ValueError):
    """The run directory cannot be reported on: the message names the file and the problem."""


@dataclass
class Run:
    """What a report is built from; ``schedule``, ``verdict`` and ``meta`` may be absent."""

    dir: Path
    trace: xr.Dataset
    findings: dict[str, Any]
    schedule: dict[str, Any] | None = None
    verdict: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None

    def why_missing(self, stage: str, file: str) -> str:
        """Why the run has no ``file``: the reason run.json gives for skipping ``stage``, else
        that the file is absent and which command makes it."""
        reason = ((self.meta or {}).get("skipped") or {}).get(stage)
        return reason or f"no {file} in the run (attnflow {stage} makes it)"


def _json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, None when the file is absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{str(path)!r} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{str(path)!r} must hold a JSON object, not {type(data).__name__}")
    return data


def load_run(run_dir: str | Path) -> Run:
    """Load and check the files of ``run_dir``; a missing trace or findings is a ReportError."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ReportError(f"run directory {str(folder)!r} does not exist")
    for name in (TRACE, FINDINGS):
        if not (folder / name).is_file():
            raise ReportError(f"{str(folder)!r} has no {name}: a report needs the trace and the findings "
                              "(attnflow record / attnflow analyze, or attnflow run)")
    trace = load_trace(folder / TRACE)
    try:
        findings = Findings.load(folder / FINDINGS).to_dict()
        schedule = load_schedule(folder / SCHEDULE).to_dict() if (folder / SCHEDULE).is_file() else None
        verdict = load_verdict(folder / VERDICT).to_dict() if (folder / VERDICT).is_file() else None
    except (FindingsError, ScheduleError, VerdictError) as exc:
        raise ReportError(str(exc)) from exc
    for name, data in ((FINDINGS, findings), (SCHEDULE, schedule), (VERDICT, verdict)):
        made_for = (data or {}).get("model", {}).get("fingerprint")
        if data is not None and made_for != trace.attrs.get("fingerprint"):
            raise ReportError(f"{str(folder)!r}: {name} was made for another model ({made_for}) "
                              f"than trace.nc ({trace.attrs.get('fingerprint')})")
    return Run(folder, trace, findings, schedule, verdict, _json(folder / RUN))
