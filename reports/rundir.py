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
from attnflow.probes.io import load_trace
from attnflow.reducers.schedule import ScheduleError, load_schedule

TRACE, FINDINGS, SCHEDULE, VERDICT, RUN = "trace.nc", "findings.json", "schedule.json", "verdict.json", "run.json"


class ReportError(ValueError):
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
    except (FindingsError, ScheduleError) as exc:
        raise ReportError(str(exc)) from exc
    model = findings.get("model") or {}
    if model.get("fingerprint") and trace.attrs.get("fingerprint") != model["fingerprint"]:
        raise ReportError(f"{str(folder)!r}: findings.json was made from another model "
                          f"({model['fingerprint']}) than trace.nc ({trace.attrs.get('fingerprint')})")
    if schedule is not None and schedule["model"]["fingerprint"] != trace.attrs.get("fingerprint"):
        raise ReportError(f"{str(folder)!r}: schedule.json was made for another model "
                          f"({schedule['model']['fingerprint']}) than trace.nc ({trace.attrs.get('fingerprint')})")
    return Run(folder, trace, findings, schedule, _json(folder / VERDICT), _json(folder / RUN))
