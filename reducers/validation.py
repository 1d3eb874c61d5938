"""Accepting a schedule on prompts it was not searched on: stratified random splits and one-sided
95% confidence bounds on its fidelity loss.

A schedule searched on some prompts looks better on them than on others (the search picks what
happens to pass there), so ``derive`` accepts a schedule only when an upper confidence bound of
its loss on a separate validation part lies within the budget:

- accuracy: the share of validation prompts the unreduced model answers right and the reduced
  one wrong, bounded above by the one-sided Wilson score interval (Wilson 1927; answers the
  reduction fixes are not credited, so the bound is conservative);
- next-token top-1 agreement: bounded below by the one-sided Wilson interval;
- next-token KL: the mean bounded above by a seeded percentile bootstrap of the prompts.

With zero losses the Wilson bound is z²/(n + z²), so a budget ``b`` can only ever be met with at
least ``min_prompts(b)`` validation prompts (268 for one point at 95%): ``derive`` says so
instead of searching in vain. The search part aims at what validation will accept, the largest
loss share ``tolerated(b, n_validation) / n_validation`` the validation bound lets through (KL: the
same bootstrap bound), by a sequential test (``sequential``, a group-sequential scheme in the manner
of Wald's SPRT, 1945): a trial is judged on a first block of the search prompts, and on twice as
many while its two-sided interval there holds that share (close to it: neither clearly within nor
clearly over); only trials near the budget's edge pay for all the search prompts, and telling
0.4% from 0.8% broken answers takes hundreds of them.
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


def tolerated(budget: float, n: int, confidence: float = CONFIDENCE) -> int:
    """The most losses in ``n`` prompts whose upper Wilson bound stays within ``budget`` (-1: none)."""
    k = -1
    while k + 1 <= n and wilson_upper(k + 1, n, confidence) <= budget + 1e-12:
        k += 1
    return k


def min_prompts(budget: float, confidence: float = CONFIDENCE) -> int:
    """The fewest prompts with which zero losses bound a loss share within ``budget``."""
    if not 0 < budget < 1:
        raise ValueError(f"a loss budget must lie in (0, 1), got {budget}")
    z2 = _z(confidence) ** 2
    return math.ceil(z2 * (1 - budget) / budget - 1e-9)
