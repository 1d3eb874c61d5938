"""Derive a model's schedule from its Findings under a fidelity budget.

Evidence, each turned into a starting point (FastV arXiv 2403.06764 for ranking by the last
position's attention after the image is read, PyramidDrop arXiv 2410.17247 for later stages):

- visual exit: the Findings' knockout exit layer (``exit.layers.knockout``, else
  ``exit.layer``): from there on cutting text->visual attention barely changes the output;
- first pruning layer K: the first layer after the peak of the observational text->visual
  curve where it falls below ``fade`` x its peak, or the layer after the peak when it never
  fades (the image has been read at the peak; attention from there ranks tokens best);
- keep share: the smallest share of visual tokens whose last-row attention at layer K-1
  covers ``coverage`` of the visual mass (measured on the inputs, mean over prompts); the
  prune stage is searched at K and every earlier layer (keep by x2/3 steps, then REFINE
  halvings of the last step), the cheapest within budget wins;
- the score: the other scores of ``reducers.scores`` (random and pooling as controls,
  DivPrune's diversity, DART's duplication) are searched at that layer and before the first
  decoder layer (layer 0; DART at layer 1, as it needs a layer's keys), and the
  cheapest of all within budget wins, because attention ranking is a poor score where the
  last row is dominated by sinks or position (arXiv 2508.17807, 2502.11501); then a second,
  smaller stage with the winning score is tried at every later layer (PyramidDrop-style); before
  it, the winning stage recycling what it drops (SparseVLM's recycling, arXiv 2410.04417: a few
  kept tokens hold the mean of clusters of the dropped ones), which may keep fewer within budget;
- layers to skip: ``redundancy.candidates`` (most redundant first), tried one at a time;
- protected visual sinks: ``sinks.visual`` positions, mapped to visual-token indices.

The inputs are split (``reducers.validation.split``) into a search part and a validation part.
A greedy search on the search part: the earliest exit within budget, the prune stages with the
lowest predicted FLOPs within budget, then every skip that stays within budget. Each trial is
judged against what the validation part can accept (its losses against the unreduced model:
next-token KL by its 95% bootstrap bound, the share of top-1 disagreements and the net accuracy
drop, answers broken less answers fixed, against the largest the validation bound lets through;
see ``reducers.validation``) by a sequential test (``Budget.searched``): on the first
``first_block`` search prompts, and on twice as many while its 95% bounds there hold the budget's
edge, up to ``max_examples``; a trial still close on all of them is judged by its KL bound and its
observed share and drop. Clearly-over trials (random and pooling cuts, deep cuts) cost one block,
so the search can afford the hundreds of prompts that telling a 0.4% from a 0.8% drop takes for
the close ones. The result must then keep its bounds within budget on the validation prompts,
which the search never saw, by fixed-sequence testing (Learn then Test, arXiv 2110.01052): the search's
result scaled to a rising share of its cut (``Settings.shares``), safest first, then with its skips, each
accepted while its bounds lie within budget, stopping at the first rejected; the last accepted is the
schedule (no reduction if the first is rejected), and the chance that it is over budget is at most
one minus the bounds' confidence however many were tested. Every choice and trial (with its part and the prompts it was judged on) is written to
``derived_from``; ``fidelity`` holds the search part's figures (in-sample), ``validation`` the
held-out ones it was accepted on. Nothing here times or verifies: callers verify the result once,
on prompts neither part saw (``reducers.verify.verify_schedule``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from attnflow.analyses.findings import Findings
from attnflow.probes import adapters
from attnflow.probes.inputs import Example, as_examples, encode
from attnflow.reducers.apply import apply
from attnflow.reducers.cost import Shape, predict, prediction
from attnflow.reducers.fidelity import (
    answers_right,
    encode_batches,
    generate_greedy,
    per_prompt_fidelity,
)
from attnflow.reducers.schedule import Schedule, ScheduleError, model_info
from attnflow.reducers.inputcut import available_scores, input_cut_refused
from attnflow.reducers.scores import INPUT_SCORES
from attnflow.reducers.validation import (
    CONFIDENCE,
    bootstrap_mean_bounds,
    bootstrap_mean_upper,
    drop_allowed,
    flip_floor,
    kl_flip_share,
    min_prompts,
    paired_drop_bounds,
    round_up,
    sequential,
    split,
    tightest_share,
    tolerated,
    wilson_lower,
    wilson_upper,
)

BOUNDS_METHOD = ("one-sided Tango score, paired (net accuracy drop), one-sided Wilson score (agreement), "
                 "percentile bootstrap of the mean (KL)")
DEFAULT_MAX_KL = 0.01  # nats; used when a budget names no bound
DEFAULT_MIN_AGREEMENT = 0.95  # attnflow run's budget when its validation prompts are too few for KL 0.01
BUDGET_KEYS = ("max_kl", "min_agreement", "max_accuracy_drop")


class TooFewPrompts(ScheduleError):
    """A budget the validation prompts are too few to certify, whatever the schedule."""


@dataclass(frozen=True)
class Budget:
    """The fidelity a derived schedule must keep against the unreduced model on the inputs:
    mean next-token KL(full || reduced) at most ``max_kl`` (nats), top-1 agreement at least
    ``min_agreement``, and/or task accuracy (answers required) at most ``max_accuracy_drop``
    below the unreduced model's (a share: 0.01 = one point); with none, ``max_kl`` =
    DEFAULT_MAX_KL."""

    max_kl: float | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.max_kl is None and self.min_agreement is None and self.max_accuracy_drop is None:
            object.__setattr__(self, "max_kl", DEFAULT_MAX_KL)
        if self.max_kl is not None and not self.max_kl >= 0:
            raise ScheduleError(f"budget max_kl must be >= 0, got {self.max_kl}")
        for name in ("min_agreement", "max_accuracy_drop"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ScheduleError(f"budget {name} must lie in [0, 1], got {value}")

    @classmethod
    def of(cls, budget: "Budget | dict[str, float]") -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if not isinstance(budget, dict) or set(budget) - set(BUDGET_KEYS):
            raise ScheduleError(f"a budget takes {', '.join(BUDGET_KEYS)}, got {budget!r}")
        return cls(**budget)

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in BUDGET_KEYS if getattr(self, k) is not None}

    def with_flips(self, floor: float) -> "Budget":
        """This budget with what a KL bound implies when a flipped answer costs at least ``floor`` nats
        (reducers.validation.kl_flip_share): a top-1 agreement of at least one minus the flip share the
        mean KL leaves room for, certified by Wilson's bound beside the bootstrap's, which cannot see
        flips rarer than about one in its prompts. Unchanged without a KL bound or when a flip fits it."""
        share = kl_flip_share(self.max_kl, floor) if self.max_kl else None
        if share is None:
            return self
        return replace(self, min_agreement=max(self.min_agreement or 0.0, 1 - share))

    def bounds(self, losses: "Losses", confidence: float = CONFIDENCE) -> dict[str, float]:
        """One-sided ``confidence`` bounds (reducers.validation) on what the budget limits: the mean KL
        (bootstrap), the top-1 agreement (Wilson, lower) and the net accuracy drop, answers broken
        less answers fixed (Tango's paired score bound, upper: the budget's accuracy drop); beside it
        the observed share of broken answers (``broken_share``), the churn the net drop hides."""
        out: dict[str, float] = {}
        if self.max_kl is not None:
            out["kl_upper"] = bootstrap_mean_upper(losses.kl, confidence)
        if self.min_agreement is not None:
            out["agreement_lower"] = wilson_lower(int(losses.agree.sum()), losses.agree.size, confidence)
        if self.max_accuracy_drop is not None:
            a, b, c, d = losses.table()
            out["accuracy_drop_upper"] = paired_drop_bounds(b, c, a + b + c + d, confidence)[1]
            out["broken_share"] = b / (a + b + c + d)
        return out

    def certified(self, bounds: dict[str, float]) -> bool:
        """Whether the confidence bounds of ``bounds()`` lie within the budget."""
        return ((self.max_kl is None or bounds["kl_upper"] <= self.max_kl)
                and (self.min_agreement is None or bounds["agreement_lower"] >= self.min_agreement)
                and (self.max_accuracy_drop is None or bounds["accuracy_drop_upper"] <= self.max_accuracy_drop + 1e-9))

    def search_check(self, losses: "Losses", n_validation: int, confidence: float = CONFIDENCE) -> dict[str, float]:
        """What a search-part trial is judged by: the mean KL with its bootstrap bounds; the observed
        share of top-1 disagreements with its Wilson bounds, beside the largest share the
        ``n_validation`` validation prompts can let through (``reducers.validation.tolerated``); and
        the observed net accuracy drop with its Tango bounds, beside the largest net drop those
        prompts certify at this trial's observed unreduced accuracy and share of fixed answers
        (``reducers.validation.drop_allowed``)."""
        out: dict[str, float] = {}
        if self.max_kl is not None:
            out["kl_lower"], out["kl_upper"] = bootstrap_mean_bounds(losses.kl, confidence)
        if self.min_agreement is not None:
            k, n = int((~losses.agree).sum()), losses.agree.size
            out["disagreement_share"] = k / n
            out["disagreement_lower"] = wilson_lower(k, n, confidence)
            out["disagreement_upper"] = wilson_upper(k, n, confidence)
            out["disagreement_allowed"] = tolerated(1 - self.min_agreement, n_validation, confidence) / n_validation
        if self.max_accuracy_drop is not None:
            a, b, c, d = losses.table()
            n = a + b + c + d
            out["drop_lower"], out["drop_upper"] = paired_drop_bounds(b, c, n, confidence)
            out["drop_share"] = (b - c) / n
            out["drop_allowed"] = drop_allowed(self.max_accuracy_drop, n_validation, (a + b) / n, c / n, confidence)
        return out

    def searched(self, check: dict[str, float], final: bool = True) -> bool | None:
        """A ``search_check``'s verdict by ``reducers.validation.sequential``: True when every bound is
        clearly within what validation can accept, False when one is clearly over; when close, None
        (judge it on more prompts) or, on the last block (``final``), the KL by its upper bound (as
        validation judges it), the disagreement share and the net drop by their observed value."""
        limits = [("kl", self.max_kl, "kl_upper")] if self.max_kl is not None else []
        limits += [(n, check[f"{n}_allowed"], f"{n}_share") for n in ("disagreement", "drop")
                   if f"{n}_share" in check]
        verdicts = [(sequential(check[f"{n}_lower"], check[f"{n}_upper"], allowed), check[last] <= allowed + 1e-12)
                    for n, allowed, last in limits]
        if any(v is False for v, _ in verdicts):
            return False
        if all(v for v, _ in verdicts) or final:
            return all(v or observed for v, observed in verdicts)
        return None

    def prompts_needed(self, confidence: float = CONFIDENCE) -> int:
        """The fewest validation prompts with which the budget is certified for a reduction that loses
        nothing (``reducers.validation.min_prompts``; the net accuracy drop's bound with no answer
        changed is the Wilson zero-loss bound); fewer could certify only a reduction that fixes
        answers, which ``derive`` cannot count on. A KL bound counts through ``with_flips``."""
        shares = [b for b in (self.max_accuracy_drop, None if self.min_agreement is None else 1 - self.min_agreement)
                  if b is not None]
        if any(b <= 0 for b in shares):
            raise ScheduleError("a budget of zero accuracy drop (or agreement 1) can never be certified on a sample "
                                "of prompts: allow a small loss")
        return max([min_prompts(b, confidence) for b in shares if b < 1], default=1)

    def check_prompts(self, n: int, total: int, confidence: float = CONFIDENCE, floor: float | None = None) -> None:
        """Raise TooFewPrompts unless ``n`` validation prompts (of ``total`` inputs) can certify this budget
        (``prompts_needed``), with a KL bound's flips when a flip costs ``floor`` nats (``with_flips``)."""
        needed = self.prompts_needed(confidence)
        flips = needed if floor is None else self.with_flips(floor).prompts_needed(confidence)
        if n >= max(needed, flips):
            return
        why = "" if flips <= needed else (
            f": a flipped answer costs at least {floor:.2f} nats of KL here, so a mean KL of {self.max_kl:g} allows "
            f"at most {kl_flip_share(self.max_kl, floor):.2%} of answers to flip, and ruling out flips too rare to "
            "show takes that many prompts")
        raise TooFewPrompts(f"budget {self.to_dict()} needs at least {max(needed, flips)} validation prompts to be "
                            f"certified at {confidence:.0%} (got {n} of {total} inputs){why}; give more inputs or a "
                            f"larger budget{self._within_reach(n, confidence, floor)}")

    def _within_reach(self, n: int, confidence: float, floor: float | None) -> str:
        """The tightest budgets of this budget's kinds that ``n`` validation prompts certify, in words ('': none)."""
        if n <= 0:
            return ""
        share = tightest_share(n, confidence)
        kinds = [f"max_accuracy_drop {share:g}"] if self.max_accuracy_drop is not None else []
        kinds += [f"min_agreement {1 - share:g}"] if self.min_agreement is not None or self.max_kl else []
        kinds += [f"max_kl {round_up(floor * share):g}"] if self.max_kl and floor else []
        return f" ({n} prompts certify at best {' or '.join(kinds)})" if kinds else ""

    def holds(self, measured: dict[str, Any]) -> bool:
        """Whether ``measured`` (kl, agreement, accuracy_delta) is within the budget."""
        if self.max_accuracy_drop is not None and measured.get("accuracy_delta") is None:
            raise ScheduleError("a max_accuracy_drop budget needs inputs with answers")
        return ((self.max_kl is None or measured["kl"] <= self.max_kl)
                and (self.min_agreement is None or measured["agreement"] >= self.min_agreement)
                and (self.max_accuracy_drop is None
                     or -measured["accuracy_delta"] <= self.max_accuracy_drop + 1e-9))  # 3/300 is 0.01


@dataclass
class Losses:
    """Per-prompt losses of a reduced model against the unreduced one: next-token KL (nats), top-1
    agreement; for the prompts with answers, whether the reduction broke a right answer, whether it
    fixed a wrong one and whether the unreduced model answered right (None without answers)."""

    kl: np.ndarray
    agree: np.ndarray
    broken: np.ndarray | None
    fixed: np.ndarray | None = None
    right: np.ndarray | None = None

    def __add__(self, other: "Losses") -> "Losses":
        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        return Losses(*(cat(getattr(self, f), getattr(other, f))
                        for f in ("kl", "agree", "broken", "fixed", "right")))

    def table(self) -> tuple[int, int, int, int]:
        """The paired 2x2 table of the prompts with answers: right unreduced and reduced, broken,
        fixed, wrong both (``reducers.validation.paired_drop_bounds``)."""
        if self.broken is None or self.fixed is None or self.right is None:
            raise ScheduleError("a max_accuracy_drop budget needs inputs with answers")
        b, c, right = int(self.broken.sum()), int(self.fixed.sum()), int(self.right.sum())
        return right - b, b, c, self.right.size - right - c

    def figures(self) -> dict[str, Any]:
        """Mean next-token KL, top-1 agreement and the accuracy change (what ``verify`` reports)."""
        scored = self.broken is not None and self.fixed is not None and self.broken.size > 0
        return {"kl": float(self.kl.mean()), "agreement": float(self.agree.mean()),
                "accuracy_delta": float(self.fixed.mean() - self.broken.mean()) if scored else None}


# finer near the search's result, where validation's edge lies; the small first steps keep a reduction
# within reach when the search's pick has a tail its prompts did not show (a KL budget on 100 prompts)
SHARES = (0.1, 0.25, 0.4, 0.55, 0.65, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass
class Settings:
    """Knobs of the derivation (coverage and fade: the shares the search starts from)."""

    coverage: float = 0.9  # share of last-row visual attention the kept tokens must cover
    fade: float = 0.5  # the text->visual curve has faded below this share of its peak
    validation_share: float = 0.5  # of the inputs, held out of the search to accept its result
    confidence: float = CONFIDENCE  # of the one-sided bounds a schedule must keep within budget
    max_examples: int = 256  # search prompts a trial close to the budget is judged on, at most
    first_block: int = 64  # search prompts every trial is first judged on (doubled while close)
    batch_size: int = 16
    shares: tuple[float, ...] = SHARES  # of the search's cut, the schedules validation tests in turn (``_sequence``)

    def __post_init__(self) -> None:
        if not self.shares or list(self.shares) != sorted(set(self.shares)) or not 0 < self.shares[0] \
                or self.shares[-1] != 1:
            raise ScheduleError(f"shares must rise from above 0 to 1 (the search's result), got {self.shares}")


class Stage(NamedTuple):
    """A prune stage of a candidate: its layer, keep share, score (reducers.scores.SCORES) and
    whether it recycles (SparseVLM's recycling, reducers.scores.recycle), merges (VisionZip's
    contextual tokens, ``cls`` only) or weighs the kept tokens by what they stand for (ToMe's
    proportional attention, layer 0 only)."""

    layer: int
    keep: float
    by: str = "last_row"
    recycle: bool = False
    merge: bool = False
    proportional: bool = False

    def step(self) -> dict[str, Any]:
        flags = {key: True for key, on in (("recycle", self.recycle), ("merge", self.merge),
                                           ("proportional", self.proportional)) if on}
        return {"op": "prune_visual", "layer": self.layer, "keep": round(self.keep, 4), "by": self.by, **flags}


@dataclass(frozen=True)
class Candidate:
    """One point of the search: an exit layer, prune stages and skipped layers."""

    exit: int | None
    prunes: tuple[Stage, ...] = ()
    skips: tuple[tuple[int, str], ...] = ()

    def steps(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [stage.step() for stage in self.prunes]
        if self.exit is not None:
            out.append({"op": "visual_exit", "layer": self.exit})
        out += [{"op": "skip_layers", "layers": [layer], "tokens": tokens} for layer, tokens in self.skips]
        return out


class Probe:
    """Prompts, encoded in left-padded batches, with the unreduced model's greedy answers, against
    which a schedule's fidelity is measured: on all of them, or block by block (``stops``: the
    batches a sequential test has seen after each block, from ``first_block`` prompts doubling)."""

    def __init__(self, model: nn.Module, processor: Any, examples: list[Example], batch_size: int,
                 first_block: int | None = None) -> None:
        self.model, self.examples = model, examples
        self.tok = getattr(processor, "tokenizer", processor)
        self.batches = encode_batches(processor, examples, batch_size, next(model.parameters()).device)
        image_id = adapters.image_token_id(model)
        self.layouts = [(int(am.sum()), int(((ids == image_id) & am.bool()).sum()))
                        for b in self.batches for ids, am in zip(b["input_ids"], b["attention_mask"])]
        self.starts = np.cumsum([0] + [len(b["input_ids"]) for b in self.batches]).tolist()
        answers = [len(self.tok(ex.answer, add_special_tokens=False)["input_ids"])
                   for ex in examples if ex.answer is not None]
        self.new_tokens = 1 + max(answers, default=0)  # the answer and the token after it
        with torch.no_grad():
            self.full = generate_greedy(model, self.batches, self.tok, self.new_tokens)
        self.right = answers_right(self.full, examples)
        stop, self.stops = -(-(first_block or len(examples)) // batch_size), []
        while stop < len(self.batches):
            self.stops, stop = self.stops + [stop], 2 * stop
        self.stops.append(len(self.batches))

    def losses(self, schedule: Schedule, first: int, stop: int) -> Losses:
        """Per-prompt losses of ``schedule`` on batches ``first`` to ``stop`` (next-token KL(full ||
        reduced) and top-1 agreement at the last prompt position; broken and fixed answers, and the
        unreduced model's right ones, when the prompts have them)."""
        lo, hi = self.starts[first], self.starts[stop]
        with torch.no_grad(), apply(self.model, schedule):
            run = generate_greedy(self.model, self.batches[first:stop], self.tok, self.new_tokens)
        kl, agree = per_prompt_fidelity(self.full.first_logits[lo:hi], run.first_logits)
        scored = [(a, b) for a, b in zip(self.right[lo:hi], answers_right(run, self.examples[lo:hi]))
                  if a is not None]
        right, broken, fixed = (np.array([[a, a and not b, b and not a] for a, b in scored], dtype=bool)
                                .reshape(-1, 3).T if any(r is not None for r in self.right) else (None, None, None))
        return Losses(kl.numpy(), agree.numpy(), broken, fixed, right)


def flip_kl_floor(checker: Probe) -> float:
    """The least next-token KL a flipped answer costs on ``checker``'s prompts, on average
    (reducers.validation.flip_floor of the unreduced model's top-1 probabilities)."""
    top = checker.full.first_logits.float().softmax(-1).amax(-1).double().numpy()
    return float(flip_floor(top).mean())


@dataclass
class _Search:
    """The state of one derivation: the model, the probe prompts, the budget and the log."""

    model: nn.Module
    probe: Probe
    budget: Budget
    protect: dict[str, Any]
    confidence: float = CONFIDENCE
    n_validation: int = 1
    reasons: list[str] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)

    def schedule(self, cand: Candidate) -> Schedule:
        return Schedule.for_model(self.model, cand.steps(), protect=self.protect)

    def flops(self, cand: Candidate) -> float:
        """Predicted FLOPs ratio of ``cand`` on the probe prompts."""
        return predict(self.schedule(cand), Shape.of(self.model), self.probe.layouts)["flops_ratio"]

    def searched_kl(self, cand: Candidate) -> float:
        """The mean next-token KL ``cand`` had on the search prompts it was judged on (``ok`` ran it)."""
        return next(t["kl"] for t in self.trials if t["steps"] == cand.steps() and t["part"] == "search")

    def ok(self, cand: Candidate, probe: Probe | None = None, part: str = "search") -> bool:
        """Whether ``cand`` is a valid schedule within budget on ``probe``'s prompts (logged once per
        part, with the number of prompts it was judged on): on the search part by the sequential
        ``Budget.searched``, block by block while it is close; on validation by the confidence
        bounds on all its prompts."""
        try:
            schedule = self.schedule(cand)
        except ScheduleError:
            return False
        for trial in self.trials:
            if trial["steps"] == cand.steps() and trial["part"] == part:
                return trial["within_budget"]
        probe = probe or self.probe
        losses, first, passed = None, 0, None
        for stop in probe.stops:
            block = probe.losses(schedule, first, stop)
            losses, first = block if losses is None else losses + block, stop
            if part == "search":
                bounds = self.budget.search_check(losses, self.n_validation, self.confidence)
                passed = self.budget.searched(bounds, final=stop == probe.stops[-1])
            else:
                bounds = self.budget.bounds(losses, self.confidence)
                passed = self.budget.certified(bounds)
            if passed is not None:
                break
        self.trials.append({"steps": cand.steps(), "part": part, **losses.figures(), **bounds,
                            "judged_on": int(losses.kl.size), "flops_ratio": self.flops(cand),
                            "within_budget": passed})
        return bool(passed)


def _findings(findings: Any) -> tuple[dict[str, Any], str]:
    """Findings as validated data (Findings.load), from a Findings, its dict or a JSON path; and its source."""
    source = str(findings) if isinstance(findings, (str, Path)) else f"<{type(findings).__name__}>"
    return Findings.load(findings).to_dict(), source


def exit_evidence(findings: dict[str, Any], num_layers: int) -> tuple[int | None, str]:
    """The exit layer the Findings give (knockout preferred), clamped to [1, L]; None: no exit."""
    section = findings["exit"]
    if not section["applies"]:
        return None, "the findings say the exit analysis does not apply (no visual tokens)"
    layers = section.get("layers") or {}
    criterion = "knockout" if (layers.get("knockout") or {}).get("layer") is not None else section.get("criterion")
    layer = (layers.get(criterion) or {}).get("layer", section.get("layer"))
    if layer is None:
        return None, "the findings give no exit layer"
    tol = (layers.get(criterion) or {}).get("tolerance")
    why = (f"exit layer {layer} by the {criterion} criterion"
           + (f" (tolerance {tol})" if tol is not None else "") + " in the findings")
    return (None if layer >= num_layers else max(1, int(layer))), why


def first_prune_layer(curve: list[float | None] | None, num_layers: int, fade: float) -> tuple[int, str]:
    """First pruning layer from the observational text->visual curve (see the module docstring)."""
    values = np.array([np.nan if v is None else v for v in (curve or [])], dtype=float)
    if values.size == 0 or np.isnan(values).all():
        layer = max(1, min(2, num_layers - 1))
        return layer, f"no observational curve: FastV's K = {layer}"
    peak = int(np.nanargmax(values))
    below = [layer for layer in range(peak + 1, len(values)) if values[layer] <= fade * values[peak]]
    if below:
        layer = below[0]
        why = (f"text->visual attention peaks at layer {peak} ({values[peak]:.3f}) and falls below "
               f"{fade} x peak at layer {layer} ({values[layer]:.3f})")
    else:
        layer = peak + 1
        why = (f"text->visual attention peaks at layer {peak} ({values[peak]:.3f}) and never falls below "
               f"{fade} x peak: prune right after the peak")
    return max(1, min(layer, num_layers - 1)), why


def visual_sink_indices(findings: dict[str, Any], examples: list[Example], processor: Any,
                        model: nn.Module) -> tuple[list[int], str]:
    """Visual-token indices of the Findings' visual sinks: each trace position (left-aligned)
    mapped through the prompts' own layouts; kept when it is visual in most prompts."""
    sinks = (findings.get("sinks") or {}).get("visual") or []
    positions = sorted({int(s["pos"]) for s in sinks})
    if not positions:
        return [], "no visual sinks in the findings"
    image_id = adapters.image_token_id(model)
    hits: dict[int, Counter] = {p: Counter() for p in positions}
    for ex in examples:
        ids = encode(processor, [ex])["input_ids"][0]
        visual = (ids == image_id).long()
        index = visual.cumsum(0) - 1
        for p in positions:
            if p < len(ids) and visual[p]:
                hits[p][int(index[p])] += 1
    chosen = sorted({c.most_common(1)[0][0] for p, c in hits.items()
                     if c and c.most_common(1)[0][1] * 2 >= len(examples)})
    return chosen, (f"visual sinks at trace positions {positions} -> visual-token indices {chosen}, "
                    "protected (never pruned, out of the ranking)")


def keep_share(search: _Search, layer: int, coverage: float) -> tuple[float, str]:
    """Mean smallest share of visual tokens covering ``coverage`` of the last-row visual
    attention at ``layer - 1``, measured by ranking with keep 1.0 (nothing removed)."""
    probe = Schedule.for_model(search.model, [{"op": "prune_visual", "layer": layer, "keep": 1.0}],
                               protect=search.protect)
    shares = []
    with torch.no_grad(), apply(search.model, probe) as planner:
        for batch in search.probe.batches:
            search.model(**batch)
            rows, real = planner.layer_tokens[layer - 1]
            visual = real & planner.removable.gather(1, rows)
            scores = planner.scores[layer].masked_fill(~visual, 0)
            for b in range(scores.shape[0]):
                s = scores[b][visual[b]].sort(descending=True).values
                if s.numel() and float(s.sum()) > 0:
                    k = int((s.cumsum(0) / s.sum() < coverage).sum()) + 1
                    shares.append(min(k, s.numel()) / s.numel())
    if not shares:
        return 1.0, "no visual tokens to rank"
    share = float(np.mean(shares))
    return share, (f"the top {share:.0%} of visual tokens (mean over {len(shares)} prompts) cover {coverage:.0%} "
                   f"of the last position's visual attention at layer {layer - 1}")


MIN_DROP = 0.02  # the search raises a keep no closer than this to the previous stage's (or 1)
REFINE = 2  # halvings of the gap between the smallest keep found within budget and the largest over it


def _bisect(search: _Search, at: Callable[[float], Candidate], within: float, over: float) -> float:
    """The smallest keep within budget after REFINE halvings of the gap between ``within`` (a keep
    within budget) and ``over`` (a smaller one over it)."""
    for _ in range(REFINE):
        mid = (within + over) / 2
        within, over = (mid, over) if search.ok(at(mid)) else (within, mid)
    return within


def _smallest_keep(search: _Search, cand: Candidate, start: Stage) -> Candidate | None:
    """``cand`` plus the prune stage ``start`` with the smallest keep within budget: from
    ``keep``, shrinking x2/3 while within budget, or else dropping a third fewer tokens at a time
    until it is (up to the previous stage's keep, or 1, less MIN_DROP), then
    refined between the last keep within budget and the one over it (``_bisect``: the x2/3 grid
    alone lands where its start puts it); None when none fits."""
    ceiling = cand.prunes[-1].keep if cand.prunes else 1.0
    keep = start.keep

    def at(k: float) -> Candidate:
        return replace(cand, prunes=cand.prunes + (start._replace(keep=k),))

    if search.ok(at(keep)):
        while keep > 0.01 and search.ok(at(keep * 2 / 3)):
            keep *= 2 / 3
        return at(keep if keep <= 0.01 else _bisect(search, at, keep, keep * 2 / 3))
    while ceiling - (higher := ceiling - (ceiling - keep) / 1.5) >= MIN_DROP:
        if search.ok(at(higher)):
            return at(_bisect(search, at, higher, keep))
        keep = higher
    return None


def _cheapest(search: _Search, found: list[Candidate], what: str) -> Candidate | None:
    """The candidate of ``found`` with the lowest predicted FLOPs, ties (a stage recycling what it drops
    costs what the plain one costs) to the lower mean next-token KL on the search prompts, the finer
    measure where the accuracy of both is within budget (logged); None if empty."""
    if not found:
        search.reasons.append(f"{what}: none stays within budget")
        return None
    def cost(c: Candidate) -> float:
        return round(search.flops(c), 9)

    best = min(found, key=lambda c: (cost(c), search.searched_kl(c)))
    stage = best.prunes[-1]
    search.reasons.append(f"{what}: keep {stage.keep:.3f} at layer {stage.layer} ranked by {stage.by}"
                          f"{' with recycling' if stage.recycle else ''}{' merging context' if stage.merge else ''}"
                          f"{' with proportional attention' if stage.proportional else ''}"
                          f" has the lowest predicted FLOPs "
                          f"({search.flops(best):.3f}) of those within budget"
                          f"{', the lowest KL of those as cheap' if sum(cost(c) == cost(best) for c in found) > 1 else ''}")
    return best


def _greedy(search: _Search, start: Candidate, first_prune: int, num_layers: int, coverage: float,
            skips: list[int]) -> Candidate:
    """Earliest exit; then the cheapest prune stage within budget at the evidence layer or any
    earlier one, and a cheaper second stage after it if one fits (PyramidDrop-style); then
    every skip that stays within budget."""
    cand = start
    if cand.exit is not None:
        while cand.exit is not None and not search.ok(cand):  # back off towards no exit
            cand = replace(cand, exit=cand.exit + 1 if cand.exit + 1 < num_layers else None)
        while cand.exit is not None and cand.exit > 1 and search.ok(replace(cand, exit=cand.exit - 1)):
            cand = replace(cand, exit=cand.exit - 1)
        search.reasons.append(f"visual_exit: layer {cand.exit} is the earliest within budget" if cand.exit
                              else "visual_exit: none within budget")
    limit = num_layers if cand.exit is None else cand.exit  # prune stages lie before the exit
    first = []
    for layer in range(min(first_prune, limit - 1), 0, -1):
        keep, why = keep_share(search, layer, coverage)
        search.reasons.append(why)
        first.append(_smallest_keep(search, cand, Stage(layer, keep)))
    best = _cheapest(search, [c for c in first if c is not None], "prune_visual (first stage, last-row attention)")
    # the other scores, at that layer (the evidence layer when last-row attention found none, from half
    # the tokens) and before the LLM where they need no attention: attention may be a poor score there
    layer, keep = best.prunes[0][:2] if best is not None else (max(1, min(first_prune, limit - 1)), 0.5)
    # (before the LLM, each also keeping the dropped tokens' share of attention: ToMe's proportional attention)
    earliest = 0 if input_cut_refused(search.model) is None else 1  # where a prune step may act first
    others = [_smallest_keep(search, cand, Stage(at, keep, by, merge=merge, proportional=weighed))
              for by in available_scores(search.model)
              if by != "last_row" for at in sorted({0} if by == "cls" else {layer, earliest if by in INPUT_SCORES else 1})
              for merge in ((False, True) if by == "cls" else (False,))  # VisionZip: dominant only, and merged
              for weighed in ((False, True) if at == 0 else (False,))]
    cand = _cheapest(search, [*([best] if best else []), *(c for c in others if c is not None)],
                     "prune_visual (first stage, every score)") or cand
    if cand.prunes:  # the winner recycling what it drops (SparseVLM): the same tokens' content in fewer
        winner = cand.prunes[0]
        if not winner.merge:
            recycled = _smallest_keep(search, replace(cand, prunes=()), winner._replace(recycle=True))
            cand = _cheapest(search, [cand, *([recycled] if recycled else [])], "prune_visual (first stage, recycling)")
        first_stage = cand.prunes[0]
        second = [_smallest_keep(search, cand, Stage(later, first_stage.keep * 2 / 3, first_stage.by, first_stage.recycle))
                  for later in range(first_stage.layer + 1, limit) if first_stage.by != "cls"]
        cand = _cheapest(search, [c for c in second if c is not None], "prune_visual (second stage)") or cand
    for layer in skips:
        for tokens in ("all", "visual"):
            if tokens == "visual" and cand.exit is not None and layer >= cand.exit:
                continue  # visual tokens have left already
            trial = replace(cand, skips=cand.skips + ((layer, tokens),))
            if search.ok(trial):
                cand = trial
                search.reasons.append(f"skip_layers: layer {layer} ({tokens}) from redundancy.candidates stays "
                                      "within budget")
                break
    return cand


def _scaled(cand: Candidate, share: float, num_layers: int) -> Candidate:
    """``cand`` cutting ``share`` of what it cuts, without its skips: each prune stage drops ``share``
    of the visual tokens it drops (keep 1 - share·(1 - keep)), the exit moves ``1 - share`` of the way
    from its layer to the last (past it: no exit). Share 1 is ``cand`` less its skips; every share
    cuts less than any larger one, in every step."""
    if share == 1:
        return replace(cand, skips=())
    exit_ = None if cand.exit is None else cand.exit + round((1 - share) * (num_layers - cand.exit))
    return Candidate(None if exit_ is None or exit_ >= num_layers else exit_,
                     tuple(s._replace(keep=1 - share * (1 - s.keep)) for s in cand.prunes))


def _sequence(cand: Candidate, num_layers: int, shares: tuple[float, ...]) -> list[Candidate]:
    """The schedules validation tests, safest first, ending with ``cand``: ``cand`` scaled to each of
    ``shares`` of its cut (``_scaled``), then its skips added one at a time in the search's order;
    duplicates (keeps equal after rounding) and steps that cut nothing left out. Built from the
    search's result alone, before any validation prompt is seen, as fixed-sequence testing needs."""
    out: list[Candidate] = []
    for c in [_scaled(cand, share, num_layers) for share in shares] + [
            replace(cand, skips=cand.skips[:i]) for i in range(1, len(cand.skips) + 1)]:
        if c.steps() and all(c.steps() != o.steps() for o in out):
            out.append(c)
    return out


def _validated(search: _Search, checker: Probe, cand: Candidate, num_layers: int,
               shares: tuple[float, ...]) -> Candidate:
    """The most cutting schedule of ``_sequence(cand)`` that validation certifies by fixed-sequence
    testing (Learn then Test, arXiv 2110.01052): each schedule, safest first, is accepted when its
    one-sided bounds on ``checker``'s (validation) prompts lie within budget, and testing stops at the
    first one rejected; no reduction when the first is. Because the order is fixed before validation
    and testing stops at the first rejection, the chance that any accepted schedule is over budget is
    at most one minus the bounds' confidence, however long the sequence (trying candidates until one
    passes would spend that chance once per try). Schedules that do not apply to the model (a keep
    rounding to no drop) are left out of the sequence."""
    def applies(c: Candidate) -> bool:
        try:
            search.schedule(c)
        except ScheduleError:
            return False
        return True

    sequence = [c for c in _sequence(cand, num_layers, shares) if applies(c)]
    search.reasons.append(f"validation: fixed-sequence test of {len(sequence)} schedules, the search's result cut to "
                          f"{', '.join(f'{s:g}' for s in shares)} of its cut, then with its skips, safest first, each "
                          f"by its {search.confidence:.0%} bounds on the {len(checker.examples)} validation prompts; "
                          "the last accepted before the first rejected is kept")
    accepted = Candidate(None)
    for c in sequence:
        if not search.ok(c, checker, "validation"):
            search.reasons.append(f"{c.steps()} is outside the budget's {search.confidence:.0%} bound on the validation "
                                  f"prompts: the sequence stops at {accepted.steps() or 'no reduction'}")
            break
        accepted = c
    if accepted == Candidate(None):
        search.ok(accepted, checker, "validation")
    return accepted


def derive(findings: Any, model: nn.Module, inputs: Any, processor: Any,
           budget: "Budget | dict[str, float] | None" = None, *, settings: Settings | None = None,
           validation: Any = None) -> Schedule:
    """A schedule for ``model`` from ``findings`` (a Findings, its dict or a JSON path), searched on
    part of ``inputs`` and validated on the other part (``settings.validation_share`` of them, drawn
    per question type; or the ``validation`` prompts when given): a search fits its prompts, so its
    own measurement flatters it. The search's result, scaled down to a rising share of its cut, is
    tested safest first, each by whether its one-sided confidence bounds lie within ``budget``, up to
    the first rejected (``_validated``). A KL budget also holds the share of flipped answers to what it
    allows (``Budget.with_flips``, the flip cost measured on the validation prompts); a budget the
    validation prompts are too few to certify is refused before any search (``TooFewPrompts``). ``derived_from`` says why each step was chosen and what was measured on each part;
    ``predicted`` holds its cost-model figures."""
    cfg = settings or Settings()
    budget = Budget.of(budget or Budget())
    data, source = _findings(findings)
    info = model_info(model)
    if (data.get("model") or {}).get("fingerprint") not in (None, info["fingerprint"]):
        raise ScheduleError(f"the findings ({source}) were made for model {data['model'].get('fingerprint')}, "
                            f"not this one ({info['fingerprint']})")
    examples = as_examples(inputs)
    in_sample = False
    if validation is None:
        examples, held = split(examples, cfg.validation_share)
        if not held:  # a single prompt cannot be split: validated in-sample, and said so
            held, in_sample = examples, True
    else:
        held = as_examples(validation)
    total = len(examples) + len(held)
    budget.check_prompts(len(held) if examples else 0, total, cfg.confidence)  # before running the model
    checker = Probe(model, processor, held, cfg.batch_size)
    floor = flip_kl_floor(checker) if budget.max_kl else None
    budget.check_prompts(len(held), total, cfg.confidence, floor)
    judged = budget if floor is None else budget.with_flips(floor)  # what search and validation hold a schedule to
    num_layers = info["num_layers"]
    probe = Probe(model, processor, examples[:cfg.max_examples], cfg.batch_size, cfg.first_block)
    sinks, sink_why = visual_sink_indices(data, probe.examples, processor, model)
    protect = {"visual_sinks": sinks}
    search = _Search(model, probe, judged, protect, cfg.confidence, len(held))
    exit_layer, exit_why = exit_evidence(data, num_layers)
    curve = ((data.get("exit") or {}).get("curves") or {}).get("observational")
    prune_layer, prune_why = first_prune_layer(curve, num_layers, cfg.fade)
    candidates = [int(c) for c in (data.get("redundancy") or {}).get("candidates") or [] if 0 < int(c) < num_layers]
    search.reasons += [exit_why, prune_why, sink_why, f"redundancy candidates (most redundant first): {candidates}"]
    if in_sample:
        search.reasons.append("one input only: nothing to hold out, so the validation figures are in-sample")
    if judged != budget:
        search.reasons.append(f"a flipped answer costs at least {floor:.3f} nats of KL on the validation prompts, so "
                              f"the KL budget of {budget.max_kl:g} also holds top-1 agreement to at least "
                              f"{judged.min_agreement:.4f} (Wilson), which the bootstrap of the mean cannot see")
    cand = _greedy(search, Candidate(exit_layer), prune_layer, num_layers, cfg.coverage, candidates)
    searched = cand.steps()
    cand = _validated(search, checker, cand, num_layers, cfg.shares)
    schedule = search.schedule(cand)
    search.ok(cand)  # its search-part figures (logged already unless it is a scaled-down one)
    trial = {part: next(t for t in search.trials if t["steps"] == cand.steps() and t["part"] == part)
             for part in ("search", "validation")}
    figures = {part: {k: v for k, v in t.items() if k not in ("steps", "part", "flops_ratio")}
               for part, t in trial.items()}
    schedule.derived_from = {"findings": source, "budget": budget.to_dict(), "reasons": search.reasons,
                             "evidence": {"exit_layer": exit_layer, "first_prune_layer": prune_layer,
                                          "coverage": cfg.coverage, "fade": cfg.fade,
                                          "visual_sinks": sinks, "skip_candidates": candidates},
                             "searched": searched, "fidelity": {**figures["search"], "n_examples": len(probe.examples)},
                             "validation": {**figures["validation"], "n_examples": len(held), "in_sample": in_sample,
                                            "confidence": cfg.confidence, "bounds": BOUNDS_METHOD,
                                            **({} if floor is None else {"flip_kl_floor": floor}),
                                            **({} if judged == budget else {"implied_min_agreement": judged.min_agreement})},
                             "trials": search.trials}
    schedule.predicted = prediction(schedule, Shape.of(model), probe.layouts + checker.layouts)
    return schedule
