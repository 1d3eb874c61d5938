"""Accepting a schedule on prompts it was not searched on: stratified random splits and one-sided
95% confidence bounds on its fidelity loss.

A schedule searched on some prompts looks better on them than on others (the search picks what
happens to pass there), so ``derive`` accepts a schedule only when an upper confidence bound of
its loss on a separate validation part lies within the budget:

- accuracy: the net drop, the share of validation prompts whose answer the reduction breaks
  (right unreduced, wrong reduced) less the share it fixes, bounded above by Tango's score
  interval for a difference of paired proportions (Tango 1998; ``paired_drop_bounds``);
- next-token top-1 agreement: bounded below by the one-sided Wilson interval;
- next-token KL: the mean bounded above by a seeded percentile bootstrap of the prompts. A bootstrap
  resamples the prompts at hand, so it cannot see flipped answers rarer than about one in n, and each
  flip costs at least ``flip_floor`` nats (close to log 2 for a confident model): a mean-KL budget b
  therefore also allows at most a share b / floor of flipped answers (``kl_flip_share``), which
  ``derive`` certifies as a top-1 agreement bound beside the bootstrap's.

With no answer changed the net bound is the Wilson zero-loss bound z²/(n + z²) (Wilson 1927), so a
budget ``b`` can only ever be met with at least ``min_prompts(b)`` validation prompts (268 for one
point at 95%): ``derive`` says so instead of searching in vain. The search part aims at what
validation will accept: the largest net drop ``drop_allowed`` the validation bound lets through at
the trial's observed share of fixed answers (top-1 disagreements: the largest share
``tolerated(b, n_validation) / n_validation``; KL: the same bootstrap bound), by a sequential test
(``sequential``, a group-sequential scheme in the manner of Wald's SPRT, 1945): a trial is judged on
a first block of the search prompts, and on twice as many while its two-sided interval there holds
that limit (close to it: neither clearly within nor clearly over); only trials near the budget's
edge pay for all the search prompts, and telling a 0.4% from a 0.8% drop takes hundreds of them.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence, TypeVar

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
T = TypeVar("T")


def split(items: Sequence[T], share: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(rest, held): ``int(len(items) * share)`` items held out, drawn at random (``seed``) within
    each question type (an item's ``qtype``, when it has one) in proportion to the type's size, so
    both parts hold every type whatever the file's order; both keep the input order. A draw, not
    an interleaving: a file that cycles through its question types would hand an interleaving's
    parts different types (the scene sets cycle through eight). ``share=0`` holds nothing out."""
    if not 0 <= share < 1:
        raise ValueError(f"the held-out share must be in [0, 1), not {share}")
    k = int(len(items) * share)
    if k == 0:
        return list(items), []
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(str(getattr(item, "qtype", None) or ""), []).append(i)
    place = np.empty(len(items))  # each item's random place within its type, as a quantile
    for members in groups.values():
        place[members] = (rng.permutation(len(members)) + rng.random(len(members))) / len(members)
    held = set(np.argsort(place, kind="stable")[:k].tolist())
    return [e for i, e in enumerate(items) if i not in held], [e for i, e in enumerate(items) if i in held]


def _z(confidence: float) -> float:
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def wilson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper Wilson score bound on a proportion with ``k`` successes in ``n`` trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z, p = _z(confidence), k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def wilson_lower(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided lower Wilson score bound (the upper bound of the complement, mirrored)."""
    return 1.0 - wilson_upper(n - k, n, confidence)


def bootstrap_mean_bounds(values: Sequence[float], confidence: float = CONFIDENCE, *, seed: int = 0,
                          resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """One-sided percentile-bootstrap (lower, upper) bounds on the mean of ``values`` (seeded: reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("a bootstrap bound needs at least one value")
    _z(confidence)
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(1)
    return float(np.quantile(means, 1 - confidence)), float(np.quantile(means, confidence))


def bootstrap_mean_upper(values: Sequence[float], confidence: float = CONFIDENCE, *, seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> float:
    """One-sided percentile-bootstrap upper bound on the mean of ``values`` (seeded: reproducible)."""
    return bootstrap_mean_bounds(values, confidence, seed=seed, resamples=resamples)[1]


def sequential(lower: float, upper: float, allowed: float) -> bool | None:
    """A sequential test's verdict on a block: True when the upper bound is within ``allowed``
    (clearly within), False when the lower bound is above it (clearly over), None when the bounds
    hold it (close: judge on more prompts)."""
    return True if upper <= allowed + 1e-12 else False if lower > allowed + 1e-12 else None


def paired_drop_bounds(broken: int, fixed: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """One-sided ``confidence`` (lower, upper) bounds on the net accuracy drop ``(broken - fixed) / n``
    of ``n`` paired answers, ``broken`` right unreduced and wrong reduced, ``fixed`` the reverse:
    Tango's score interval for a difference of paired proportions (Tango 1998, Statistics in
    Medicine 17:891). For a hypothesised drop δ the score statistic is
    Z(δ) = (b - c - nδ) / sqrt(n(2q + δ(1 - δ))), q the restricted maximum-likelihood share of fixed
    answers, q = (sqrt(B² - 4AC) - B) / 2A with A = 2n, B = -b - c + (2n - b + c)δ, C = -cδ(1 - δ);
    the bounds are where Z = ±z (found by bisection: Z falls as δ grows). It depends on the
    discordant answers only (answers the reduction leaves alone narrow it through n), fixed answers
    offset broken ones, and with none of either the upper bound is the Wilson zero-loss bound
    z²/(n + z²), whatever the accuracy (Newcombe's hybrid interval, by contrast, collapses to 0 at
    an accuracy of one half)."""
    if n <= 0 or broken < 0 or fixed < 0 or broken + fixed > n:
        raise ValueError(f"need 0 <= broken + fixed <= n and n > 0, got broken={broken}, fixed={fixed}, n={n}")
    z = _z(confidence)
    b, c = broken, fixed

    def score(delta: float) -> float:
        big_b = -b - c + (2 * n - b + c) * delta
        root = math.sqrt(max(0.0, big_b * big_b + 8 * n * c * delta * (1 - delta)))
        q = (root - big_b) / (4 * n)
        var = n * (2 * q + delta * (1 - delta))
        diff = b - c - n * delta
        return diff / math.sqrt(var) if var > 0 else math.copysign(math.inf, diff) if diff else 0.0

    def solve(lo: float, hi: float, target: float) -> float:  # score(lo) >= target >= score(hi)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if score(mid) >= target else (lo, mid)
        return (lo + hi) / 2

    theta = (b - c) / n
    return solve(-1.0, theta, z), solve(theta, 1.0, -z)


def drop_allowed(budget: float, n: int, right: float, fixed: float, confidence: float = CONFIDENCE) -> float:
    """The largest net drop share that ``n`` prompts certify within ``budget`` (the upper bound of
    ``paired_drop_bounds``) when the reduction fixes a share ``fixed`` of them and at most the share
    ``right`` the unreduced model answers right can break (both rounded to counts): what a search
    trial's net drop is held against, the bound depending on the churn as well as the drop, so the
    trial's observed rates stand in for validation's. Broken answers are added one at a time, as
    ``tolerated`` adds losses, while the bound stays within the budget; one broken answer short of
    none when even none is over it. With nothing fixed it is ``tolerated(budget, n) / n``, the Wilson
    rule on broken answers (the two bounds agree when no answer is fixed)."""
    r = round(right * n)
    c = min(round(fixed * n), n - r)
    b = -1
    while b + 1 <= r and paired_drop_bounds(b + 1, c, n, confidence)[1] <= budget + 1e-9:
        b += 1
    return (b - c) / n


def tolerated(budget: float, n: int, confidence: float = CONFIDENCE) -> int:
    """The most losses in ``n`` prompts whose upper Wilson bound stays within ``budget`` (-1: none)."""
    k = -1
    while k + 1 <= n and wilson_upper(k + 1, n, confidence) <= budget + 1e-12:
        k += 1
    return k


def flip_floor(top: np.ndarray) -> np.ndarray:
    """Per prompt, the least next-token KL(p || q) in nats of a reduced distribution q whose top-1 token
    differs from p's, given p's top-1 probability ``top``: KL(Bern(p₁) || Bern(½)) = log 2 − H(p₁) for
    p₁ > ½, else 0. (Merging every other token, KL(p || q) ≥ KL(Bern(p₁) || Bern(q₁)) by data processing,
    and a flip means q₁ ≤ ½.) A confident model pays close to log 2 = 0.69 nats for every flipped answer:
    the tail of the mean KL that a few prompts cannot see."""
    p = np.clip(np.asarray(top, dtype=np.float64), 0.5, 1.0)
    q = 1 - p
    return p * np.log(2 * p) + np.where(q > 0, q * np.log(np.where(q > 0, 2 * q, 1.0)), 0.0)


def kl_flip_share(max_kl: float, floor: float) -> float | None:
    """The largest share of flipped top-1 answers a mean next-token KL of ``max_kl`` leaves room for when
    each flip costs at least ``floor`` nats (``flip_floor``, averaged over prompts): ``max_kl / floor``;
    None when a flip fits within the budget (``floor <= max_kl``). Certified as an agreement of at least
    one minus it, it bounds the flips too rare for a bootstrap of the mean to show; on the zero-flip
    Wilson bound that takes ``min_prompts`` of it, z²(floor / max_kl − 1), validation prompts."""
    if max_kl <= 0:
        raise ValueError(f"a KL budget must be positive, got {max_kl}")
    return max_kl / floor if floor > max_kl else None


def min_prompts(budget: float, confidence: float = CONFIDENCE) -> int:
    """The fewest prompts with which zero losses bound a loss share within ``budget`` (Wilson): also
    the fewest with which a reduction that changes no answer has its net accuracy drop certified
    (``paired_drop_bounds``' upper bound is then the same z²/(n + z²))."""
    if not 0 < budget < 1:
        raise ValueError(f"a loss budget must lie in (0, 1), got {budget}")
    z2 = _z(confidence) ** 2
    return math.ceil(z2 * (1 - budget) / budget - 1e-9)


def tightest_share(n: int, confidence: float = CONFIDENCE) -> float:
    """The smallest loss share ``n`` prompts can certify, with zero losses: z²/(n + z²), rounded up to
    two significant digits (``min_prompts`` of it is at most ``n``)."""
    if n <= 0:
        raise ValueError(f"need at least one prompt, got {n}")
    z2 = _z(confidence) ** 2
    return round_up(z2 / (n + z2))


def round_up(x: float, digits: int = 2) -> float:
    """``x`` > 0 rounded up to ``digits`` significant digits."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return round(math.ceil(x / step - 1e-9) * step, 12)
