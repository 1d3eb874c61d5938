"""Verify a schedule against the unreduced model, beside fixed baselines: fidelity and cost.

For the schedule and the baselines (FastV K=2 R=50%, FastV K=2 at the schedule's FLOPs,
PyramidDrop's defaults scaled to the model's depth) the same inputs run greedy ``generate``
under ``reducers.apply``; each is compared with the unreduced model on: next-token top-1
agreement and KL(full ‖ reduced) at the last prompt position, greedy generated-token
agreement over ``new_tokens`` tokens, and task accuracy when the examples carry answers (the
first generated words against the answer's words). Cost: the predicted FLOPs ratio, T_eq and
KV-cache bytes (reducers.cost), and wall-clock prefill and per-token decode time measured in
this process, configurations interleaved in every repeat, medians. The rows form a Pareto
table of fidelity (accuracy when there are answers, else agreement) against FLOPs.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from attnflow.fileio import write_json
from attnflow.probes import adapters
from attnflow.probes.inputs import Example, as_examples, encode
from attnflow.reducers.apply import apply
from attnflow.reducers.cost import Shape, predict
from attnflow.reducers.schedule import DEFAULT_PROTECT, Schedule, load_schedule

VERDICT_VERSION = 1
PDROP_STAGES = ((0.25, 0.5), (0.5, 0.25), (0.75, 0.125))  # (boundary as a share of depth, keep)


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
                "device": self.device, "backend": self.backend, "n_examples": self.n_examples}

    def predicted(self, name: str = "schedule") -> dict[str, Any]:
        """The ``predicted`` section of a Schedule, from row ``name``."""
        r = self.row(name)
        return {"flops_ratio": r.flops_ratio, "visual_tokens_equivalent": r.visual_tokens_equivalent,
                "kv_bytes_ratio": r.kv_bytes_ratio, "decode_flops_ratio": r.decode_flops_ratio}


def fastv(model: nn.Module, keep: float = 0.5, layer: int = 2) -> Schedule:
    """FastV: prune visual tokens at ``layer`` (2, or the last layer of a shallower model)."""
    depth = len(adapters.decoder_layers(model))
    return Schedule.for_model(model, [{"op": "prune_visual", "layer": min(layer, depth - 1), "keep": keep}],
                              protect=DEFAULT_PROTECT)


def pdrop(model: nn.Module) -> Schedule:
    """PyramidDrop's defaults ([8, 16, 24] of 32 layers, keep 0.5/0.25/0.125) scaled to the depth."""
    depth = len(adapters.decoder_layers(model))
    stages: dict[int, float] = {}
    for share, keep in PDROP_STAGES:
        layer = min(depth - 1, max(1, math.floor(share * depth + 0.5)))
        stages[layer] = min(keep, stages.get(layer, 1.0))
    steps = [{"op": "prune_visual", "layer": k, "keep": v} for k, v in sorted(stages.items())]
    return Schedule.for_model(model, steps, protect=DEFAULT_PROTECT)


def fastv_at_flops(model: nn.Module, target: float, shape: Shape, layouts: list[tuple[int, int]]) -> Schedule:
    """FastV K=2 with the keep share whose predicted FLOPs ratio is closest to ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(30):  # the ratio grows with keep: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(fastv(model, mid), shape, layouts)["flops_ratio"] < target else (lo, mid)
    return fastv(model, round(hi, 4))


def encode_batches(processor: Any, examples: list[Example], batch_size: int, device: torch.device) -> list[dict]:
    """``examples`` encoded in left-padded batches (what reducers need) on ``device``; the
    tokenizer's padding side is restored afterwards."""
    tok = getattr(processor, "tokenizer", processor)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return [encode(processor, examples[i:i + batch_size]).to(device) for i in range(0, len(examples), batch_size)]
    finally:
        tok.padding_side = side


def _answer_matches(text: str, answer: str) -> bool:
    """The first generated words equal the answer's words (case-insensitive)."""
    want = answer.lower().split()
    return text.lower().split()[:len(want)] == want


@dataclass
class Generated:
    """Greedy generations of a list of prompts."""

    first_logits: torch.Tensor  # [n, V] logits of the first generated token
    tokens: torch.Tensor  # [n, new_tokens] generated ids (pad after EOS)
    texts: list[str]


def generate_greedy(model: nn.Module, batches: list[dict], tok: Any, new_tokens: int) -> Generated:
    """Greedy ``generate`` of ``new_tokens`` tokens for every batch (under whatever schedule
    is applied), with the first token's logits and the decoded texts."""
    logits, tokens, texts = [], [], []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for batch in batches:
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=pad)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        new = torch.nn.functional.pad(new, (0, new_tokens - new.shape[1]), value=pad)
        logits.append(out.logits[0].float().cpu())
        tokens.append(new.cpu())
        texts += tok.batch_decode(new, skip_special_tokens=True)
    return Generated(torch.cat(logits), torch.cat(tokens), texts)


def next_token_fidelity(full: torch.Tensor, reduced: torch.Tensor) -> dict[str, float]:
    """Mean KL(full || reduced) (nats) and top-1 agreement of next-token logits [n, V]."""
    log_full, log_red = full.double().log_softmax(-1), reduced.double().log_softmax(-1)
    kl = (log_full.exp() * (log_full - log_red)).sum(-1).clamp_min(0)
    return {"kl": float(kl.mean()), "agreement": float((full.argmax(-1) == reduced.argmax(-1)).double().mean())}


def answer_accuracy(run: Generated, examples: list[Example]) -> tuple[float | None, dict[str, float]]:
    """Share of the examples with answers whose generated text starts with the answer's words
    (overall, and per question type); None without answers."""
    scored = [(ex.qtype or "all", _answer_matches(text, ex.answer))
              for ex, text in zip(examples, run.texts) if ex.answer is not None]
    if not scored:
        return None, {}
    by_type: dict[str, list[bool]] = {}
    for qtype, ok in scored:
        by_type.setdefault(qtype, []).append(ok)
    return (sum(ok for _, ok in scored) / len(scored),
            {k: sum(v) / len(v) for k, v in sorted(by_type.items())})


def _timer(fn: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    """``fn`` wrapped to return its wall-clock milliseconds (synchronising a GPU)."""
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000
    return timed


def _timings(model: nn.Module, schedules: dict[str, Schedule | None], batch: dict, new_tokens: int,
             repeats: int, pad: int) -> dict[str, dict[str, float]]:
    """Median prefill ms and per-token decode ms of every configuration on ``batch``, the
    configurations interleaved within each repeat (after one warm-up each)."""
    device = batch["input_ids"].device
    steps = max(2, new_tokens)

    def measure(schedule: Schedule | None) -> tuple[float, float, float]:
        with (apply(model, schedule) if schedule is not None else nullcontext()):
            prefill = _timer(lambda: model(**batch), device)()
            one = _timer(lambda: model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=pad),
                             device)()
            many = _timer(lambda: model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps,
                                                     do_sample=False, pad_token_id=pad), device)()
        return prefill, one, many

    for schedule in schedules.values():
        measure(schedule)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in schedules}
    for _ in range(repeats):
        for name, schedule in schedules.items():
            samples[name].append(measure(schedule))
    out = {}
    for name, runs in samples.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median((r[2] - r[1]) / (steps - 1) for r in runs)
        out[name] = {"prefill_ms": prefill, "decode_ms_per_token": decode}
    return out


def _ratio(reference: float, reduced: float) -> float | None:
    """reference / reduced, None when noise left a non-positive time (decode = difference of two runs)."""
    return reference / reduced if reference > 0 and reduced > 0 else None


def verify(model: nn.Module, schedule: "Schedule | dict[str, Any] | str | Path", inputs: Any, processor: Any, *,
           new_tokens: int = 8, batch_size: int = 8, repeats: int = 5, baselines: bool = True) -> Verdict:
    """Fidelity and cost of ``schedule`` (and, with ``baselines``, of FastV and PyramidDrop)
    on ``inputs`` (Examples or a JSONL path), against the unreduced model; wall-clock time is
    measured on the first batch."""
    sched = load_schedule(schedule)
    sched.check_model(model)
    if new_tokens < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("new_tokens, batch_size and repeats must be positive")
    examples = as_examples(inputs)
    device = next(model.parameters()).device
    tok = getattr(processor, "tokenizer", processor)
    batches = encode_batches(processor, examples, batch_size, device)
    timing_batch = encode_batches(processor, examples[:batch_size], len(examples), device)[0]
    image_id = adapters.image_token_id(model)
    layouts = [(int(am.sum()), int(((ids == image_id) & am.bool()).sum()) if image_id is not None else 0)
               for b in batches for ids, am in zip(b["input_ids"], b["attention_mask"])]
    shape = Shape.of(model)
    schedules: dict[str, Schedule] = {"schedule": sched}
    if baselines:
        target = predict(sched, shape, layouts)["flops_ratio"]
        schedules.update({"fastv": fastv(model), "fastv_equal_flops": fastv_at_flops(model, target, shape, layouts),
                          "pdrop": pdrop(model)})
    with torch.no_grad():
        full = generate_greedy(model, batches, tok, new_tokens)
        runs = {}
        for name, s in schedules.items():
            with apply(model, s):
                runs[name] = generate_greedy(model, batches, tok, new_tokens)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        times = _timings(model, {"unreduced": None, **schedules}, timing_batch, new_tokens, repeats, pad)
    full_accuracy, full_by_type = answer_accuracy(full, examples)
    rows = []
    for name, s in schedules.items():
        run = runs[name]
        fidelity = next_token_fidelity(full.first_logits, run.first_logits)
        accuracy, by_type = answer_accuracy(run, examples)
        cost = predict(s, shape, layouts)
        t, t0 = times[name], times["unreduced"]
        rows.append(Row(
            name=name, steps=s.steps,
            agreement=fidelity["agreement"], kl=fidelity["kl"], generation_agreement=float((full.tokens == run.tokens).float().mean()),
            accuracy=accuracy, accuracy_delta=None if accuracy is None else accuracy - full_accuracy,
            accuracy_by_type=by_type, flops_ratio=cost["flops_ratio"],
            visual_tokens_equivalent=cost["visual_tokens_equivalent"], kv_bytes=cost["kv_bytes"],
            kv_bytes_ratio=cost["kv_bytes_ratio"], decode_flops_ratio=cost["decode_flops_ratio"],
            prefill_ms=t["prefill_ms"], decode_ms_per_token=t["decode_ms_per_token"],
            prefill_speedup=_ratio(t0["prefill_ms"], t["prefill_ms"]),
            decode_speedup=_ratio(t0["decode_ms_per_token"], t["decode_ms_per_token"])))
    for r in rows:
        r.pareto = not any(o.flops_ratio <= r.flops_ratio and o.fidelity >= r.fidelity
                           and (o.flops_ratio < r.flops_ratio or o.fidelity > r.fidelity) for o in rows)
    return Verdict(model=sched.model, device=str(device), backend=adapters.attn_implementation(model),
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."), n_examples=len(examples),
                   new_tokens=new_tokens, repeats=repeats, timing_batch=int(timing_batch["input_ids"].shape[0]),
                   unreduced={"accuracy": full_accuracy, "accuracy_by_type": full_by_type,
                              "prefill_ms": times["unreduced"]["prefill_ms"],
                              "decode_ms_per_token": times["unreduced"]["decode_ms_per_token"],
                              "visual_tokens": predict(sched, shape, layouts)["visual_tokens"]},
                   rows=rows)
