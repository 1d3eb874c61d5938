"""derive() and verify(): a planted visual exit is found and verified whatever exit the
findings claim; the search's sequential test, keep refinement and validation's fall-back on the
search's next-best; the Verdict's fidelity and cost are self-consistent; evidence helpers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from attnflow.models import default_inputs, load_model
from attnflow.probes.inputs import Example, load_examples
from attnflow.reducers import Schedule, ScheduleError
from attnflow.reducers.derive import Budget, Settings, derive, first_prune_layer, visual_sink_indices
from attnflow.reducers.verdict import Row, mark_pareto
from attnflow.reducers.verify import verify, verify_schedule
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


def test_back_off_order():
    """Drop the last skip, then let the last prune stage drop a third fewer tokens (of what the
    previous stage keeps) until it would drop under MIN_DROP and remove it, then the same for the
    stage before, then move the exit later until there is none."""
    from attnflow.reducers.derive import MIN_DROP, Candidate, Stage, _relax

    cand = Candidate(exit=4, prunes=(Stage(1, 0.5), Stage(2, 0.3, "last_row", True)), skips=((3, "all"),))
    seen = []
    while cand is not None:
        seen.append(cand.steps())
        cand = _relax(cand, num_layers=6)
    keeps = [[(s["layer"], s["keep"]) for s in steps if s["op"] == "prune_visual"] for steps in seen]
    assert [s["op"] for s in seen[0]] == ["prune_visual", "prune_visual", "visual_exit", "skip_layers"]
    assert "skip_layers" not in [s["op"] for s in seen[1]] and keeps[1] == keeps[0]
    second = [k[1][1] for k in keeps if len(k) == 2][1:]  # stage 2 backing off towards stage 1's 0.5
    gaps = [0.5 - k for k in second]
    assert gaps[0] == pytest.approx(0.2) and all(b == pytest.approx(a / 1.5, abs=1e-4) for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] >= MIN_DROP > gaps[-1] / 1.5  # then the stage goes
    first = [k[0][1] for k in keeps if len(k) == 1]
    assert first[0] == 0.5 and 1 - first[-1] >= MIN_DROP > (1 - first[-1]) / 1.5
    exits = [next((s["layer"] for s in steps if s["op"] == "visual_exit"), None) for steps in seen if not
             any(s["op"] == "prune_visual" for s in steps)]
    assert exits == [4, 5, None]
    for steps in seen:
        Schedule(model={"model_type": "llava", "fingerprint": "sha256:x", "num_layers": 6}, steps=steps)


@pytest.fixture(scope="module")
def toy_vlm():
    torch.set_num_threads(1)
    model, processor = load_model("toy-vlm")
    return model, processor, load_examples(default_inputs("toy-vlm"))


def test_the_search_judges_close_trials_on_more_prompts(toy_vlm):
    """The toy VLM reads colours early and places/counts late. Searched on 16 colour questions, then
    16 where/count ones, in blocks of 16, under a 20-point budget whose 32 validation prompts (every
    answer right unreduced, none fixed: the net drop's bound is the Wilson bound on broken answers)
    let a net drop of 2 answers through (6.25%): an exit at layer 3 breaks few colour answers, close
    to that (0 of 16: bounds -14.5% and 14.5%), so it is judged on the where/count block too and
    rejected there; judged on the colour block alone it passes. Trials clearly over on the first
    block stop there. Validation then rejects what the search prompts accepted."""
    model, processor, examples = toy_vlm
    colour = [e for e in examples if e.qtype == "color_of_shape"][:16]
    late = [e for e in examples if e.qtype in ("where", "count")]
    budget, exit3 = Budget(max_accuracy_drop=0.2), [{"op": "visual_exit", "layer": 3}]

    def trials(search, first_block):
        schedule = derive(findings_claiming(3, 6), model, search, processor, budget, validation=late[48:80],
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
    _, colour_only = trials(colour, 16)
    alone = next(t for t in colour_only if t["steps"] == exit3)
    assert alone["within_budget"] is True and alone["drop_share"] == 0 and alone["judged_on"] == 16
    assert alone["drop_upper"] == pytest.approx(2.7055 / 18.7055, abs=1e-4)  # z²/(16 + z²): close
    assert alone["drop_lower"] == pytest.approx(-alone["drop_upper"])
    # validation rejects the search's cheapest and takes the next-best it found, cheapest first
    validated = [t for t in schedule.derived_from["trials"] if t["part"] == "validation"]
    assert [t["within_budget"] for t in validated] == [False] * (len(validated) - 1) + [True]
    assert all(t["accuracy_drop_upper"] > 0.2 for t in validated[:-1]) and validated[-1]["accuracy_drop_upper"] <= 0.2
    assert all(t["broken_share"] == -t["accuracy_delta"] for t in validated)  # nothing fixed on these prompts
    assert [t["flops_ratio"] for t in validated] == sorted(t["flops_ratio"] for t in validated)
    assert schedule.steps == validated[-1]["steps"] and len(validated) > 1
    assert any(t["steps"] == schedule.steps and t["within_budget"] for t in searched)
    assert any("trying the search's next-best" in r for r in schedule.derived_from["reasons"])


def test_validation_falls_back_on_the_searchs_next_best_cheapest_first():
    """After a rejection: a rejected multi-stage candidate's trunk (its first stage) if the search passed
    it, else the search's other passes cheapest first, but none that cuts at least what a rejected one
    cuts the same way (its stages or more, no keep larger); then the back-off from the rejected
    result (once half the tries are spent on next-best), past the steps a rejection rules out; at most
    ``tries`` more, else no reduction."""
    from attnflow.reducers.derive import Candidate, Stage, _relax, _validated

    greedy = Candidate(None, (Stage(3, 0.38), Stage(4, 0.3)))
    alone = Candidate(None, (Stage(3, 0.38),))  # the greedy's first stage: cuts less, tried
    div, dearer_div = Candidate(None, (Stage(0, 0.72, "divprune"),)), Candidate(None, (Stage(0, 0.8, "divprune"),))
    fewer_div = Candidate(None, (Stage(0, 0.7, "divprune"),))  # cuts more than div: skipped once div is rejected
    recycled_div = Candidate(None, (Stage(0, 0.7, "divprune", True),))  # another way: tried
    dart1, dart3 = Candidate(None, (Stage(1, 0.82, "dart"),)), Candidate(None, (Stage(3, 0.38, "dart"),))
    deeper = Candidate(None, (Stage(3, 0.38), Stage(4, 0.2)))  # cuts more than the greedy: never tried
    branch = Candidate(None, (Stage(3, 0.38), Stage(5, 0.25)))  # built on the trunk, which is tried first and fails
    flops = {greedy: 0.67, alone: 0.695, div: 0.715, fewer_div: 0.72, recycled_div: 0.73, dearer_div: 0.8,
             dart1: 0.844, dart3: 0.7, deeper: 0.68, branch: 0.69}
    assert _relax(greedy, 6).prunes[0] == alone.prunes[0]  # the back-off keeps the rejected trunk's stage a while:
    raised = Candidate(None, (Stage(3, 1.0 - (1.0 - 0.38) / 1.5),))  # its first step that alone's rejection allows

    class Search:  # what _validated reads of a derivation
        confidence = 0.95

        def __init__(self, accepts):
            self.passed = [alone, dearer_div, dart3, div, fewer_div, recycled_div, dart1, greedy, deeper, branch]
            self.accepts = accepts
            self.tried, self.reasons = [], []

        def flops(self, cand):
            return flops.get(cand, 0.9)

        def ok(self, cand, probe, part):
            assert part == "validation" and probe is checker
            self.tried.append(cand)
            return cand in self.accepts

    checker = SimpleNamespace(examples=[None] * 1600)
    search = Search({div, dart1})
    assert _validated(search, checker, greedy, 6, tries=20) == div and search.tried == [greedy, alone, dart3, div]
    assert search.reasons[0].endswith("validation prompts: trying the search's next-best (predicted FLOPs 0.695)")
    search = Search({raised})
    assert _validated(search, checker, greedy, 6, tries=20) == raised
    assert search.tried == [greedy, alone, dart3, div, recycled_div, dearer_div, dart1, raised]
    assert search.reasons[-1].endswith("backing off")
    search = Search(set())  # nothing holds: no reduction rather than a rejected schedule
    assert _validated(search, checker, greedy, 6, tries=1) == Candidate(None)
    assert search.tried == [greedy, alone, Candidate(None)] and search.reasons[-1].endswith("no reduction")
    search = Search({raised})  # half the tries for next-best, then the back-off
    assert _validated(search, checker, greedy, 6, tries=4) == raised and search.tried == [greedy, alone, dart3, raised]


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
    assert _smallest_keep(search, Candidate(None), Stage(1, 0.9)).prunes == ((1, pytest.approx(0.45), "last_row", False, False),)
    assert search.tried == [0.9, 0.6, 0.4, 0.5, 0.45]
    search = Search()
    refined = _smallest_keep(search, Candidate(None), Stage(1, 0.3, "divprune", recycle=True))
    assert refined.prunes == ((1, pytest.approx(0.475), "divprune", True, False),)
    assert search.tried == [0.3, 0.5333, 0.4167, 0.475]
