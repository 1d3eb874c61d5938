"""Accepting a schedule on prompts it was not searched on: the split, the confidence bounds by hand,
and a derivation whose search prompts accept what its validation prompts reject."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from attnflow.models import default_inputs, load_model
from attnflow.probes.inputs import Example, load_examples
from attnflow.reducers import ScheduleError
from attnflow.reducers.derive import Budget, Losses, derive
from attnflow.reducers.validation import bootstrap_mean_upper, min_prompts, split, wilson_lower, wilson_upper
from tests.claims import findings_claiming


@pytest.mark.parametrize("n, share", [(300, 0.5), (7, 0.5), (10, 0.3), (5, 0.0)])
def test_the_split_is_disjoint_whole_and_seeded(n, share):
    rest, held = split(list(range(n)), share)
    assert sorted(rest + held) == list(range(n)) and not set(rest) & set(held)
    assert len(held) == int(n * share) and rest == sorted(rest) and held == sorted(held)
    assert split(list(range(n)), share) == (rest, held)
    with pytest.raises(ValueError, match="held-out share"):
        split([1, 2], 1.0)


def test_the_split_gives_every_part_every_question_type():
    """A file that cycles through 8 types (as the scene sets do): an interleaving would give the
    halves disjoint types; the draw gives each part its share of every type."""
    items = [Example(f"q{i}", answer="a", qtype=f"type{i % 8}") for i in range(400)]
    rest, held = split(items, 0.5)
    search, validation = split(rest, 0.5)
    for part, size in ((held, 25), (search, 12), (validation, 12)):
        counts = Counter(e.qtype for e in part)
        assert len(counts) == 8 and all(abs(c - size) <= 1 for c in counts.values()), counts
    assert split(items, 0.5, seed=1) != (rest, held)


def test_wilson_bounds_by_hand():
    # 3 losses in 100 at one-sided 95% (z = 1.6449, z² = 2.7055):
    # (0.03 + z²/200 + z·sqrt(0.03·0.97/100 + z²/40000)) / (1 + z²/100) = 0.07467 / 1.02706 = 0.0727
    assert wilson_upper(3, 100) == pytest.approx(0.0727, abs=1e-4)
    assert wilson_lower(97, 100) == pytest.approx(1 - 0.0727, abs=1e-4)
    # zero losses: z² / (n + z²); one point needs 268 prompts
    assert wilson_upper(0, 100) == pytest.approx(2.7055 / 102.7055, abs=1e-4)
    assert min_prompts(0.01) == 268 and wilson_upper(0, 268) <= 0.01 < wilson_upper(0, 267)
    assert bootstrap_mean_upper([0.5] * 20) == 0.5
    kl = np.r_[np.zeros(90), np.full(10, 0.1)]  # mean 0.01
    upper = bootstrap_mean_upper(kl)
    assert 0.01 < upper < 0.02 and upper == bootstrap_mean_upper(kl)  # seeded


def test_a_budget_is_certified_by_its_bound_not_its_mean():
    budget = Budget(max_accuracy_drop=0.01)
    none_broken = Losses(np.zeros(300), np.ones(300, bool), np.zeros(300, bool))
    one_broken = Losses(np.zeros(300), np.ones(300, bool), np.r_[True, np.zeros(299, bool)])
    assert budget.certified(budget.bounds(none_broken))  # 0/300: bound 0.0089
    bounds = budget.bounds(one_broken)
    assert bounds["accuracy_drop_upper"] == pytest.approx(wilson_upper(1, 300))
    assert not budget.certified(bounds)  # a 0.33-point drop whose 95% bound is 1.9 points
    assert budget.prompts_needed() == 268
    assert Budget(min_agreement=0.95).prompts_needed() == min_prompts(0.05)
    with pytest.raises(ScheduleError, match="never be certified"):
        Budget(max_accuracy_drop=0.0).prompts_needed()


def test_validation_rejects_what_the_search_prompts_accept():
    """The toy VLM reads colours early and places/counts late: searched on colour questions alone,
    an early visual exit passes; the where/count validation prompts reject it, and derive backs off."""
    torch.set_num_threads(1)
    model, processor = load_model("toy-vlm")
    examples = load_examples(default_inputs("toy-vlm"))
    colour = [e for e in examples if e.qtype == "color_of_shape"][:16]
    late = [e for e in examples if e.qtype in ("where", "count")][:16]
    schedule = derive(findings_claiming(3, 6), model, colour, processor, Budget(max_kl=0.05), validation=late)
    trials = schedule.derived_from["trials"]
    searched = [t for t in trials if t["part"] == "search" and t["steps"] and t["within_budget"]]
    assert searched, "the search prompts accept some cut"
    rejected = {str(t["steps"]) for t in trials if t["part"] == "validation" and not t["within_budget"]}
    assert str(searched[0]["steps"]) in rejected
    validation = schedule.derived_from["validation"]
    assert validation["within_budget"] and validation["kl_upper"] <= 0.05 and validation["n_examples"] == 16
    assert schedule.derived_from["fidelity"]["n_examples"] == 16
    assert any("validation prompts: backing off" in r for r in schedule.derived_from["reasons"])


def test_a_budget_the_validation_part_cannot_certify_is_refused_up_front():
    model, processor = load_model("toy-vlm")
    examples = load_examples(default_inputs("toy-vlm"))[:40]
    with pytest.raises(ScheduleError, match="needs at least 268 validation prompts"):
        derive(findings_claiming(3, 6), model, examples, processor, Budget(max_accuracy_drop=0.01))


def test_the_search_aims_at_what_validation_can_accept():
    from attnflow.reducers.validation import tolerated

    assert tolerated(0.01, 300) == 0 and tolerated(0.01, 100) == -1  # 1/300 is bounded by 1.9%
    assert wilson_upper(tolerated(0.02, 1000), 1000) <= 0.02 < wilson_upper(tolerated(0.02, 1000) + 1, 1000)
    budget = Budget(max_accuracy_drop=0.01)
    clean = Losses(np.zeros(256), np.ones(256, bool), np.zeros(256, bool))
    # 0 of 256 broken cannot be certified on 256 prompts (bound 1.05%), but is what 300 validation prompts accept
    assert not budget.certified(budget.bounds(clean))
    check = budget.search_check(clean, n_validation=300)
    assert check == {"broken_share": 0.0, "broken_lower": 0.0, "broken_upper": wilson_upper(0, 256),
                     "broken_allowed": 0.0} and budget.searched(check)
    one = Losses(np.zeros(256), np.ones(256, bool), np.r_[True, np.zeros(255, bool)])
    assert not budget.searched(budget.search_check(one, n_validation=300))


def broken(k: int, n: int) -> Losses:
    return Losses(np.zeros(n), np.ones(n, bool), np.r_[np.ones(k, bool), np.zeros(n - k, bool)])


def test_the_sequential_search_test_by_hand():
    """1,600 validation prompts let a one-point budget through with 9 broken answers: a share of
    0.5625%. A block is clearly within when its upper Wilson bound is below that, clearly over when
    its lower bound is above it, else close: judged on more prompts, or on the last block by its
    observed share."""
    from attnflow.reducers.validation import sequential

    budget, n = Budget(max_accuracy_drop=0.01), 1600
    assert budget.search_check(broken(0, 64), n)["broken_allowed"] == 9 / 1600
    # 3 of 64: p = 0.046875, lower (p + z²/128 - z·sqrt(p(1-p)/64 + z²/16384)) / (1 + z²/64) = 0.01889 > 0.5625%
    check = budget.search_check(broken(3, 64), n)
    assert check["broken_lower"] == pytest.approx(0.01889, abs=1e-5) and budget.searched(check, final=False) is False
    # 0 of 64: bounds 0 and z²/(64 + z²) = 4.06% hold 0.5625%: close, but 0% is within on the last block
    check = budget.search_check(broken(0, 64), n)
    assert check["broken_upper"] == pytest.approx(2.7055 / 66.7055, abs=1e-5)
    assert budget.searched(check, final=False) is None and budget.searched(check) is True
    # 0 of 600: z²/(600 + z²) = 0.449% is clearly within, on any block
    assert budget.searched(budget.search_check(broken(0, 600), n), final=False) is True
    # 3 and 4 of 600 (0.5% and 0.667%; bounds 0.20%-1.24% for 3): close, decided on the last block by the share
    assert budget.searched(budget.search_check(broken(3, 600), n), final=False) is None
    assert budget.searched(budget.search_check(broken(3, 600), n)) is True
    assert budget.searched(budget.search_check(broken(4, 600), n)) is False
    # KL by its bootstrap bounds, the last block by the upper one (as validation judges it)
    kl = Budget(max_kl=0.01)
    spread = Losses(np.r_[np.zeros(90), np.full(10, 0.1)], np.ones(100, bool), None)  # mean 0.01
    check = kl.search_check(spread, n)
    assert check["kl_lower"] < 0.01 < check["kl_upper"] and kl.searched(check, final=False) is None
    assert kl.searched(check) is False
    assert kl.searched(kl.search_check(Losses(np.full(20, 0.02), np.ones(20, bool), None), n), final=False) is False
    assert sequential(0.1, 0.2, 0.2) is True and sequential(0.2, 0.3, 0.1) is False
    assert sequential(0.1, 0.3, 0.2) is None
