"""`attnflow run` end to end on tiny models of three kinds (VLM, text-only decoder, encoder),
its refusal to overwrite, its atomicity when interrupted, and the CLI's help and errors."""

import json
import math

import pytest
from pypdf import PdfReader
from typer.testing import CliRunner

from attnflow import pipeline
from attnflow.cli import app
from tests.pdfcheck import pdf_text, schedule_phrases

runner = CliRunner()
FAST = ["--repeats", "1", "--new-tokens", "2"]


def test_run_on_a_vlm_writes_every_file_and_the_pdf_agrees(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--model", "toy-llava", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"trace.nc", "findings.json", "schedule.json", "verdict.json", "run.json", "figures", "report.pdf"} <= names
    findings = json.loads((out / "findings.json").read_text())
    schedule = json.loads((out / "schedule.json").read_text())
    verdict = json.loads((out / "verdict.json").read_text())
    assert schedule["verified"]["agreement"] == verdict["rows"][0]["agreement"]
    # searched on one part of the inputs, accepted on a second, verified on the rest
    derived = schedule["derived_from"]
    n_search, n_valid, n_held = (derived["fidelity"]["n_examples"], derived["validation"]["n_examples"],
                                 verdict["n_examples"])
    assert schedule["verified"]["held_out"] and n_held == schedule["verified"]["n_examples"] >= 1
    assert n_search + n_valid + n_held == json.loads((out / "run.json").read_text())["n_examples"]
    assert n_valid >= 1 and derived["validation"]["kl_upper"] >= derived["validation"]["kl"]
    text = pdf_text(out / "report.pdf")
    if findings["exit"]["layer"] is not None:
        assert f"Exit layer {findings['exit']['layer']}" in text
    for phrase in schedule_phrases(schedule):
        assert phrase in text
    figures = json.loads((out / "figures" / "index.json").read_text())
    assert len(PdfReader(out / "report.pdf").pages) >= 2 and figures
    assert "visual exit" in result.output and "report:" in result.output


@pytest.mark.parametrize("family,reason", [("llama", "no visual tokens"), ("bert", "encoder")])
def test_text_only_and_encoder_runs_skip_the_schedule_and_say_why(tmp_path, family, reason):
    out = tmp_path / family
    result = runner.invoke(app, ["run", "--model", f"toy-{family}", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert not (out / "schedule.json").exists() and (out / "report.pdf").is_file()
    run_info = json.loads((out / "run.json").read_text())
    assert reason in run_info["skipped"]["schedule"]
    assert "not apply" in pdf_text(out / "report.pdf").lower()


def test_existing_run_is_refused_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["run", "--model", "toy-llama", "--out", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_an_interrupted_run_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("attnflow.analyses.analyze", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run("toy-llama", out=out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("command", ["record", "analyze", "schedule", "verify", "report", "run", "bench"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize("args,message", [
    (["run", "--model", "no/such/folder"], "neither a toy name"),
    (["run", "--model", "toy-llama", "--batch-size", "0"], "batch-size"),
    (["record", "--model", "toy-llama", "--level", "huge"], "level"),
    (["report", "/no/such/run"], "does not exist"),
])
def test_bad_arguments_get_a_clear_message(args, message, tmp_path):
    result = runner.invoke(app, args + (["--out", str(tmp_path / "x")] if args[0] == "run" else []))
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_the_default_budget_is_the_tightest_the_validation_prompts_can_certify():
    """Half of the inputs validate: one accuracy point from 268 of them (answers needed), KL 0.01 from 185
    (its flips certified as at least 98.56% agreement: a flip may cost up to log 2 nats), 95% agreement
    from 52; below that KL 0.01, which derive certifies only where flips cost little. A budget asked for
    is kept as it is."""
    from attnflow.probes.inputs import Example
    from attnflow.reducers.derive import Budget

    def pick(n: int, answers: bool = True) -> dict:
        return pipeline.default_budget([Example(f"q{i}", answer="a" if answers else None) for i in range(n)],
                                       None, None, None).to_dict()

    assert pick(536) == {"max_accuracy_drop": 0.01} and pick(535) == {"max_kl": 0.01}
    assert pick(536, answers=False) == {"max_kl": 0.01}
    assert Budget(max_kl=0.01).with_flips(math.log(2)).prompts_needed() == 185
    assert pick(370) == {"max_kl": 0.01} and pick(369) == {"min_agreement": 0.95}
    assert pick(104) == {"min_agreement": 0.95} and pick(103) == {"max_kl": 0.01}
    asked = pipeline.default_budget([Example("q", answer="a")] * 600, 0.2, None, None)
    assert asked.to_dict() == {"max_kl": 0.2}


def test_a_run_whose_prompts_cannot_certify_its_budget_keeps_its_trace_and_says_why(tmp_path):
    """24 prompts of the confident toy VLM leave 6 to validate, far from the ~180 its default KL budget
    needs for its flips: the schedule and verification are skipped with derive's reason, the rest stands."""
    out = tmp_path / "few"
    result = runner.invoke(app, ["run", "--model", "toy-vlm", "--limit", "24", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"trace.nc", "findings.json", "run.json", "report.pdf", "figures"}
    skipped = json.loads((out / "run.json").read_text())["skipped"]
    assert skipped["schedule"] == skipped["verify"] and "validation prompts to be certified" in skipped["schedule"]
    assert "flipped answer costs at least" in " ".join(result.output.split())
