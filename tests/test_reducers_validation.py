"""Accepting a schedule on prompts it was not searched on: the split, the confidence bounds by hand,
and a derivation whose search prompts accept what its validation prompts reject."""

from __future__ import annotations

import math
from collections import Counter
from statistics import NormalDist

import numpy as np
import pytest
import torch

from attnflow.models import default_inputs, load_model
from attnflow.probes.inputs import Example, load_examples
from attnflow.reducers import ScheduleError
from attnflow.reducers.derive import Budget, Losses, derive
from attnflow.reducers.validation import (
    bootstrap_mean_upper,
    drop_allowed,
    flip_floor,
    kl_flip_share,
    min_prompts,
    paired_drop_bounds,
    split,
    tolerated,
    wilson_lower,
    wilson_upper,
)
from tests.claims import findings_claiming

Z2 = 2.7055  # z² at one-sided 95% (z = 1.6449)
Z = NormalDist().inv_cdf(0.95)


def table(a: int, b: int, c: int, d: int) -> Losses:
    """Hand-made losses of a paired table, prompts in order: ``a`` right unreduced and reduced, ``b``
    broken, ``c`` fixed, ``d`` wrong both (no KL, every top-1 agreeing)."""
    n, counts = a + b + c + d, [a, b, c, d]
    return Losses(np.zeros(n), np.ones(n, bool), np.repeat([False, True, False, False], counts),
                  np.repeat([False, False, True, False], counts), np.repeat([True, True, False, False], counts))


def broken(k: int, n: int) -> Losses:
    """``k`` answers broken of ``n``, every answer right unreduced and none fixed."""
    return table(n - k, k, 0, 0)


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


def tango_score(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic (Tango 1998) for a hypothesised net drop ``delta``, written out
    independently of reducers.validation."""
    a_, b_ = 2 * n, -b - c + (2 * n - b + c) * delta
    c_ = -c * delta * (1 - delta)
    q = (np.sqrt(b_ * b_ - 4 * a_ * c_) - b_) / (2 * a_)
    return (b - c - n * delta) / np.sqrt(n * (2 * q + delta * (1 - delta)))


def test_the_paired_net_drop_bounds_by_hand():
    """Tango's score interval on 1,600 prompts, 8 broken and 8 fixed (θ = 0): at δ = 0.0044387,
    A = 3200, B = -16 + 3200·δ = -1.7962, C = -8·δ(1 - δ) = -0.035352, B² - 4AC = 455.73, so
    q = (21.348 + 1.7962)/6400 = 0.0036163; n(2q + δ(1 - δ)) = 1600·0.0116516 = 18.6426, and
    Z = -1600·δ/4.3177 = -1.6448 = -z: the upper bound; the lower one mirrors it (b = c)."""
    lower, upper = paired_drop_bounds(8, 8, 1600)
    assert upper == pytest.approx(0.0044387, abs=1e-6) and lower == pytest.approx(-upper)
    assert tango_score(8, 8, 1600, 0.0044387) == pytest.approx(-1.6448, abs=1e-3)
    for b, c, n in [(8, 8, 1600), (3, 1, 14), (0, 5, 20), (4, 0, 10), (0, 0, 1), (20, 0, 320), (16, 12, 1600)]:
        lower, upper = paired_drop_bounds(b, c, n)
        assert -1 <= lower <= (b - c) / n <= upper <= 1
        assert tango_score(b, c, n, upper) == pytest.approx(-Z, abs=1e-6)
        if lower > -1:
            assert tango_score(b, c, n, lower) == pytest.approx(Z, abs=1e-6)
    # nothing changed: the Wilson zero-loss bound z²/(n + z²), whatever the accuracy
    assert paired_drop_bounds(0, 0, 1600)[1] == pytest.approx(Z * Z / (1600 + Z * Z)) == pytest.approx(wilson_upper(0, 1600))
    # nothing fixed: the Wilson bound on the broken answers
    assert paired_drop_bounds(9, 0, 1600)[1] == pytest.approx(wilson_upper(9, 1600))
    # fixing more than it breaks: a negative drop, here even bounded below zero
    lower, upper = paired_drop_bounds(4, 12, 1600)
    assert lower < -0.005 < upper < 0  # θ = -8/1600
    with pytest.raises(ValueError, match="broken"):
        paired_drop_bounds(0, 0, 0)
    with pytest.raises(ValueError, match="broken"):
        paired_drop_bounds(5, 6, 10)


def test_a_budget_is_certified_by_its_bound_not_its_mean():
    budget = Budget(max_accuracy_drop=0.01)
    assert budget.certified(budget.bounds(broken(0, 300)))  # 0/300: bound 0.0089
    bounds = budget.bounds(broken(1, 300))
    assert bounds["accuracy_drop_upper"] == pytest.approx(wilson_upper(1, 300)) and bounds["broken_share"] == 1 / 300
    assert not budget.certified(bounds)  # a 0.33-point drop whose 95% bound is 1.9 points
    assert budget.prompts_needed() == 268
    assert Budget(min_agreement=0.95).prompts_needed() == min_prompts(0.05)
    with pytest.raises(ScheduleError, match="never be certified"):
        Budget(max_accuracy_drop=0.0).prompts_needed()


def test_the_net_drop_certifies_what_broken_answers_alone_would_not():
    """1,600 prompts, 1516 right unreduced: 16 broken (1%: Wilson bound 1.50%, over one point) and
    12 fixed, a net drop of 4/1600 = 0.25% bounded by 0.83%: within. 30 broken and none fixed: a
    1.88% drop, over by either rule (both 2.52%: with nothing fixed they agree)."""
    budget = Budget(max_accuracy_drop=0.01)
    churn = budget.bounds(table(1500, 16, 12, 72))
    assert wilson_upper(16, 1600) > 0.01 and churn["broken_share"] == 0.01
    assert churn["accuracy_drop_upper"] == pytest.approx(0.008287, abs=1e-6) and budget.certified(churn)
    worse = budget.bounds(table(1518, 30, 0, 52))
    assert worse["accuracy_drop_upper"] == pytest.approx(wilson_upper(30, 1600)) == pytest.approx(0.025194, abs=1e-6)
    assert not budget.certified(worse)
    with pytest.raises(ScheduleError, match="needs inputs with answers"):
        budget.bounds(Losses(np.zeros(4), np.ones(4, bool), None))


def test_validation_rejects_what_the_search_prompts_accept():
    """The toy VLM reads colours early and places/counts late: searched on colour questions alone,
    an early visual exit and more pass; the where/count validation prompts reject the search's result
    (or a smaller cut on the way to it), and derive keeps what validation accepted before."""
    torch.set_num_threads(1)
    model, processor = load_model("toy-vlm")
    examples = load_examples(default_inputs("toy-vlm"))
    colour = [e for e in examples if e.qtype == "color_of_shape"][:16]
    late = [e for e in examples if e.qtype in ("where", "count")][:24]
    schedule = derive(findings_claiming(3, 6), model, colour, processor, Budget(max_kl=0.1), validation=late)
    trials = schedule.derived_from["trials"]
    result = schedule.derived_from["searched"]
    assert result and any(t["part"] == "search" and t["steps"] == result and t["within_budget"] for t in trials)
    rejected = [t for t in trials if t["part"] == "validation" and not t["within_budget"]]
    assert len(rejected) == 1 and schedule.steps != result
    validation = schedule.derived_from["validation"]
    assert validation["within_budget"] and validation["kl_upper"] <= 0.1 and validation["n_examples"] == 24
    assert schedule.derived_from["fidelity"]["n_examples"] == 16
    assert schedule.derived_from["reasons"][-1].endswith(f"the sequence stops at {schedule.steps or 'no reduction'}")


def test_a_budget_the_validation_part_cannot_certify_is_refused_up_front():
    model, processor = load_model("toy-vlm")
    examples = load_examples(default_inputs("toy-vlm"))[:40]
    with pytest.raises(ScheduleError, match="needs at least 268 validation prompts"):
        derive(findings_claiming(3, 6), model, examples, processor, Budget(max_accuracy_drop=0.01))


def test_the_search_aims_at_what_validation_can_accept():
    assert tolerated(0.01, 300) == 0 and tolerated(0.01, 100) == -1  # 1/300 is bounded by 1.9%
    assert wilson_upper(tolerated(0.02, 1000), 1000) <= 0.02 < wilson_upper(tolerated(0.02, 1000) + 1, 1000)
    # every answer right, none fixed: the net bound is the Wilson bound on broken answers
    for budget, n in ((0.01, 300), (0.01, 100), (0.01, 1600), (0.02, 1000)):
        assert drop_allowed(budget, n, 1.0, 0.0) == tolerated(budget, n) / n
    # 1548 of 1600 right, 20 fixed: 24 broken certify (bound 0.958%), 25 do not (1.029%): a net 4/1600
    assert drop_allowed(0.01, 1600, 0.9675, 20 / 1600) == 4 / 1600
    assert paired_drop_bounds(24, 20, 1600)[1] <= 0.01 < paired_drop_bounds(25, 20, 1600)[1]
    # churn costs: fixing 50 and breaking 50 of 1600 is bounded by more than a point, so 49 at most
    assert drop_allowed(0.01, 1600, 0.9375, 50 / 1600) == -1 / 1600
    budget = Budget(max_accuracy_drop=0.01)
    clean = broken(0, 256)
    # 0 of 256 broken cannot be certified on 256 prompts (bound 1.05%), but is what 300 validation prompts accept
    assert not budget.certified(budget.bounds(clean))
    check = budget.search_check(clean, n_validation=300)
    assert check == pytest.approx({"drop_share": 0.0, "drop_lower": -wilson_upper(0, 256),
                                   "drop_upper": wilson_upper(0, 256), "drop_allowed": 0.0})
    assert budget.searched(check)
    assert not budget.searched(budget.search_check(broken(1, 256), n_validation=300))


def test_the_sequential_search_test_by_hand():
    """1,600 validation prompts on which every answer is right and none is fixed let a one-point
    budget through with 9 broken answers: a net drop of 0.5625%. A block is clearly within when its
    upper bound is below that, clearly over when its lower bound is above it, else close: judged on
    more prompts, or on the last block by its observed net drop."""
    from attnflow.reducers.validation import sequential

    budget, n = Budget(max_accuracy_drop=0.01), 1600
    assert budget.search_check(broken(0, 64), n)["drop_allowed"] == 9 / 1600
    # 6 of 64 broken, none fixed: Tango's lower bound is then Wilson's, 4.93%: clearly over 0.5625%
    check = budget.search_check(broken(6, 64), n)
    assert check["drop_lower"] == pytest.approx(wilson_lower(6, 64)) == pytest.approx(0.049256, abs=1e-6)
    assert budget.searched(check, final=False) is False
    # 3 of 64: the lower bound 0.44% lies below 0.5625%: close
    assert budget.search_check(broken(3, 64), n)["drop_lower"] == pytest.approx(0.004414, abs=1e-6)
    assert budget.searched(budget.search_check(broken(3, 64), n), final=False) is None
    # 0 of 64: bounds ∓z²/(64 + z²) = 4.06% hold 0.5625%: close, but 0% is within on the last block
    check = budget.search_check(broken(0, 64), n)
    assert check["drop_upper"] == pytest.approx(Z2 / 66.7055, abs=1e-5)
    assert budget.searched(check, final=False) is None and budget.searched(check) is True
    # 0 of 600: z²/(600 + z²) = 0.449% is clearly within, on any block
    assert budget.searched(budget.search_check(broken(0, 600), n), final=False) is True
    # 3 and 4 of 600 (0.5% and 0.667%; bounds 0.05% to 1.24% for 3): close, decided on the last block by the drop
    assert budget.searched(budget.search_check(broken(3, 600), n), final=False) is None
    assert budget.searched(budget.search_check(broken(3, 600), n)) is True
    assert budget.searched(budget.search_check(broken(4, 600), n)) is False
    # fixed answers count: 564 right both, 6 broken (1%: over 0.5625% by broken answers alone), 5 fixed,
    # 25 wrong both. Validation at these rates (1520 right, 13 fixed of 1600) certifies up to 19 broken,
    # a net 6/1600 = 0.375%; the net drop is 1/600 = 0.167%, bounds -0.83% to 1.19%: close, within at the last
    check = budget.search_check(table(564, 6, 5, 25), n)
    assert check["drop_share"] == 1 / 600 and check["drop_allowed"] == 6 / 1600
    assert paired_drop_bounds(19, 13, 1600)[1] <= 0.01 < paired_drop_bounds(20, 13, 1600)[1]
    assert budget.searched(check, final=False) is None and budget.searched(check) is True
    # the same with 10 broken: a net 5/600 = 0.833%, over; 10 broken and none fixed is clearly over
    assert budget.searched(budget.search_check(table(555, 10, 5, 30), n)) is False
    assert budget.searched(budget.search_check(table(560, 10, 0, 30), n), final=False) is False
    # KL by its bootstrap bounds, the last block by the upper one (as validation judges it)
    kl = Budget(max_kl=0.01)
    spread = Losses(np.r_[np.zeros(90), np.full(10, 0.1)], np.ones(100, bool), None)  # mean 0.01
    check = kl.search_check(spread, n)
    assert check["kl_lower"] < 0.01 < check["kl_upper"] and kl.searched(check, final=False) is None
    assert kl.searched(check) is False
    assert kl.searched(kl.search_check(Losses(np.full(20, 0.02), np.ones(20, bool), None), n), final=False) is False
    assert sequential(0.1, 0.2, 0.2) is True and sequential(0.2, 0.3, 0.1) is False
    assert sequential(0.1, 0.3, 0.2) is None


def test_a_flip_costs_at_least_the_floor_and_a_kl_budget_caps_the_flips():
    """The floor by hand (0 at p1 <= 1/2, log 2 - H(0.9) at 0.9, log 2 at 1); every random pair of
    next-token distributions whose top-1 differs has a KL at least the floor of p's top-1 (tight at
    q1 = 1/2 on two tokens); a KL budget b caps the flip share at b / floor, which min_prompts certifies
    from the first n whose zero-flip Wilson bound times the floor is within the budget."""
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert flip_floor(np.array([0.3, 0.5, 0.9, 1.0])) == pytest.approx([0, 0, math.log(2) - h, math.log(2)])
    gen = torch.Generator().manual_seed(0)
    p = (3 * torch.randn(4000, 6, generator=gen)).softmax(-1).double()
    q = (3 * torch.randn(4000, 6, generator=gen)).softmax(-1).double()
    flipped = p.argmax(-1) != q.argmax(-1)
    kl = (p * (p / q).log()).sum(-1)
    floor = torch.from_numpy(flip_floor(p.amax(-1).numpy()))
    assert flipped.sum() > 1000 and bool((kl[flipped] >= floor[flipped] - 1e-12).all())
    assert flip_floor(np.array([0.8]))[0] == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4))  # vs (1/2, 1/2)
    assert kl_flip_share(0.01, 0.64) == pytest.approx(0.01 / 0.64)
    n = min_prompts(kl_flip_share(0.01, 0.64))
    assert n == math.ceil(Z * Z * 63) and wilson_upper(0, n) * 0.64 <= 0.01 < wilson_upper(0, n - 1) * 0.64
    assert kl_flip_share(0.5, 0.3) is None  # a budget above what any flip costs caps no flip


def test_a_kl_budget_rejects_flips_its_bootstrap_lets_through():
    """3 of 40 prompts flip at 0.64 nats each (the rest cost nothing): the mean KL is 0.048 and its
    bootstrap bound about 0.09, within 0.1; but a flip costing at least 0.64 nats, 0.1 allows at most
    15.6% flips, and Wilson's bound on 3 in 40 is 17.3%: with_flips rejects what the bootstrap accepts.
    Two flips (Wilson 14.0%) pass both; without a KL bound, or with a floor below it, nothing changes."""
    def losses(flips: int) -> Losses:
        kl = np.r_[np.full(flips, 0.64), np.zeros(40 - flips)]
        return Losses(kl, kl == 0, None)

    plain = Budget(max_kl=0.1)
    judged = plain.with_flips(0.64)
    assert judged.max_kl == 0.1 and judged.min_agreement == pytest.approx(1 - 0.1 / 0.64)
    assert wilson_upper(3, 40) == pytest.approx(0.173, abs=1e-3) and wilson_upper(2, 40) == pytest.approx(0.140, abs=1e-3)
    three = plain.bounds(losses(3))
    assert three["kl_upper"] < 0.1 and plain.certified(three)
    assert not judged.certified(judged.bounds(losses(3)))
    assert judged.certified(judged.bounds(losses(2)))
    assert judged.prompts_needed() == min_prompts(0.1 / 0.64) == 15
    assert plain.with_flips(0.15).min_agreement == pytest.approx(1 / 3)  # a flip above the budget: capped
    assert plain.with_flips(0.05) == plain and Budget(min_agreement=0.9).with_flips(0.64) == Budget(min_agreement=0.9)
    assert Budget(max_kl=0.1, min_agreement=0.9).with_flips(0.64).min_agreement == 0.9  # the stricter holds


def test_the_tightest_share_n_prompts_certify_is_within_their_reach():
    """tightest_share(n), z²/(n + z²) rounded up to two digits, needs at most n prompts, and a share a
    hundredth of its size smaller than that needs more (for n from 1 to 400)."""
    from attnflow.reducers.validation import round_up, tightest_share

    for n in range(1, 401):
        share = tightest_share(n)
        assert min_prompts(share) <= n < min_prompts(Z * Z / (n + Z * Z) * 0.99)
    assert (round_up(0.0123), round_up(0.5), round_up(0.01), round_up(0.0999)) == (0.013, 0.5, 0.01, 0.1)


def test_how_often_a_kl_budget_accepts_a_schedule_over_it():
    """Exact acceptance probabilities over the binomial number of flipped answers among n validation
    prompts, each prompt costing 0.002 nats unflipped: flips at the floor (0.6 nats) in 2% of prompts put
    the mean KL at 0.014, over a 0.01 budget. The bootstrap alone accepts it whenever no flip shows,
    13% of the time on 100 prompts (above its nominal 5%); certifying the flips (with_flips) refuses 100
    prompts outright and accepts on 200 only 1.8% of the time. Flips that cost more than the floor stay a
    blind spot: at 2 nats in 0.5% of prompts (mean 0.012) 200 prompts still accept 37% of the time."""
    from scipy.stats import binom

    def accepted(budget: Budget, n: int, p: float, cost: float) -> float:
        chance = 0.0
        for k in range(n + 1):
            kl = np.r_[np.full(k, cost), np.full(n - k, 0.002)]
            if budget.certified(budget.bounds(Losses(kl, kl < cost, None))):
                chance += binom.pmf(k, n, p)
        return chance

    plain = Budget(max_kl=0.01)
    judged = plain.with_flips(0.6)
    assert 0.02 * 0.6 + 0.98 * 0.002 > 0.01 and 0.005 * 2 + 0.995 * 0.002 > 0.01
    assert accepted(plain, 100, 0.02, 0.6) == pytest.approx(0.98 ** 100) and 0.98 ** 100 > 0.13
    assert judged.prompts_needed() > 100 and accepted(judged, 100, 0.02, 0.6) == 0
    assert accepted(judged, 200, 0.02, 0.6) == pytest.approx(0.98 ** 200) and 0.98 ** 200 < 0.05
    assert accepted(judged, 200, 0.005, 2.0) == pytest.approx(0.995 ** 200) and 0.995 ** 200 > 0.36
