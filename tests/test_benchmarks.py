"""Smoke tests of the benchmark machinery on a tiny model with one repeat: that the benchmarks
run end to end and that what they derive is consistent. They never assert how fast anything
is (speed lives in `make bench`)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

from attnflow import compat, timing
from attnflow.cli import app
from attnflow.benchmarks import memory, probe, run, shapes


def test_interleaved_warms_up_then_rotates_the_order():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = timing.interleaved(fns, 3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(ts) for name, ts in samples.wall.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in samples.cpu.values() for t in ts)
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved(fns, 0)


def test_summarize_pairs_ratios_within_rounds():
    wall = {"base": [1.0, 2.0, 4.0], "x": [3.0, 2.0, 4.0]}
    cpu = {"base": [1.0, 1.0, 1.0], "x": [2.0, 2.0, 3.0]}
    rows = timing.summarize(timing.Samples(wall, cpu), "base")
    assert rows["x"]["ratio_min"] == pytest.approx(2.0)  # min 2 over min 1
    assert rows["x"]["ratio_median"] == pytest.approx(1.0)  # median of 3, 1, 1
    assert rows["x"]["median_s"] == 3.0 and rows["base"]["ratio_median"] == 1.0
    assert rows["x"]["cpu_ratio_min"] == pytest.approx(2.0) and rows["x"]["cpu_median_s"] == 2.0


def test_build_gives_the_exact_token_count_and_layout():
    model, processor, example = shapes.build(shapes.SMOKE_SHAPE, 40)
    ids = shapes.encode(processor, example)["input_ids"][0]
    assert ids.shape[0] == 40
    assert int((ids == model.config.image_token_id).sum()) == 36  # a 6 x 6 grid
    assert ids[0] == processor.tokenizer.bos_token_id
    with pytest.raises(ValueError, match="too few"):
        shapes.grid_side(2)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="peak RSS needs a writable /proc/self/clear_refs (Linux, not every container)")
def test_rss_peak_growth_sees_a_torch_allocation():
    grown = memory.rss_peak_growth(lambda: torch.ones(64 * 2**20 // 4))  # 64 MiB, every page touched
    assert 60 * 2**20 <= grown < 160 * 2**20


def test_probe_memory_runs_in_a_fresh_process():
    args = ["--tokens", "40", "--shape", shapes.SMOKE_SHAPE.name, "--memory-of", "hf_output_attentions"]
    out = memory.in_fresh_process("attnflow.benchmarks.probe", args)
    assert out["method"] == "hf_output_attentions" and out["tokens"] == 40 and out["peak_bytes"] > 0
    with pytest.raises(RuntimeError, match="--memory-of"):
        memory.in_fresh_process("attnflow.benchmarks.probe", ["--memory-of", "no_such_method"])


def test_smoke_run_writes_consistent_results(tmp_path):
    results = run.run(run.SMOKE, tmp_path, threads=1, command="pytest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "latest.md"]  # no temp files left
    saved = json.loads((tmp_path / "latest.json").read_text())
    (row,) = saved["probe"]
    assert set(row["methods"]) == set(probe.available())  # the chunked path is its own row where kernels serve
    assert set(probe.METHODS) - set(probe.available()) == {"summary_sdpa_chunked"}  # on this CPU
    m = row["methods"]
    # the headline figure is the median per-round ratio of summary recording to a plain SDPA forward
    assert row["summary_ratio"] == m["summary_sdpa"]["ratio_median"] and m["plain_sdpa"]["ratio_median"] == 1.0
    (red,) = saved["reducers"]
    assert red["visual_tokens"] == 36 and set(red["configs"]) == {"unreduced", "fastv", "pdrop", "divprune"}
    flops = {name: c["predicted_flops_ratio"] for name, c in red["configs"].items()}
    assert flops["unreduced"] == 1.0 and flops["divprune"] < flops["pdrop"] < flops["fastv"] < 1.0
    assert 0 < red["fixed_share"] < 1  # the vision tower and unembedding: the whole forward's prediction is lower
    assert all(1 < c["predicted_forward_speedup"] < c["predicted_speedup"]
               for n, c in red["configs"].items() if n != "unreduced")
    assert all(math.isfinite(red["configs"][n]["attainable_speedup"]) and red["configs"][n]["attainable_speedup"] > 0
               for n in ("fastv", "pdrop", "divprune"))  # timed: its size is the benchmark's to report, not a test's
    decode = {n: red["configs"][n]["predicted_decode_speedup"] for n in ("fastv", "pdrop", "divprune")}
    assert 1 < decode["fastv"] < decode["pdrop"] < decode["divprune"]  # a shorter cache from an earlier cut
    assert saved["soak"]["recordings"] == run.SMOKE.soak_recordings
    # summary ratio, prefill and decode of fastv, pdrop and divprune, soak
    assert len(saved["targets"]) == len(results["targets"]) == 8
    page = (tmp_path / "latest.md").read_text()
    assert saved["machine"]["cpu"] in page and "## Targets" in page
    assert ("Skipped: no CUDA device" in page) != torch.cuda.is_available()


def test_cli_bench_probe_prints_one_json_object():
    result = CliRunner().invoke(app, ["bench", "probe", "--tokens", "40", "--repeats", "1", "--no-memory", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    m = out["methods"]
    assert out["tokens"] == 40
    assert out["summary_ratio"] == m["summary_sdpa"]["ratio_median"] and out["summary_ratio"] > 0


def test_attainable_speedup_times_each_layer_at_the_widths_a_schedule_gives_it(monkeypatch):
    """layer_widths are the tokens each layer really ran (FastV at K=2 halves the 36 visual tokens
    of the toy VLM from layer 2 on). attainable times one call of each layer at each width it runs
    at (each call really runs that layer on that many tokens: checked through a clock that charges
    1 ms per token it sees), and takes what the widths save off the unreduced prefill: widths equal
    to the full prompt save nothing (speedup exactly 1)."""
    from attnflow.models import default_inputs, load_model
    from attnflow.probes.inputs import as_examples, encode
    from attnflow.reducers import speed
    from attnflow.reducers.baselines import fastv

    model, processor = load_model("toy-vlm")
    batch = dict(encode(processor, as_examples(default_inputs("toy-vlm"))[:2]))
    n = batch["input_ids"].shape[1]
    widths = speed.layer_widths(model, fastv(model, keep=0.5, layer=2), batch)
    assert widths[:2] == [n, n] and widths[2:] == [n - 18] * (len(widths) - 2)

    def per_token_clock(methods, repeats, device="cpu"):  # each call's seconds: 1 ms per token it ran
        seconds = {name: [1e-3 * compat.layer_hidden(fn()).shape[1]] * repeats for name, fn in methods.items()}
        return timing.Samples(seconds, seconds)

    monkeypatch.setattr(speed.timing, "interleaved", per_token_clock)
    speedups = speed.attainable(model, {"none": [n] * len(widths), "fastv": widths}, batch, 1.0, repeats=3)
    saved = 1e-3 * 18 * (len(widths) - 2)
    assert speedups["none"] == 1.0 and speedups["fastv"] == pytest.approx(1 / (1 - saved))


def test_schedule_targets_tell_a_gap_of_a_few_answers_from_a_significant_one():
    """A method more accurate at the schedule's FLOPs is listed; it is listed as significant only when
    its paired lower bound on the gap is above zero; the table shows every row's bounds."""
    from attnflow.benchmarks import schedules

    def row(name, accuracy, bounds):
        return {"name": name, "steps": [], "flops_ratio": 0.5, "accuracy": accuracy, "accuracy_delta": accuracy - 0.9,
                "versus_schedule": bounds, "prefill_speedup": 1.5, "prefill_speedup_b1": 1.1, "decode_speedup": 1.0,
                "accuracy_by_type": {"count": accuracy - 0.1, "where": 1.0}, "forward_flops_ratio": 0.6}

    rows = [row("schedule", 0.9, [-0.01, 0.01]), row("a_equal_flops", 0.9025, [-0.004, 0.012]),
            row("b_equal_flops", 0.95, [0.02, 0.08]), row("c_equal_flops", 0.8, [-0.14, -0.06])]
    result = {"model": "m", "calibration": 10, "heldout": 400, "seconds": {"derive": 1.0},
              "verdict": {"rows": rows, "unreduced": {"accuracy": 0.9, "accuracy_by_type": {"count": 0.8, "where": 1.0},
                                                      "fixed_share": 0.2}}, "attainable": {"b16": 2.0, "b1": 1.2},
              "schedule": {"derived_from": {"fidelity": {"n_examples": 4},
                                            "validation": {"n_examples": 6, "accuracy_drop_upper": 0.009}}}}
    result["targets"] = t = schedules.targets(result, 0.6, 1.0)
    assert t["fresh_loss_ok"] is None  # no fresh prompts measured
    assert t["more_accurate_at_equal_flops"] == ["a_equal_flops", "b_equal_flops"]
    assert t["significantly_more_accurate_at_equal_flops"] == ["b_equal_flops"]
    # a fifth of the forward is outside the decoder layers: halving them predicts 1 / 0.6, not 2
    assert t["prefill_vs_predicted_b16"] == pytest.approx(0.75) and t["prefill_vs_forward_b16"] == pytest.approx(0.9)
    table = schedules.markdown([result])
    assert "| a_equal_flops | nothing removed | 0.500 | 90.25% | +0.25 | -0.4 to +1.2 |" in table
    assert "(by more than the paired 95% bound allows: b_equal_flops)" in table
    assert "| configuration | count | where |" in table and "| c_equal_flops | -10.0 | +0.0 |" in table
    # the held-out set loses no point, but the upper bound on fresh prompts exceeds the budget: missed
    result["fresh"] = {"prompts": 3200, "seed": 7, "broken": 40, "fixed": 20, "drop_points": 0.63,
                       "drop_bounds_points": [0.3, 1.02], "kl": 0.01}
    result["targets"] = t = schedules.targets(result, 0.6, 1.0)
    assert t["loss_ok"] and t["fresh_drop_upper_points"] == 1.02 and t["fresh_loss_ok"] is False
    assert "on the fresh prompts at most 1.02 at 95% (MISSED)" in schedules.markdown([result])


def test_proportional_benchmark_compares_divprune_with_and_without_the_size_bias():
    """Keeping every token changes nothing either way; at DivPrune's 9.8% the size bias lowers the KL on
    the toy VLM (0.09 against 0.89 on 1,600 prompts); the table shows every row."""
    from attnflow.benchmarks import proportional

    res = proportional.run_model("toy-vlm", 48, keeps=(1.0, 0.098))
    rows = {(r["keep"], r["proportional"]): r for r in res["rows"]}
    assert all(rows[(1.0, p)]["broken"] == rows[(1.0, p)]["fixed"] == 0 and rows[(1.0, p)]["kl"] < 1e-9
               for p in (False, True))
    assert rows[(0.098, True)]["kl"] < rows[(0.098, False)]["kl"]
    low, high = rows[(0.098, False)]["drop_bounds_points"]
    assert low <= rows[(0.098, False)]["drop_points"] <= high
    assert "| 9.8% | yes |" in proportional.markdown([res]) and "| 100.0% | no |" in proportional.markdown([res])


def test_reverify_times_the_saved_schedule_again_without_deriving(tmp_path, monkeypatch):
    """--reverify loads the saved result's model and schedule, verifies that schedule again, and keeps
    the derivation's record (calibration, seconds of derive) beside the new verdict."""
    from attnflow.benchmarks import schedules
    from attnflow.fileio import write_json
    from attnflow.models import load_model
    from attnflow.reducers import Schedule

    model, _ = load_model("toy-vlm")
    steps = [{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "divprune"}]
    saved = {"model": "toy-vlm", "calibration": 8000, "seconds": {"derive": 800.0, "verify": 40.0},
             "schedule": Schedule.for_model(model, steps).to_dict(), "heldout": 1, "verdict": {"old": True}}
    write_json(tmp_path / "schedules-toy-vlm.json", saved)
    seen = {}

    class Verdict:
        unreduced = {"prefill_ms": 1.0}

        def to_dict(self):
            return {"new": True}

    def fake_verify(model, schedule, heldout, processor, budget, **kwargs):
        seen["steps"], seen["drop"], seen["heldout"] = schedule.steps, budget.max_accuracy_drop, len(heldout)
        return Verdict()

    monkeypatch.setattr(schedules, "verify_schedule", fake_verify)
    monkeypatch.setattr(schedules, "attainable_speedups", lambda *a: {"b16": 2.0, "b1": 1.1})
    monkeypatch.setattr(schedules, "fresh_drop", lambda model, processor, name, schedule: {"steps": schedule.steps})
    out = schedules.reverify(tmp_path / "schedules-toy-vlm.json", 1.5, repeats=1)
    assert seen["steps"] == Schedule.for_model(model, steps).steps and seen["drop"] == 0.015 and seen["heldout"] > 1
    assert out["verdict"] == {"new": True} and out["heldout"] == seen["heldout"] and out["calibration"] == 8000
    assert out["seconds"]["derive"] == 800.0 and out["seconds"]["verify"] != 40.0
    assert out["fresh"] == {"steps": seen["steps"]}  # the same schedule measured on fresh prompts


def test_fresh_drop_counts_answers_a_schedule_breaks_on_prompts_of_its_own_seed():
    from attnflow.benchmarks import schedules
    from attnflow.models import load_model
    from attnflow.reducers import Schedule

    model, processor = load_model("toy-vlm")
    keep_all = schedules.fresh_drop(model, processor, "toy-vlm", Schedule.for_model(model, []), n=48)
    assert keep_all["broken"] == keep_all["fixed"] == 0 and keep_all["kl"] < 1e-9 and keep_all["drop_points"] == 0
    blind = Schedule.for_model(model, [{"op": "visual_exit", "layer": 1}])  # every visual token gone at layer 1
    out = schedules.fresh_drop(model, processor, "toy-vlm", blind, n=48)
    assert out["broken"] > 5 and out["drop_points"] == 100 * (out["broken"] - out["fixed"]) / 48
    lo, hi = out["drop_bounds_points"]
    assert 0 < lo < out["drop_points"] < hi and out["seed"] == schedules.FRESH_SEED


def test_host_syncs_counts_each_read_of_a_device_value_and_restores_torch():
    """A scalar read, a list, a boolean index, a copy to the host and a nonzero: five reads; nothing
    counted outside the block, and Tensor.cpu is torch's own again after it."""
    from attnflow.benchmarks.prefill_profile import host_syncs

    x = torch.arange(5)
    cpu = torch.Tensor.cpu
    with host_syncs() as syncs:
        x + 1
        int(x.sum()), x.tolist(), x[x > 2], x.cpu(), torch.nonzero(x)
        assert syncs() == 5
    assert torch.Tensor.cpu is cpu


def test_prefill_profile_counts_what_each_reducer_adds():
    """On the smoke shape (CPU: no kernel timing): every configuration prefills, and FastV's ranking and cut
    read device values that the unreduced forward does not."""
    from attnflow.benchmarks import prefill_profile

    out = prefill_profile.run(shapes.SMOKE_SHAPE, tokens=40, rounds=2)
    rows = out["configs"]
    assert set(rows) == {"unreduced", "fastv", "pdrop", "divprune"} and rows["unreduced"]["speedup"] == 1
    assert all(r["busy"] is None and r["wall_s"] > 0 for r in rows.values())
    assert min(rows[name]["syncs"] for name in ("fastv", "pdrop", "divprune")) > rows["unreduced"]["syncs"]
