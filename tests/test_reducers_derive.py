"""derive() and verify(): a planted visual exit is found and verified whatever exit the
findings claim; the search's sequential test, keep refinement and validation's fixed-sequence
test of the search's result scaled down; the Verdict's fidelity and cost are self-consistent; evidence helpers."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnflow.models import default_inputs, load_model
from attnflow.probes.inputs import Example, encode, load_examples
from attnflow.reducers import Schedule, ScheduleError
from attnflow.reducers.derive import (Budget, Settings, TooFewPrompts, derive, first_prune_layer,
                                     visual_sink_indices)
from attnflow.reducers.verdict import Row, mark_pareto
from attnflow.reducers.fidelity import Generated, answers_right
from attnflow.reducers.validation import flip_floor, min_prompts, paired_drop_bounds
from attnflow.reducers.verify import gap_bounds, verify, verify_schedule
from attnflow.reports import words
from attnflow.toys import planted, tiny
from tests.claims import findings_claiming

PLANTED_EXIT = 2


@pytest.fixture(scope="module")
def exit_vlm():
    return planted.exit_vlm(PLANTED_EXIT, num_layers=4, samples=6)


@pytest.mark.parametrize("claimed", [1, 3])
def test_derive_finds_the_planted_exit_whatever_the_findings_claim(exit_vlm, claimed):
    budget = Budget(max_kl=1e-3)
    schedule = derive(findings_claiming(claimed, 4), exit_vlm.model, exit_vlm.examples, exit_vlm.processor,
                      budget)
    exits = [s["layer"] for s in schedule.steps if s["op"] == "visual_exit"]
    assert exits == [PLANTED_EXIT]
    assert schedule.derived_from["fidelity"]["kl"] <= 1e-3 and schedule.derived_from["fidelity"]["within_budget"]
    assert schedule.predicted["flops_ratio"] < 1 and not schedule.verified  # derive measures, never verifies
    verify_schedule(exit_vlm.model, schedule, exit_vlm.examples, exit_vlm.processor, budget, repeats=1,
                    new_tokens=2, baselines=False)
    assert schedule.verified["kl"] <= 1e-3 and schedule.verified["within_budget"]
    derived = schedule.derived_from
    assert derived["budget"] == {"max_kl": 1e-3}
    val = derived["validation"]  # the random planted model is never sure of a token: a flip may cost nothing
    assert val["flip_kl_floor"] == 0 and "implied_min_agreement" not in val and not words.flips_sentence(val)
    assert derived["evidence"]["exit_layer"] == claimed
    assert any(f"exit layer {claimed} by the knockout criterion" in r for r in derived["reasons"])
    tried = {json.dumps(t["steps"]): t["within_budget"] for t in derived["trials"]}
    assert tried[json.dumps([{"op": "visual_exit", "layer": PLANTED_EXIT - 1}])] is False
    assert tried[json.dumps([{"op": "visual_exit", "layer": PLANTED_EXIT}])] is True
    first = [s for t in derived["trials"] for s in t["steps"][:1] if s["op"] == "prune_visual"]
    recycled = [s for s in first if s.get("recycle")]  # the first stage's winner, tried recycling
    assert recycled and {(s["layer"], s["by"]) for s in recycled} < {(s["layer"], s["by"]) for s in first}
    assert any(s["by"] == "cls" and s.get("merge") for s in first)  # VisionZip: [CLS] with its contextual merge
    Schedule.from_dict(json.loads(json.dumps(schedule.to_dict())))  # a valid, JSON-clean schedule


def test_budget_and_findings_errors(exit_vlm):
    with pytest.raises(ScheduleError, match="max_kl must be >= 0"):
        Budget(max_kl=-1.0)
    with pytest.raises(ScheduleError, match="takes max_kl, min_agreement, max_accuracy_drop"):
        Budget.of({"max_lk": 0.1})
    assert Budget().to_dict() == {"max_kl": 0.01}
    other = dict(findings_claiming(2, 4), model={"fingerprint": "sha256:another"})
    with pytest.raises(ScheduleError, match="made for model sha256:another"):
        derive(other, exit_vlm.model, exit_vlm.examples, exit_vlm.processor, Budget())


def test_first_prune_layer_reads_the_curve():
    assert first_prune_layer([0.2, 0.8, 0.7, 0.3, 0.1], 5, 0.5)[0] == 3  # first below half the peak
    assert first_prune_layer([0.2, 0.8, 0.7, 0.6, 0.6], 5, 0.5)[0] == 2  # never fades: after the peak
    assert first_prune_layer(None, 6, 0.5)[0] == 2  # no curve: FastV's K


def test_visual_sinks_map_to_visual_token_indices():
    model, processor = tiny.build("llava")
    image = tiny.sample_prompts("llava")[0]["images"]
    first = Example("<image> what color is the square ?", image)  # bos, then 16 visual tokens
    later = Example("look at this <image> ?", image)  # bos + 3 words, then visual tokens
    findings = {"sinks": {"visual": [{"layer": 1, "pos": 5}]}}
    indices, _ = visual_sink_indices(findings, [first, first, later], processor, model)
    assert indices == [4]
    indices, _ = visual_sink_indices(findings, [first, later, later], processor, model)
    assert indices == [1]


def fastv_flops_by_hand(tc, layouts: list[tuple[int, int]]) -> float:
    """FastV K=2 R=50%'s prefill FLOPs ratio from the config alone: per layer over n tokens,
    q/o projections 2·n·d·d_q, k/v 2·n·d·d_kv, attention 2·n²·d_q, SwiGLU MLP 3·n·d·m."""
    d, heads, kv = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
    dq, dkv, m, depth = d, d // heads * kv, tc.intermediate_size, tc.num_hidden_layers

    def layer(n: int) -> float:
        return 2 * n * d * dq + 2 * n * d * dkv + 2 * n * n * dq + 3 * n * d * m

    reduced = sum(2 * layer(n) + (depth - 2) * layer(n - v + int(0.5 * v + 0.5)) for n, v in layouts)
    return reduced / sum(depth * layer(n) for n, _ in layouts)


def test_pareto_front_by_hand():
    def row(name, flops, fidelity):
        return Row(name, [], fidelity, 0.0, 1.0, None, None, {}, flops, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, None, None)

    rows = [row("a", 0.5, 0.9), row("b", 0.6, 0.9), row("c", 0.7, 0.95), row("d", 0.4, 0.8), row("e", 0.5, 0.9)]
    mark_pareto(rows)
    assert [r.name for r in rows if r.pareto] == ["a", "c", "d", "e"]  # b: a is cheaper at the same fidelity


def test_accuracy_gap_bounds_pair_the_prompts():
    """Each row's gap to the schedule is bounded over the prompts both answered, paired: here the row
    gets two right that the schedule gets wrong and one the reverse (a prompt without an answer does not
    count), so the bounds are Tango's for 2 against 1 of 5 with the gap (2 - 1) / 5 between them."""
    def run(texts):
        return Generated(torch.zeros(len(texts), 1), torch.zeros(len(texts), 1, dtype=torch.long), texts)

    examples = [Example("q", [], answer=a) for a in ("red", "blue", "two", "left", "yes")] + [Example("q", [])]
    row = run(["red", "blue", "three", "left", "no", "x"])
    schedule = run(["red", "green", "two", "right", "no", "y"])
    lower, upper = gap_bounds(answers_right(row, examples), answers_right(schedule, examples))
    assert (lower, upper) == paired_drop_bounds(2, 1, 5) and lower < 0.2 < upper
    unanswered = [Example("q", [])] * 6
    assert gap_bounds(answers_right(row, unanswered), answers_right(schedule, unanswered)) is None


def test_verdict_is_self_consistent():
    model, processor = tiny.build("llava")
    prompts = tiny.sample_prompts("llava")
    examples = [Example(p["prompt"], p["images"]) for p in prompts]
    with torch.no_grad():
        # the unreduced model's own greedy first word is the "answer": its accuracy is 1
        batch = processor(text=[e.prompt for e in examples[:1]], images=[e.images for e in examples[:1]],
                          return_tensors="pt")
        word = processor.tokenizer.decode(model.generate(**batch, max_new_tokens=1, do_sample=False)[0, -1:])
    examples[0].answer = word.strip()
    verdict = verify(model, Schedule.for_model(model, []), examples, processor, new_tokens=3, repeats=1,
                     batch_size=2)
    empty = verdict.row("schedule")
    assert empty.agreement == 1.0 and empty.kl == 0.0 and empty.generation_agreement == 1.0
    assert empty.flops_ratio == 1.0 and empty.accuracy == verdict.unreduced["accuracy"] == 1.0
    assert empty.accuracy_delta == 0.0
    assert empty.versus_schedule == list(paired_drop_bounds(0, 0, 1))  # against itself: nothing discordant
    for r in verdict.rows:
        lower, upper = r.versus_schedule
        assert lower <= r.accuracy - empty.accuracy <= upper
    assert [r.name for r in verdict.rows] == ["schedule", "fastv", "pdrop", "dart", "divprune", "visionzip",
                                              "sparsevlm", "fastv_equal_flops", "dart_equal_flops",
                                              "divprune_equal_flops", "random_equal_flops", "pool_equal_flops",
                                              "visionzip_equal_flops", "sparsevlm_equal_flops",
                                              "dynamic_exit_equal_flops"]
    dynamic = verdict.row("dynamic_exit_equal_flops")  # nothing to match at FLOPs 1: no prompt exits
    assert dynamic.flops_ratio == 1.0 and dynamic.steps[0]["op"] == "visual_exit_dynamic" and dynamic.kl == 0.0
    ids = [processor(text=e.prompt, images=e.images, return_tensors="pt")["input_ids"][0] for e in examples]
    layouts = [(len(i), int((i == model.config.image_token_id).sum())) for i in ids]
    assert verdict.row("fastv").flops_ratio == pytest.approx(fastv_flops_by_hand(model.config.text_config, layouts))
    assert verdict.row("fastv").steps == [{"op": "prune_visual", "layer": 2, "keep": 0.5, "by": "last_row"}]  # K=2, R=50%
    assert [s["layer"] for s in verdict.row("pdrop").steps] == [1, 2]  # 1/4, 1/2, 3/4 of 3 layers, rounded
    assert [s["keep"] for s in verdict.row("pdrop").steps] == [0.5, 0.125]
    assert {p["name"] for p in verdict.to_dict()["pareto"]} == {r.name for r in verdict.rows if r.pareto}
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["attnflow_verdict"] == 1 and data["model"]["num_layers"] == 3
    assert set(verdict.verified()) >= {"agreement", "kl", "accuracy_delta", "prefill_speedup", "device"}


def test_the_validation_sequence_scales_the_searchs_result_safest_first():
    """Each share of the result's cut scales every stage's drop (keep 1 - share·(1 - keep)) and moves
    the exit that share of the way from the last layer; skips come after the full cut, one at a time;
    each schedule cuts at least what the one before it cuts, in every step; equal ones appear once."""
    from attnflow.reducers.derive import Candidate, Stage, _sequence

    cand = Candidate(exit=4, prunes=(Stage(1, 0.5), Stage(2, 0.3, "divprune", True)), skips=((3, "all"), (5, "visual")))
    seq = _sequence(cand, num_layers=8, shares=(0.25, 0.5, 0.75, 1.0))
    assert seq[-1] == cand and seq[-2] == replace(cand, skips=cand.skips[:1]) and seq[-3] == replace(cand, skips=())
    quarter = seq[0]
    assert quarter.exit == 7  # 4 + round(0.75·4)
    assert [s.keep for s in quarter.prunes] == pytest.approx([0.875, 0.825])
    assert [s[:1] + s[2:] for s in quarter.prunes] == [s[:1] + s[2:] for s in cand.prunes]  # layer, score, flags kept
    assert seq[1].exit == 6 and seq[2].exit == 5  # 4 + round(0.5·4), 4 + round(0.25·4)
    for before, after in zip(seq, seq[1:]):
        assert all(a.keep <= b.keep for a, b in zip(after.prunes, before.prunes))
        assert (after.exit or 8) <= (before.exit or 8) and set(before.skips) <= set(after.skips)
    assert len(seq) == 6
    exit_only = Candidate(exit=6)  # 6 + round(0.75·2) = 8 (none), 6 + round(0.5·2) = 7, then 6, 6
    assert [c.exit for c in _sequence(exit_only, 8, (0.25, 0.5, 0.75, 1.0))] == [7, 6]
    assert _sequence(Candidate(None), 8, (0.5, 1.0)) == []
    for c in seq:
        Schedule(model={"model_type": "llava", "fingerprint": "sha256:x", "num_layers": 8}, steps=c.steps())
    with pytest.raises(ScheduleError, match="shares must rise"):
        Settings(shares=(0.5, 0.9))


def test_validation_accepts_the_last_of_the_sequence_before_the_first_rejection():
    """Fixed-sequence testing: safest first, stop at the first rejection even when a later, larger cut
    would pass (accepting it would spend the bound's confidence again); the first rejected: no
    reduction; every one accepted: the search's result."""
    from attnflow.reducers.derive import Candidate, Stage, _sequence, _validated

    cand = Candidate(None, (Stage(0, 0.3, "divprune"), Stage(3, 0.1)))
    shares = (0.5, 0.8, 0.9, 1.0)
    seq = _sequence(cand, 6, shares)

    class Search:  # what _validated reads of a derivation
        confidence = 0.95

        def __init__(self, accepts):
            self.accepts, self.tried, self.reasons = accepts, [], []

        def schedule(self, c):
            return Schedule(model={"model_type": "llava", "fingerprint": "sha256:x", "num_layers": 6}, steps=c.steps())

        def ok(self, c, probe, part):
            assert part == "validation" and probe is checker
            self.tried.append(c)
            return c in self.accepts

    checker = SimpleNamespace(examples=[None] * 1600)
    search = Search({seq[0], seq[1], seq[3]})  # the full cut would pass, after a rejection
    assert _validated(search, checker, cand, 6, shares) == seq[1] and search.tried == seq[:3]
    assert search.reasons[-1].endswith(f"the sequence stops at {seq[1].steps()}")
    search = Search(set(seq[1:]))
    assert _validated(search, checker, cand, 6, shares) == Candidate(None)
    assert search.tried == [seq[0], Candidate(None)] and search.reasons[-1].endswith("stops at no reduction")
    search = Search(set(seq))
    assert _validated(search, checker, cand, 6, shares) == cand and search.tried == seq


@pytest.fixture(scope="module")
def toy_vlm():
    torch.set_num_threads(1)
    model, processor = load_model("toy-vlm")
    return model, processor, load_examples(default_inputs("toy-vlm"))


def test_the_search_judges_close_trials_on_more_prompts(toy_vlm):
    """The toy VLM reads colours early and places/counts late. Searched on 16 colour questions, then
    16 where/count ones, in blocks of 16, under a 20-point budget whose 32 validation prompts (where
    questions; every answer right unreduced, none fixed: the net drop's bound is the Wilson bound on broken answers)
    let a net drop of 2 answers through (6.25%): an exit at layer 3 breaks few colour answers, close
    to that (0 of 16: bounds -14.5% and 14.5%), so it is judged on the where/count block too and
    rejected there; judged on the colour block alone it passes. Trials clearly over on the first
    block stop there. Validation then rejects what the search prompts accepted."""
    model, processor, examples = toy_vlm
    colour = [e for e in examples if e.qtype == "color_of_shape"][:16]
    late = [e for e in examples if e.qtype in ("where", "count")]
    where = [e for e in examples if e.qtype == "where"][-32:]  # after late[:16]
    budget, exit3 = Budget(max_accuracy_drop=0.2), [{"op": "visual_exit", "layer": 3}]

    def trials(search, first_block):
        schedule = derive(findings_claiming(3, 6), model, search, processor, budget, validation=where,
                          settings=Settings(first_block=first_block))
        return schedule, [t for t in schedule.derived_from["trials"] if t["part"] == "search"]

    schedule, searched = trials(colour + late[:16], 16)
    exit_trial = next(t for t in searched if t["steps"] == exit3)
    assert exit_trial["judged_on"] == 32 and exit_trial["within_budget"] is False
    assert exit_trial["drop_allowed"] == 2 / 32
    stopped = [t for t in searched if t["judged_on"] == 16]
    assert stopped and not any(t["within_budget"] for t in stopped)  # only clearly-over trials stop early
    assert all(t["drop_lower"] > 2 / 32 for t in stopped)
    assert {t["judged_on"] for t in searched} == {16, 32}
    weighed = {s[0]["by"] for t in searched for s in [t["steps"]] if s and s[0].get("proportional")}
    assert weighed == {"random", "pool", "divprune", "cls"}  # every score before the LLM, also by size
    _, colour_only = trials(colour, 16)
    alone = next(t for t in colour_only if t["steps"] == exit3)
    assert alone["within_budget"] is True and alone["drop_share"] == 0 and alone["judged_on"] == 16
    assert alone["drop_upper"] == pytest.approx(2.7055 / 18.7055, abs=1e-4)  # z²/(16 + z²): close
    assert alone["drop_lower"] == pytest.approx(-alone["drop_upper"])
    # validation tests the search's result scaled down, safest first, and stops at its first rejection,
    # short of what the search accepted
    validated = [t for t in schedule.derived_from["trials"] if t["part"] == "validation" and t["steps"]]
    verdicts = [t["within_budget"] for t in validated]
    assert False in verdicts and verdicts == [True] * verdicts.index(False) + [False]
    assert all(t["accuracy_drop_upper"] <= 0.2 for t in validated[:-1]) and validated[-1]["accuracy_drop_upper"] > 0.2
    assert all(t["broken_share"] == -t["accuracy_delta"] for t in validated)  # nothing fixed on these prompts
    assert [t["flops_ratio"] for t in validated] == sorted((t["flops_ratio"] for t in validated), reverse=True)
    assert schedule.steps == (validated[-2]["steps"] if len(validated) > 1 else [])
    result = schedule.derived_from["searched"]
    assert any(t["steps"] == result and t["within_budget"] for t in searched) and schedule.steps != result
    assert any("fixed-sequence test" in r for r in schedule.derived_from["reasons"])
    assert "flip_kl_floor" not in schedule.derived_from["validation"]  # an accuracy budget has no KL tail


def test_a_kl_budget_certifies_the_flips_its_bootstrap_cannot_see(toy_vlm):
    """The trained toy VLM is sure of its answers, so a flipped one costs close to log 2 nats (the mean of
    reducers.validation.flip_floor over the validation prompts' unreduced top-1 probabilities, each
    computed here from a forward of that prompt alone): a KL budget of 0.01 then allows about 1.5% flips,
    which 32 validation prompts cannot certify (derive says how many it takes before searching); one of
    0.1 allows about 16%, which they can, and every validation trial is judged by that agreement bound
    as well as by the bootstrap's bound on the mean."""
    model, processor, examples = toy_vlm
    search, held = examples[:16], examples[-32:]
    with torch.no_grad():
        top = [model(**encode(processor, [ex])).logits[0, -1].softmax(-1).max().item() for ex in held]
    floor = float(flip_floor(np.array(top)).mean())
    assert floor > 0.6
    with pytest.raises(TooFewPrompts, match=f"needs at least {min_prompts(0.01 / floor)} validation prompts.*"
                                            "flipped answer costs at least") as refused:
        derive(findings_claiming(3, 6), model, search, processor, Budget(max_kl=0.01), validation=held)
    # and it names the tightest budgets 32 prompts do certify: each needs at most 32, a notch tighter more
    reach = re.search(r"32 prompts certify at best min_agreement ([\d.]+) or max_kl ([\d.]+)\)", str(refused.value))
    agreement, kl = float(reach[1]), float(reach[2])
    assert Budget(min_agreement=agreement).prompts_needed() <= 32 < Budget(min_agreement=agreement + 0.01).prompts_needed()
    assert Budget(max_kl=kl).with_flips(floor).prompts_needed() <= 32 < Budget(max_kl=0.9 * kl).with_flips(floor).prompts_needed()
    schedule = derive(findings_claiming(3, 6), model, search, processor, Budget(max_kl=0.1), validation=held)
    val = schedule.derived_from["validation"]
    assert val["flip_kl_floor"] == pytest.approx(floor, rel=1e-5)
    assert val["implied_min_agreement"] == pytest.approx(1 - 0.1 / floor, rel=1e-5)
    trials = [t for t in schedule.derived_from["trials"] if t["part"] == "validation"]
    assert trials and all(t["within_budget"] == (t["kl_upper"] <= 0.1 and t["agreement_lower"] >= val["implied_min_agreement"])
                          for t in trials)
    assert "also held top-1 agreement to at least" in words.in_sample_sentence(schedule.to_dict())


def test_the_smallest_keep_is_refined_between_the_last_step_within_budget_and_the_first_over():
    """Within budget while keep >= 0.44 (REFINE = 2 halvings): from 0.9, x2/3 steps pass 0.9 and 0.6
    and not 0.4; halving [0.4, 0.6]: 0.5 passes, 0.45 passes. From 0.3 (over), dropping a third
    fewer tokens: 1 - 0.7/1.5 = 0.5333 passes; halving [0.3, 0.5333]: 0.4167 fails, 0.475 passes."""
    from attnflow.reducers.derive import REFINE, Candidate, Stage, _smallest_keep

    class Search:
        def __init__(self):
            self.tried = []

        def ok(self, cand):
            self.tried.append(round(cand.prunes[-1][1], 4))
            return cand.prunes[-1][1] >= 0.44

    assert REFINE == 2
    search = Search()
    assert _smallest_keep(search, Candidate(None), Stage(1, 0.9)).prunes == ((1, pytest.approx(0.45), "last_row", False, False, False),)
    assert search.tried == [0.9, 0.6, 0.4, 0.5, 0.45]
    search = Search()
    refined = _smallest_keep(search, Candidate(None), Stage(1, 0.3, "divprune", recycle=True))
    assert refined.prunes == ((1, pytest.approx(0.475), "divprune", True, False, False),)
    assert search.tried == [0.3, 0.5333, 0.4167, 0.475]


def test_the_cheapest_candidate_ties_to_the_lower_search_kl():
    """A stage recycling what it drops costs the FLOPs of the plain one: of equally cheap candidates
    within budget the one with the lower mean KL on the search prompts wins; a cheaper one wins
    whatever its KL."""
    from attnflow.reducers.derive import Candidate, Stage, _cheapest

    plain, recycled = Candidate(None, (Stage(0, 0.32, "divprune"),)), Candidate(None, (Stage(0, 0.32, "divprune", True),))
    dearer = Candidate(None, (Stage(0, 0.4, "divprune"),))

    class Search:  # what _cheapest reads of a derivation
        def __init__(self, kl):
            self.kl, self.reasons = kl, []

        def flops(self, cand):
            return 0.4 if cand == dearer else 0.333

        def searched_kl(self, cand):
            return self.kl[cand]

    search = Search({plain: 0.028, recycled: 0.0246, dearer: 0.001})
    assert _cheapest(search, [plain, recycled, dearer], "first stage") == recycled
    assert search.reasons[-1].endswith("the lowest KL of those as cheap") and "with recycling" in search.reasons[-1]
    search = Search({plain: 0.02, recycled: 0.0246, dearer: 0.001})
    assert _cheapest(search, [recycled, plain, dearer], "first stage") == plain
    assert _cheapest(search, [dearer], "first stage") == dearer and not search.reasons[-1].endswith("as cheap")
