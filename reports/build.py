"""build(run_dir): the figures and ``report.pdf`` of a run directory, from its files alone.

The PDF is typeset with the ``typst`` package (offline, no @preview packages, only typst's
embedded fonts so the output does not depend on the machine's fonts). The template and its
data (``report.json``) are placed in a temporary folder inside the run directory, which is
typst's root, so the template reaches the figures as ``/figures/...``; the PDF is written
atomically and the temporary folder is removed.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

import typst

from attnflow.fileio import atomic_path, write_json
from attnflow.reports.content import report_data
from attnflow.reports.figures import write_figures
from attnflow.reports.rundir import ReportError, load_run

PDF = "report.pdf"


def build(run_dir: str | Path, *, svg: bool = False) -> Path:
    """Redraw the figures of ``run_dir`` (also as SVG with ``svg``) and typeset
    ``run_dir/report.pdf``; returns its path."""
    run = load_run(run_dir)
    figures = write_figures(run, ("png", "svg") if svg else ("png",))
    work = Path(tempfile.mkdtemp(prefix=".report-", dir=run.dir))
    try:
        shutil.copyfile(resources.files("attnflow.reports") / "template.typ", work / "report.typ")
        write_json(work / "report.json", report_data(run, figures))
        try:
            pdf = typst.compile(str(work / "report.typ"), root=str(run.dir), ignore_system_fonts=True)
        except RuntimeError as exc:
            raise ReportError(f"typst could not typeset the report of {str(run.dir)!r}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with atomic_path(run.dir / PDF) as tmp:
        tmp.write_bytes(pdf)
    return run.dir / PDF
