"""The dynamic visual exit (issue #14) held to the oracles of every reducer op, on a tiny LLaVA under
eager and SDPA whose layer 1 is sharpened (q and k scaled), so that the last position's share of
attention on visual tokens falls from layer 0 to layer 1 by a different amount per prompt: one
threshold then sends the four prompts of one padded batch out at layers 1, 2 and never.

- threshold 0 removes nothing (exact); a threshold above 1 is the static exit at ``from``;
- drop == mask, cached generation == recomputing the prefix and a padded batch == its prompts
  one at a time: the apply tests' own checks (test_reducers_apply), run on the dynamic steps;
- the shares it read are the eager attention rows' sums over visual tokens;
- the realised cost (reducers.cost with the exit layers the planner recorded) counts what ran,
  and equals a FLOPs sum done by hand; the JSON contract and its errors;
- reducers.dynamic: the threshold from the findings, and the match to a static exit's FLOPs.
"""

from __future__ import annotations

import json

import pytest
import test_reducers_apply as oracles
import torch
from test_reducers_apply import encode, masked_oracle, prompts, reduced

from attnflow.analyses.findings import Findings
from attnflow.probes import adapters
from attnflow.reducers import Schedule, ScheduleError, apply, load_schedule
from attnflow.reducers.cost import Shape, layer_counts, predict
from attnflow.reducers.dynamic import at_flops, derived_step
from attnflow.toys import tiny

BACKENDS = ("eager", "sdpa")
L = 3  # the tiny models' depth
DYNAMIC = {"op": "visual_exit_dynamic", "from": 1, "threshold": 0.5}
STEPS = {
    "open": [DYNAMIC],  # exits [never, 2, never, 1] on prompts()
    "bounded": [{**DYNAMIC, "to": 2}],  # the same, forced out at 2: [2, 2, 2, 1]
    "after_prune": [{"op": "prune_visual", "layer": 1, "keep": 0.5}, DYNAMIC],  # share of what the prune kept
}
EXITS = {"open": [L, 2, L, 1], "bounded": [2, 2, 2, 1]}


@pytest.fixture(scope="module")
def models():
    out = {}
    for backend in BACKENDS:
        model, processor = tiny.build("llava", attn_implementation=backend)
        attn = adapters.decoder_layers(model)[1].self_attn
        with torch.no_grad():
            attn.q_proj.weight.mul_(15)
            attn.k_proj.weight.mul_(15)
        out[backend] = model, processor
    return out


def test_planted_shares_send_prompts_out_at_different_layers(models):
    model, processor = models["sdpa"]
    _, planner = reduced(model, [{**DYNAMIC, "threshold": 0.0}], encode(processor, prompts()))
    shares = torch.stack([planner.shares[0], planner.shares[1]], 1)
    assert ((shares - 0.5).abs() > 0.01).all()  # no share near the threshold: the exits below are robust
    assert shares[:, 0].lt(0.5).tolist() == [False, False, False, True]
    assert shares[:, 1].lt(0.5).tolist() == [False, True, False, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_zero_removes_nothing(models, backend):
    model, processor = models[backend]
    batch = encode(processor, prompts())
    schedule = Schedule.for_model(model, [{**DYNAMIC, "threshold": 0.0}])
    with torch.no_grad():
        full = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with apply(model, schedule) as planner:
            same = model(**batch).logits
            same_gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(full, same)
    assert torch.equal(gen, same_gen)
    assert planner.exit_layers.tolist() == [L] * 4
    assert list(planner.shares) == [0, 1]  # the layers whose share decides an exit at 1 or 2, not layer 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", [1, 2])
def test_threshold_above_one_is_the_static_exit_at_from(models, backend, start):
    model, processor = models[backend]
    batch = encode(processor, prompts())
    logits, planner = reduced(model, [{**DYNAMIC, "from": start, "threshold": 1.5}], batch)
    static, static_planner = reduced(model, [{"op": "visual_exit", "layer": start}], batch)
    assert planner.exit_layers.tolist() == [start] * 4
    assert list(planner.shares) == [start - 1]  # once every prompt has left, no layer is read
    assert torch.equal(logits, static)
    for layer, (rows, real) in static_planner.layer_tokens.items():
        assert torch.equal(planner.layer_tokens[layer][0][real], rows[real])


@pytest.fixture
def apply_op(monkeypatch):
    """Register a case under the apply tests' ops (test_reducers_apply.STEPS), so that their
    oracles run on it as on every other op."""
    def register(case: str) -> str:
        monkeypatch.setitem(oracles.STEPS, f"dynamic_{case}", STEPS[case])
        return f"dynamic_{case}"
    return register


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(STEPS))
def test_drop_equals_mask_and_the_shares_are_the_attention_rows(models, backend, case, apply_op):
    oracles.test_drop_equals_mask(models, backend, apply_op(case))
    model, processor = models[backend]
    batch = encode(processor, prompts())
    _, planner = reduced(model, STEPS[case], batch)
    assert planner.exit_layers.tolist() == EXITS.get(case, planner.exit_layers.tolist())
    assert len(set(planner.exit_layers.tolist())) > 1
    attentions = masked_oracle(models["eager"][0], batch, planner).attentions
    visual = batch["input_ids"] == model.config.image_token_id
    for layer, share in planner.shares.items():
        rows, real = planner.layer_tokens[layer]
        row = attentions[layer][:, :, -1, :].mean(1).gather(1, rows)  # head mean of the last row
        waiting = planner.exit_layers > layer  # a prompt gone before the layer was not read there
        torch.testing.assert_close(share[waiting], (row * (real & visual.gather(1, rows))).sum(1)[waiting],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["open", "bounded"])
def test_generate_with_cache_equals_recomputing_the_prefix(models, backend, case, apply_op):
    oracles.test_generate_with_cache_equals_recomputing_the_prefix(models, backend, apply_op(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_equals_one_prompt_at_a_time(models, backend, apply_op):
    oracles.test_padded_batch_equals_one_sample_at_a_time(models, backend, apply_op("open"))
    model, processor = models[backend]
    for prompt, exit_layer in zip(prompts(), EXITS["open"]):  # each prompt leaves alone where it leaves in the batch
        assert reduced(model, STEPS["open"], encode(processor, [prompt]))[1].exit_layers.tolist() == [exit_layer]


def test_realised_counts_are_what_ran(models):
    model, processor = models["sdpa"]
    batch = encode(processor, prompts())
    schedule = Schedule.for_model(model, STEPS["after_prune"], protect={"visual_sinks": [1]})
    with torch.no_grad(), apply(model, schedule) as planner:
        model(**batch)
    visual = batch["input_ids"] == model.config.image_token_id
    for b, exit_layer in enumerate(planner.exit_layers.tolist()):
        counts = layer_counts(schedule, int(batch["attention_mask"][b].sum()), int(visual[b].sum()), exit_layer)
        for layer, count in enumerate(counts):
            rows, real = planner.layer_tokens[layer]
            ran = rows[b][real[b]]
            assert (count.tokens, count.visual) == (len(ran), int(visual[b, ran].sum()))


def test_realised_flops_by_hand():
    shape = Shape(num_layers=3, hidden=4, q_width=4, kv_width=2, mlp=8, bytes_per_value=4)
    schedule = Schedule(model={"model_type": "llava", "fingerprint": "sha256:x", "num_layers": 3},
                        steps=[DYNAMIC])
    # F(n) = 2n·4·4 + 2n·4·2 + 2n²·4 + 3n·4·8 = 144n + 8n²: F(10) = 2240, F(4) = 704, F(8) = 1664.
    # Prompt 1 (10 tokens, 6 visual) exits at 1: F(10) + 2 F(4); prompt 2 (8 tokens, 4 visual) never: 3 F(8).
    cost = predict(schedule, shape, [(10, 6), (8, 4)], exits=[1, 3])
    assert cost["flops_ratio"] == pytest.approx((2240 + 2 * 704 + 3 * 1664) / (3 * 2240 + 3 * 1664))
    assert cost["visual_tokens_equivalent"] == pytest.approx((6 / 3 + 4) / 2)
    assert cost["kv_bytes_ratio"] == pytest.approx((10 + 2 * 4 + 3 * 8) / (3 * 10 + 3 * 8))
    with pytest.raises(ScheduleError, match="depends on each prompt"):
        predict(schedule, shape, [(10, 6)])
    with pytest.raises(ScheduleError, match=r"exit layer in \[1, 3\]"):
        predict(schedule, shape, [(10, 6)], exits=[0])
    with pytest.raises(ScheduleError, match="this schedule has none"):
        predict(with_static := Schedule(model=schedule.model, steps=[{"op": "visual_exit", "layer": 1}]),
                shape, [(10, 6)], exits=[1])
    assert predict(with_static, shape, [(10, 6)])["flops_ratio"] == pytest.approx((2240 + 2 * 704) / (3 * 2240))


def test_round_trip_through_json(models, tmp_path):
    model = models["sdpa"][0]
    schedule = Schedule.for_model(model, [{"op": "visual_exit_dynamic", "from": 1, "to": 2, "threshold": 1}])
    data = json.loads(schedule.save(tmp_path / "s.json").read_text())
    assert data["steps"] == [{"op": "visual_exit_dynamic", "from": 1, "to": 2, "threshold": 1.0}]
    assert load_schedule(tmp_path / "s.json").to_dict() == schedule.to_dict()
    assert Schedule.for_model(model, [DYNAMIC]).to_dict()["steps"][0]["to"] is None  # never forced
    Schedule.for_model(model, [DYNAMIC, {"op": "skip_layers", "layers": [2], "tokens": "visual"}])  # layer 2 unread


@pytest.mark.parametrize("steps, message", [
    ([{"op": "visual_exit_dynamic", "from": 1}], r"missing key\(s\) \['threshold'\]"),
    ([{**DYNAMIC, "threshold": -0.1}], "threshold must be a number >= 0 and finite"),
    ([{**DYNAMIC, "threshold": float("nan")}], "threshold must be a number"),
    ([{**DYNAMIC, "threshold": True}], "threshold must be a number"),
    ([{**DYNAMIC, "from": 0}], r"from must be an integer in \[1, 2\]"),
    ([{**DYNAMIC, "to": 1}], r"to must be an integer in \[2, 2\]"),
    ([{**DYNAMIC, "layer": 1}], r"unknown key\(s\) \['layer'\]"),
    ([DYNAMIC, DYNAMIC], "more than one exit step"),
    ([DYNAMIC, {"op": "visual_exit", "layer": 2}], "more than one exit step"),
    ([DYNAMIC, {"op": "prune_visual", "layer": 2, "keep": 0.5}], "comes after the visual_exit_dynamic"),
    ([DYNAMIC, {"op": "skip_layers", "layers": [1], "tokens": "visual"}], r"reads the attention of layer\(s\) \[1\]"),
])
def test_inconsistent_dynamic_steps_are_refused(models, steps, message):
    data = Schedule.for_model(models["sdpa"][0], []).to_dict()
    data["steps"] = steps
    with pytest.raises(ScheduleError, match=message):
        load_schedule(data)


def test_threshold_from_the_findings():
    def findings(layers, curve):
        return Findings(sinks={}, redundancy={}, flow={}, thresholds={}, model={}, trace={},
                        exit={"applies": True, "layers": layers, "curves": {"observational_last": curve}})

    curve = [0.3, 0.4, 0.5, 0.6]
    knockout = {"knockout": {"layer": 3, "by_qtype": {"color": 2, "count": 4}}, "observational": {"layer": 1}}
    assert derived_step(findings(knockout, curve), 4) == {"op": "visual_exit_dynamic", "from": 2, "threshold": 0.5}
    no_exit = {"observational": {"layer": 4}}  # no knockout, never exits: the last layer's share, from the last layer
    assert derived_step(findings(no_exit, curve), 4) == {"op": "visual_exit_dynamic", "from": 3, "threshold": 0.6}


def test_at_flops_matches_a_static_exit(models):
    """The threshold whose realised FLOPs ratio is the closest to the target, among every
    threshold's (one between each two shares the exit can read, run for real)."""
    model, processor = models["sdpa"]
    batches = [encode(processor, prompts()[:2]), encode(processor, prompts()[2:])]
    layouts = [(int(am.sum()), int(((ids == model.config.image_token_id) & am.bool()).sum()))
               for b in batches for ids, am in zip(b["input_ids"], b["attention_mask"])]
    shape, dynamic = Shape.of(model), Schedule.for_model(model, [DYNAMIC])
    static = predict(Schedule.for_model(model, [{"op": "visual_exit", "layer": 1}]), shape, layouts)["flops_ratio"]
    everyone = at_flops(model, dynamic, batches, static)
    assert everyone.exits == [1] * 4 and everyone.cost["flops_ratio"] == pytest.approx(static)
    assert at_flops(model, dynamic, batches, 1.0).exits == [L] * 4
    _, planner = reduced(model, [{**DYNAMIC, "threshold": 0.0}], encode(processor, prompts()))
    shares = sorted(torch.cat(list(planner.shares.values())).tolist())
    reachable = []
    for t in [0.0, *((a + b) / 2 for a, b in zip(shares, shares[1:])), 1.5]:
        exits = [e for b in batches for e in reduced(model, [{**DYNAMIC, "threshold": t}], b)[1].exit_layers.tolist()]
        reachable.append(predict(dynamic, shape, layouts, exits=exits)["flops_ratio"])
    target = (1 + static) / 2
    between = at_flops(model, dynamic, batches, target)
    assert abs(between.cost["flops_ratio"] - target) == pytest.approx(min(abs(r - target) for r in reachable))
    assert between.cost == predict(between.schedule, shape, layouts, exits=between.exits)
    assert 1 in between.exits and L in between.exits  # some prompts leave at 1, others keep their tokens
