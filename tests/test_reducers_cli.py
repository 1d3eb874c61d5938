"""`attnflow schedule` and `attnflow verify`: files written, bad schedules reported in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnflow.cli import app
from attnflow.models import default_inputs, load_model
from attnflow.reducers import Schedule, load_schedule


def test_schedule_and_verify_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_CACHE", str(tmp_path / "cache"))
    model, _ = load_model("toy-llava")
    findings = tmp_path / "findings.json"
    findings.write_text(json.dumps({
        "attnflow_findings": 1, "flow": {}, "thresholds": {}, "model": {},
        "trace": {"model_path": "toy-llava", "inputs_path": str(default_inputs("toy-llava"))},
        "exit": {"applies": True, "layer": 2, "criterion": "observational",
                 "layers": {"observational": {"layer": 2, "tolerance": 0.1}},
                 "curves": {"observational": [0.5, 0.4, 0.1]}},
        "redundancy": {"candidates": [2]}, "sinks": {"visual": []}}))
    runner = CliRunner()
    out = tmp_path / "schedule.json"
    result = runner.invoke(app, ["schedule", str(findings), "--out", str(out), "--max-kl", "0.05"])
    assert result.exit_code == 0, result.output
    derived = load_schedule(out)
    assert derived.derived_from["budget"] == {"max_kl": 0.05}
    assert derived.verified["kl"] <= 0.05 and "flops_ratio" in derived.predicted

    verdict = tmp_path / "verdict.json"
    result = runner.invoke(app, ["verify", "--model", "toy-llava", "--schedule", str(out), "--out", str(verdict),
                                 "--new-tokens", "2", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(verdict.read_text())
    assert [r["name"] for r in data["rows"]][:4] == ["schedule", "fastv", "pdrop", "dart"]
    assert data["rows"][0]["steps"] == derived.steps
    fixed = data["unreduced"]["fixed_share"]  # the vision tower, projector and unembedding: no schedule cuts them
    assert 0 < fixed < 1 and all(r["forward_flops_ratio"] == pytest.approx(
        fixed + (1 - fixed) * (r["flops_ratio"] + r["scoring_flops_ratio"])) for r in data["rows"])
    scoring = {r["name"]: r["scoring_flops_ratio"] for r in data["rows"]}
    assert scoring["fastv"] == 0 and scoring["divprune"] > 0  # DivPrune's pairwise distances count

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["verify", "--model", "toy-llava", "--schedule", str(bad), "--out", str(verdict)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    other = tmp_path / "other.json"
    Schedule.for_model(model, []).save(other)
    result = runner.invoke(app, ["verify", "--model", "toy-llama", "--schedule", str(other)])
    assert result.exit_code == 2 and "not for this llama" in result.output
