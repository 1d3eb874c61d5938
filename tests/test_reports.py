"""Reports built from real tiny run directories (planted models recorded, analysed and
scheduled with the real functions): the PDF's text names the sinks, exit layer and schedule
steps the JSON files hold, every drawn figure is embedded, and sections that do not apply
say so."""

import json
import re

import pytest
import torch
from pypdf import PdfReader
from typer.testing import CliRunner

from attnflow.analyses import analyze
from attnflow.cli import app
from attnflow.probes.io import save_trace
from attnflow.probes.record import record
from attnflow.reducers.derive import derive
from attnflow.reducers.verify import verify_schedule
from attnflow.reports.build import build
from attnflow.reports.figures import FIGURES, save_figures
from attnflow.reports.rundir import ReportError
from attnflow.toys import planted
from tests.pdfcheck import schedule_phrases

EXIT_LAYER, NUM_LAYERS = 2, 4
SINK_POSITIONS, SINK_LAYERS = [0, 3], [1, 2]
COMMAND = 'attnflow run --out "#panic(1) *x* $y$ <z>"'  # typst markup must arrive as plain text


def _run_dir(path, model, processor, inputs, schedule: bool):
    """Record, analyse and (for ``schedule``) derive and verify into ``path``, as attnflow run does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trace = record(model, inputs, processor=processor, progress=False)
        save_trace(trace, path / "trace.nc")
        findings = analyze(trace, model, inputs, processor=processor)
        findings.save(path / "findings.json")
        if schedule:
            fast = {"new_tokens": 2, "repeats": 1}
            derived = derive(findings, model, inputs, processor)
            verify_schedule(model, derived, inputs, processor, **fast).save(path / "verdict.json")
            derived.save(path / "schedule.json")
    finally:
        torch.set_num_threads(threads)
    return findings.to_dict()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A planted LLaVA whose text stops reading the image at EXIT_LAYER, recorded from a JSONL
    file (so the report can show the image), with a schedule and a run.json."""
    path = tmp_path_factory.mktemp("vlm")
    toy = planted.exit_vlm(EXIT_LAYER, num_layers=NUM_LAYERS, samples=3)
    lines = []
    for i, ex in enumerate(toy.examples):
        ex.images[0].save(path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": ex.prompt}))
    (path / "inputs.jsonl").write_text("\n".join(lines) + "\n")
    findings = _run_dir(path, toy.model, toy.processor, path / "inputs.jsonl", schedule=True)
    (path / "run.json").write_text(json.dumps({"command": COMMAND}))
    return path, findings, build(path)


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """A planted text-only Llama with sinks at SINK_POSITIONS in SINK_LAYERS, no schedule."""
    path = tmp_path_factory.mktemp("text")
    toy = planted.sink_model(SINK_POSITIONS, SINK_LAYERS, samples=3)
    findings = _run_dir(path, toy.model, toy.processor, toy.examples, schedule=False)
    return path, findings, build(path)


def _text(pdf) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(pdf).pages)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _index(path) -> dict:
    return json.loads((path / "figures" / "index.json").read_text())


def test_every_drawn_figure_is_embedded_with_its_caption(vlm, text_only):
    for path, _, pdf in (vlm, text_only):
        index = _index(path)
        assert set(index) == {spec.name for spec in FIGURES}
        drawn = [name for name, entry in index.items() if entry["file"]]
        images = sum(len(page.images) for page in PdfReader(pdf).pages)
        assert images == len(drawn)
        text = _flat(_text(pdf))
        for name in drawn:
            assert (path / "figures" / f"{name}.png").is_file()
            assert not (path / "figures" / f"{name}.svg").exists()  # SVG only on request
            assert _flat(index[name]["caption"]) in text
        assert not [p.name for p in path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_vlm_report_names_exit_layer_sinks_and_schedule_of_the_json(vlm):
    path, findings, pdf = vlm
    assert findings["exit"]["layer"] == EXIT_LAYER  # the run really found the planted exit
    text = _text(pdf)
    flat = _flat(text)
    assert f"Exit layer {findings['exit']['layer']} of {NUM_LAYERS}" in flat
    for criterion, info in findings["exit"]["layers"].items():
        assert f"{criterion.replace('_', ' ')} {info['layer']} " in flat  # the per-criterion table
    for sink in findings["sinks"]["tokens"]:
        assert f"{sink['layer']} {sink['pos']} {sink['token']} {sink['modality']}" in text
    schedule = json.loads((path / "schedule.json").read_text())
    assert schedule["steps"]  # the planted exit leaves room for a reduction
    for phrase in schedule_phrases(schedule):
        assert phrase in flat
    verdict = json.loads((path / "verdict.json").read_text())
    for row in verdict["rows"]:  # the Pareto table: FLOPs and agreement of every configuration
        assert f"{100 * row['flops_ratio']:.1f}% " in flat and f"{100 * row['agreement']:.1f}%" in flat
    assert f"next-token agreement {100 * schedule['verified']['agreement']:.1f}%" in flat
    assert COMMAND in flat
    assert all(entry["file"] for entry in _index(path).values())


def test_text_only_report_says_what_does_not_apply(text_only):
    path, findings, pdf = text_only
    assert {s["pos"] for s in findings["sinks"]["tokens"]} == set(SINK_POSITIONS)
    flat = _flat(_text(pdf))
    index = _index(path)
    assert [name for name, entry in index.items() if entry["file"] is None] == ["patches", "exit", "schedule", "pareto"]
    assert "Does not apply: the model saw no visual tokens" in flat
    assert f"Does not apply: {findings['exit']['reason']}" in flat
    assert "Does not apply: no schedule.json" in flat and "Does not apply: no verdict.json" in flat
    for sink in findings["sinks"]["tokens"]:
        assert f"{sink['layer']} {sink['pos']} {sink['token']} {sink['modality']}" in flat
    for pos in SINK_POSITIONS:
        assert f"(position {pos}, " in flat  # named on the first page
    assert f"dimension {findings['sinks']['dims'][0]}" in flat


def test_cli_rebuild_replaces_figures_whole(text_only, tmp_path):
    for name in ("trace.nc", "findings.json"):
        (tmp_path / name).write_bytes((text_only[0] / name).read_bytes())
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "patches.png").write_bytes(b"stale")  # from an earlier, visual run
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--svg"])
    assert result.exit_code == 0, result.output
    drawn = {name for name, entry in _index(tmp_path).items() if entry["file"]}
    assert "patches" not in drawn and not (tmp_path / "figures" / "patches.png").exists()
    assert all((tmp_path / "figures" / f"{name}.{fmt}").is_file() for name in drawn for fmt in ("png", "svg"))
    assert (tmp_path / "report.pdf").is_file()
    with pytest.raises(ReportError, match="formats"):
        save_figures(tmp_path, formats=("jpg",))


def test_bad_run_directories_get_clear_errors(vlm, text_only, tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        build(tmp_path / "missing")
    (tmp_path / "trace.nc").write_bytes((vlm[0] / "trace.nc").read_bytes())
    with pytest.raises(ReportError, match="findings.json"):
        build(tmp_path)
    (tmp_path / "findings.json").write_bytes((text_only[0] / "findings.json").read_bytes())
    with pytest.raises(ReportError, match="another model"):
        build(tmp_path)
    (tmp_path / "findings.json").write_text("{}")
    with pytest.raises(ReportError, match="findings"):
        build(tmp_path)


def test_the_readme_quotes_the_committed_demo_run(monkeypatch):
    from pathlib import Path

    from attnflow.reports import readme

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    assert readme.quoted((root / "README.md").read_text()) == readme.section(Path("docs/demo"))
    for name in readme.FIGURES:
        assert (root / "docs" / "demo" / name).stat().st_size > 10_000


def test_the_readme_quotes_the_committed_model_runs(monkeypatch):
    """The bundled-models section is the one `make docs` writes from docs/models, for every bundled model."""
    import json
    from pathlib import Path

    from attnflow.models import BUNDLED
    from attnflow.reports import readme

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    text = (root / "README.md").read_text()
    assert readme.quoted(text, readme.MODELS_START, readme.MODELS_END) == readme.models_section(Path("docs/models"))
    rows = json.loads((root / "docs" / "models" / "models.json").read_text())
    assert [r["name"] for r in rows] == list(BUNDLED)
    assert all(r["accuracy"] >= 0.95 and f"**`{r['name']}`**" in text for r in rows)


def test_a_schedule_over_budget_on_verification_gets_a_warning(vlm):
    """The actions warn when the schedule passed validation but missed its budget on the verification
    prompts, and only then."""
    from dataclasses import replace

    from attnflow.reports.content import actions
    from attnflow.reports.rundir import load_run

    run = load_run(vlm[0])
    assert not any("outside its fidelity budget" in a for a in actions(run))
    over = {**run.schedule, "verified": {**run.schedule["verified"], "within_budget": False}}
    assert any("passed validation but is outside its fidelity budget" in a for a in actions(replace(run, schedule=over)))


def test_verified_sentence_sets_the_speedup_beside_what_the_forwards_flops_predict():
    from attnflow.reports import words

    ver = {"n_examples": 100, "held_out": True, "accuracy_delta": -0.01, "prefill_speedup": 1.5, "device": "cpu"}
    plain = words.verified_sentence({"verified": ver})
    assert "prefill speedup 1.50× (cpu)" in plain and "predict" not in plain  # a schedule verified before the field
    both = words.verified_sentence({"verified": {**ver, "forward_flops_ratio": 0.5}})
    assert "prefill speedup 1.50× (cpu; the forward's FLOPs predict 2.00×)" in both
