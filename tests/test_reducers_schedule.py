"""The Schedule contract: JSON round trip, clear errors for malformed files and inconsistent
steps, and refusal of a model other than the one a schedule was made for."""

from __future__ import annotations

import json

import pytest
import torch

from attnflow.probes import adapters
from attnflow.reducers import Schedule, ScheduleError, apply, load_schedule, save_schedule
from attnflow.toys import tiny


@pytest.fixture(scope="module")
def llava():
    return tiny.build("llava")[0]


def schedule_dict(llava, steps):
    return Schedule.for_model(llava, steps).to_dict()


def test_round_trip_through_json(llava, tmp_path):
    steps = [{"op": "prune_visual", "layer": 1, "keep": 0.5}, {"op": "skip_layers", "layers": [2], "tokens": "visual"}]
    schedule = Schedule.for_model(llava, steps, protect={"visual_sinks": [3, 0]},
                                  predicted={"flops_ratio": 0.5})
    path = save_schedule(schedule, tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["attnflow_schedule"] == 2
    assert data["model"] == {"model_type": "llava", "fingerprint": adapters.fingerprint(llava), "num_layers": 3}
    assert set(data) == {"attnflow_schedule", "model", "protect", "steps", "derived_from", "predicted", "verified"}
    assert data["protect"] == {"visual_sinks": [0, 3]}
    assert data["steps"][0] == {"op": "prune_visual", "layer": 1, "keep": 0.5, "by": "last_row"}  # default filled in
    loaded = load_schedule(path)
    assert loaded.to_dict() == schedule.to_dict()
    assert load_schedule(data).to_dict() == schedule.to_dict()
    assert not list(tmp_path.glob("*.tmp"))


def test_malformed_json_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"attnflow_schedule": 2, "steps": [')
    with pytest.raises(ScheduleError, match=r"bad\.json.*not valid JSON"):
        load_schedule(path)
    with pytest.raises(ScheduleError, match="does not exist"):
        load_schedule(tmp_path / "missing.json")
    path.write_text('{"steps": []}')
    with pytest.raises(ScheduleError, match="attnflow_schedule"):
        load_schedule(path)


@pytest.mark.parametrize("steps, message", [
    ([{"op": "drop_everything", "layer": 1}], "unknown op 'drop_everything'.*prune_visual"),
    ([{"op": "prune_visual", "layer": 1}], r"missing key\(s\) \['keep'\]"),
    ([{"op": "prune_visual", "layer": 1, "keep": 1.5}], r"keep must be a number in \[0, 1\]"),
    ([{"op": "prune_visual", "layer": 1, "keep": 0.5, "rank_by": "last_row"}], r"unknown key\(s\) \['rank_by'\]"),
    ([{"op": "prune_visual", "layer": 1, "keep": 0.5, "by": "magic"}], "by must be one of"),
    ([{"op": "prune_visual", "layer": 1, "keep": 0.5, "seed": 3}], "seed applies to by='random' only"),
    ([{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "divprune", "merge": True}], "for by='cls' only"),
    ([{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "cls", "merge": "yes"}], "merge must be true or false"),
    ([{"op": "prune_visual", "layer": 1, "keep": 0.5, "recycle": 1}], "recycle must be true or false"),
    ([{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "cls", "merge": True, "recycle": True}], "a step takes one"),
    ([{"op": "prune_visual", "layer": 1, "keep": 0.5, "proportional": True}], "layer 0 only"),
    ([{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "pool", "proportional": "on"}],
     "proportional must be true or false"),
    ([{"op": "prune_visual", "layer": 1, "keep": 0.5, "by": "random", "seed": -1}], "seed must be an integer"),
    ([{"op": "visual_exit", "layer": 0}], r"layer must be an integer in \[1, 2\]"),
    ([{"op": "visual_exit", "layer": 3}], r"layer must be an integer in \[1, 2\]"),
    ([{"op": "visual_exit", "layer": 1, "keep": 0.5}], r"unknown key\(s\) \['keep'\]"),
    ([{"op": "skip_layers", "layers": [1], "tokens": "text"}], "tokens must be one of"),
    ([{"op": "skip_layers", "layers": []}], "non-empty list"),
    ([{"op": "prune_visual", "layer": 1, "keep": 0.25}, {"op": "prune_visual", "layer": 2, "keep": 0.5}],
     "must not grow with depth"),
    ([{"op": "visual_exit", "layer": 1}, {"op": "prune_visual", "layer": 2, "keep": 0.5}], "no visual token is left"),
    ([{"op": "skip_layers", "layers": [1], "tokens": "visual"}, {"op": "prune_visual", "layer": 2, "keep": 0.5}],
     "visual tokens skip"),
])
def test_inconsistent_steps_are_refused(llava, steps, message):
    data = schedule_dict(llava, [])
    data["steps"] = steps
    with pytest.raises(ScheduleError, match=message):
        load_schedule(data)


def test_bad_protect_is_refused(llava):
    data = schedule_dict(llava, [])
    data["protect"] = {"modalities": ["bos"], "visual_sinks": []}
    with pytest.raises(ScheduleError, match="'protect' takes only"):
        load_schedule(data)
    data["protect"] = {"visual_sinks": [-1]}
    with pytest.raises(ScheduleError, match="visual_sinks entry"):
        load_schedule(data)
    data.update(protect={"visual_sinks": []}, attnflow_schedule=1)
    with pytest.raises(ScheduleError, match="'attnflow_schedule' must be 2, got 1"):
        load_schedule(data)


def test_a_config_changed_in_place_changes_the_fingerprint(llava):
    """The fingerprint is kept per model, but not past a change to its config (nested ones included)."""
    first = adapters.fingerprint(llava)
    eps = llava.config.text_config.rms_norm_eps
    llava.config.text_config.rms_norm_eps = 1e-3
    try:
        assert adapters.fingerprint(llava) != first
    finally:
        llava.config.text_config.rms_norm_eps = eps
    assert adapters.fingerprint(llava) == first
    llava.config.text_config.extra = torch.zeros(3)  # a tensor attribute: == cannot say, so it is recomputed
    try:
        assert adapters.fingerprint(llava) != first
        llava.config.text_config.extra = torch.zeros(3)
        assert adapters.fingerprint(llava) == adapters.fingerprint(llava)
    finally:
        del llava.config.text_config.extra
    assert adapters.fingerprint(llava) == first


def test_schedule_for_another_model_is_refused(llava):
    other, _ = tiny.build("llava", seed=1)
    other.config.text_config.rms_norm_eps = 1e-3  # same family and depth, another config
    schedule = Schedule.for_model(llava, [{"op": "visual_exit", "layer": 1}])
    with pytest.raises(ScheduleError, match="made for llava sha256:.*fingerprint differs"):
        with apply(other, schedule):
            pass
    text_only, _ = tiny.build("llama")
    with pytest.raises(ScheduleError, match="not for this llama"):
        with apply(text_only, schedule):
            pass
    assert not any(layer._forward_pre_hooks for layer in adapters.decoder_layers(other))


def test_right_padding_is_refused(llava):
    _, processor = tiny.build("llava")
    processor.tokenizer.padding_side = "right"
    prompts = tiny.sample_prompts("llava")
    batch = processor(text=[p["prompt"] for p in prompts], images=[p["images"] for p in prompts],
                      padding=True, return_tensors="pt")
    with torch.no_grad(), apply(llava, Schedule.for_model(llava, [{"op": "visual_exit", "layer": 1}])):
        with pytest.raises(ScheduleError, match="left padding"):
            llava(**batch)
