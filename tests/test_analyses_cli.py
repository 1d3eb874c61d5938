"""`attnflow analyze` on a recorded trace: findings written, overrides applied, bad input
reported in one line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from attnflow.cli import app
from attnflow.models import default_inputs, load_model
from attnflow.probes.io import save_trace
from attnflow.probes.record import record


def test_analyze_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_CACHE", str(tmp_path / "cache"))
    model, processor = load_model("toy-llava")
    trace = save_trace(record(model, default_inputs("toy-llava"), processor=processor, progress=False),
                       tmp_path / "trace.nc")
    out = tmp_path / "findings.json"
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", str(trace), "--model", "toy-llava", "--out", str(out),
                                 "-t", "sink_ratio=2.5", "-t", "knockout_metric=answer_prob"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["thresholds"]["sink_ratio"] == 2.5 and data["exit"]["criterion"] == "knockout"
    assert data["exit"]["layers"]["knockout"]["metric"] == "answer_prob"
    result = runner.invoke(app, ["analyze", str(trace), "--model", "toy-llama", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "another model" in result.output
    assert not (tmp_path / "x.json").exists()
    result = runner.invoke(app, ["analyze", str(trace), "-t", "sink_ratoi=3"])
    assert result.exit_code == 2 and "sink_ratoi" in result.output
