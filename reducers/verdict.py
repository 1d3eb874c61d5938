"""The Verdict contract: what ``verify`` measured, one Row per configuration, as JSON.

JSON form (``attnflow_verdict: 1``): ``model`` (the schedule's model section), ``device``,
``backend``, ``dtype``, ``n_examples``, ``new_tokens``, ``repeats``, ``timing_batch``,
``unreduced`` (the reference's accuracy, per-type accuracy, prefill ms and decode ms per token on
the timing batch and at batch size 1, visual tokens, and ``fixed_share``: the share of its forward's
FLOPs outside the decoder layers, which no schedule cuts, reducers.cost.fixed_share), ``rows`` (each
Row's fields below, with
``versus_schedule`` the paired bounds on its accuracy gap to the row named ``schedule``) and ``pareto`` (the rows on the
fidelity-vs-FLOPs front, cheapest first). Fidelity is task accuracy when the prompts carry
answers, else next-token top-1 agreement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from attnflow.errors import UserError
from attnflow.fileio import read_json, write_json

VERDICT_VERSION = 1


class VerdictError(UserError, ValueError):
    """A verdict file that is missing, malformed or from another version."""


@dataclass
class Row:
    """One configuration's fidelity and cost against the unreduced model."""

    name: str
    steps: list[dict[str, Any]]
    agreement: float
    kl: float
    generation_agreement: float
    accuracy: float | None
    accuracy_delta: float | None
    accuracy_by_type: dict[str, float]
    flops_ratio: float
    visual_tokens_equivalent: float
    kv_bytes: float
    kv_bytes_ratio: float
    decode_flops_ratio: float
    prefill_ms: float
    decode_ms_per_token: float
    prefill_speedup: float | None
    decode_speedup: float | None
    pareto: bool = False
    prefill_ms_b1: float | None = None  # the same at batch size 1 (the first prompt alone)
    decode_ms_per_token_b1: float | None = None
    prefill_speedup_b1: float | None = None
    decode_speedup_b1: float | None = None
    # one-sided 95% (lower, upper) bounds on this row's accuracy minus the schedule's, paired over the
    # prompts (reducers.validation.paired_drop_bounds): a gap of a few answers is told from noise
    versus_schedule: list[float] | None = None
    # the whole forward's FLOPs ratio: flops_ratio with the schedule's own scoring and the unreduced fixed_share
    # (vision tower, projector, unembedding) added, which no schedule cuts (reducers.cost.forward_ratio); None
    # in older verdicts
    forward_flops_ratio: float | None = None
    # the schedule's own scoring (DivPrune's distances, recycling's clustering) against the unreduced decoder
    # layers' FLOPs (reducers.cost.scoring_flops); None in verdicts before 2026-11-28
    scoring_flops_ratio: float | None = None

    @property
    def fidelity(self) -> float:
        return self.accuracy if self.accuracy is not None else self.agreement


@dataclass
class Verdict:
    """What ``verify`` measured: the unreduced reference and one Row per configuration."""

    model: dict[str, Any]
    device: str
    backend: str
    dtype: str
    n_examples: int
    new_tokens: int
    repeats: int
    timing_batch: int
    unreduced: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"attnflow_verdict": VERDICT_VERSION, **d,
                "pareto": [{"name": r.name, "flops_ratio": r.flops_ratio, "fidelity": r.fidelity}
                           for r in sorted(self.rows, key=lambda r: r.flops_ratio) if r.pareto]}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def verified(self, name: str = "schedule") -> dict[str, Any]:
        """The ``verified`` section of a Schedule, from row ``name``."""
        r = self.row(name)
        return {"agreement": r.agreement, "kl": r.kl, "generation_agreement": r.generation_agreement,
                "accuracy": r.accuracy, "accuracy_delta": r.accuracy_delta,
                "prefill_speedup": r.prefill_speedup, "decode_speedup": r.decode_speedup,
                "prefill_speedup_b1": r.prefill_speedup_b1, "decode_speedup_b1": r.decode_speedup_b1,
                "forward_flops_ratio": r.forward_flops_ratio,
                "device": self.device, "backend": self.backend, "n_examples": self.n_examples}



def mark_pareto(rows: list[Row]) -> None:
    """Set ``pareto`` on each row that no other row beats on both FLOPs and fidelity (one
    at least as good on both and strictly better on one)."""
    for r in rows:
        r.pareto = not any(o.flops_ratio <= r.flops_ratio and o.fidelity >= r.fidelity
                           and (o.flops_ratio < r.flops_ratio or o.fidelity > r.fidelity) for o in rows)


def load_verdict(source: "str | Path | dict[str, Any]") -> Verdict:
    """A Verdict from its JSON file or dict; a VerdictError names what is wrong."""
    source, name = read_json(source, VerdictError, "verdict")
    if not isinstance(source, dict) or source.get("attnflow_verdict") != VERDICT_VERSION:
        found = source.get("attnflow_verdict") if isinstance(source, dict) else None
        raise VerdictError(f"{name!r} is not an attnflow verdict of version {VERDICT_VERSION} (found {found!r}): "
                           "run attnflow verify again")
    keys = {f.name for f in fields(Verdict)}
    row_keys = {f.name for f in fields(Row)}
    try:
        rows = [Row(**{k: v for k, v in r.items() if k in row_keys}) for r in source["rows"]]
        return Verdict(**{k: v for k, v in source.items() if k in keys and k != "rows"}, rows=rows)
    except (KeyError, TypeError, AttributeError) as exc:
        raise VerdictError(f"{name}: malformed verdict ({exc})") from None
