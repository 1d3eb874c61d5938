"""``attnflow run``: record -> analyze -> derive a schedule -> verify -> report, in one call.

The run is built in a temporary folder beside ``out`` and swapped in whole at the end, so an
interrupted run leaves no half-written file (and, with ``force``, the previous run intact).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import transformers

import attnflow
from attnflow.errors import UserError
from attnflow.fileio import atomic_dir, write_json
from attnflow.models import default_inputs, load_model
from attnflow.probes.inputs import file_sha256, load_examples
from attnflow.probes.io import save_trace
from attnflow.probes.record import record

if TYPE_CHECKING:
    from attnflow.reducers.derive import Budget

STAGES: tuple[str, ...] = ("record", "analyze", "schedule", "verify", "report")


class RunExistsError(UserError, FileExistsError):
    """The output folder already holds a run and ``force`` was not given."""


@dataclass
class RunResult:
    """Where a run wrote its files, what it skipped and why, and how long each stage took."""

    out: Path
    files: dict[str, Path]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def schedule_applies(model: torch.nn.Module, trace: Any) -> str | None:
    """Why no schedule can be derived for this model (None when one can)."""
    from attnflow.reducers.apply import cannot_shorten

    why = cannot_shorten(model)
    if why:
        return why
    if not (trace.modality == "visual").any():
        return "the inputs have no visual tokens: the schedule's ops act on visual tokens"
    return None


def default_budget(examples: list, max_kl: float | None, min_agreement: float | None,
                   max_accuracy_drop: float | None) -> Budget:
    """The budget asked for; else the tightest of these that derive's validation part of ``examples`` can
    certify (Budget.prompts_needed): one point of accuracy when every example has an answer (268
    validation prompts), a mean next-token KL of 0.01 nats (185: a flipped answer may cost up to log 2
    nats, so the KL bound also caps flips at 1.4%, Budget.with_flips), top-1 agreement of 95% (52);
    with fewer, KL 0.01, which derive certifies only for a model whose flipped answers cost little."""
    from attnflow.reducers.derive import DEFAULT_MAX_KL, DEFAULT_MIN_AGREEMENT, Budget, Settings
    from attnflow.reducers.validation import split

    if max_kl is not None or min_agreement is not None or max_accuracy_drop is not None:
        return Budget(max_kl=max_kl, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop)
    n = len(split(examples, Settings().validation_share)[1])
    kl = Budget(max_kl=DEFAULT_MAX_KL)
    tiers = ([Budget(max_accuracy_drop=0.01)] if all(ex.answer for ex in examples) else []) + [
        kl.with_flips(math.log(2)), Budget(min_agreement=DEFAULT_MIN_AGREEMENT)]
    fits = next((b for b in tiers if n >= b.prompts_needed()), kl)
    return kl if fits.max_kl else fits


def run(
    model: str = attnflow.DEFAULT_MODEL,
    inputs: str | Path | None = None,
    out: str | Path = "runs/latest",
    *,
    force: bool = False,
    max_kl: float | None = None,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    new_tokens: int = 8,
    repeats: int = 5,
    baselines: bool = True,
    holdout: float = 0.5,
    load: dict[str, Any] | None = None,
    command: str = "",
    on_stage: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the whole toolkit on ``model`` (a local folder or a toy name) and its ``inputs``
    (default: the model's bundled inputs; ``limit`` keeps the first N examples).

    With no budget given, ``default_budget`` picks one. The inputs are split (``reducers.validation.split``):
    the schedule is derived on one part (derive searches on half of it and accepts on the other
    half by confidence bounds; its in-sample and validation figures are in ``derived_from``), then verified once, with the baselines, ``new_tokens``
    greedy tokens and ``repeats`` timing rounds (``baselines=False``: the schedule alone), on the ``holdout`` share it was not derived from;
    that held-out verdict is what the schedule's ``verified`` section records. ``holdout=0``
    derives and verifies on every input (in-sample only, and marked so). ``load`` goes to
    ``load_model`` (device, dtype, device_map, revision)."""
    from attnflow.analyses import analyze
    from attnflow.reducers.derive import TooFewPrompts, derive
    from attnflow.reducers.validation import split
    from attnflow.reducers.verify import verify_schedule
    from attnflow.reports.build import build

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise RunExistsError(f"{str(out)!r} already holds a run; pass --force to replace it")
    m, processor = load_model(model, **(load or {}))
    inputs = Path(inputs) if inputs else default_inputs(model)
    examples = load_examples(inputs)[:limit]
    result = RunResult(out, {})
    timer = {"stage": "", "start": time.perf_counter()}

    def stage(name: str) -> None:
        now = time.perf_counter()
        if timer["stage"]:
            result.seconds[timer["stage"]] = round(now - timer["start"], 3)
        timer.update(stage=name, start=now)
        if on_stage and name:
            on_stage(name)

    with atomic_dir(out) as tmp:
        stage("record")
        trace = record(m, examples, processor=processor, batch_size=batch_size, model_path=model, progress=False)
        trace.attrs.update(inputs_path=str(inputs), inputs_sha256=file_sha256(inputs))
        save_trace(trace, tmp / "trace.nc")
        stage("analyze")
        findings = analyze(trace, m, examples, processor=processor, batch_size=batch_size)
        findings.save(tmp / "findings.json")
        why_not = schedule_applies(m, trace)
        if why_not:
            result.skipped.update(schedule=why_not, verify=why_not)
        else:
            stage("schedule")
            search, held_out = split(examples, holdout)
            budget = default_budget(search, max_kl, min_agreement, max_accuracy_drop)
            try:
                schedule = derive(findings.to_dict(), m, search, processor, budget)
            except TooFewPrompts as e:  # the trace, findings and report still stand
                schedule = None
                result.skipped.update(schedule=str(e), verify=str(e))
            if schedule is not None:
                stage("verify")
                verdict = verify_schedule(m, schedule, held_out or search, processor, budget, batch_size=batch_size,
                                          new_tokens=new_tokens, repeats=repeats, baselines=baselines)
                schedule.verified["held_out"] = bool(held_out)
                verdict.save(tmp / "verdict.json")
                schedule.save(tmp / "schedule.json")
        write_json(tmp / "run.json", _provenance(model, inputs, len(examples), command, result))
        stage("report")
        build(tmp)
        stage("")
    result.files = {p.name: out / p.name for p in sorted(out.iterdir())}
    return result


def _provenance(model: str, inputs: Path, n_examples: int, command: str, result: RunResult) -> dict[str, Any]:
    return {
        "command": command or " ".join(sys.argv),
        "model": model,
        "inputs": str(inputs),
        "n_examples": n_examples,
        "skipped": result.skipped,
        "seconds": result.seconds,
        "versions": {"attnflow": attnflow.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
    }


def summarize(out: str | Path) -> str:
    """A few lines a researcher reads first: sinks, exit layer, schedule, verified fidelity and speed."""
    from attnflow.reports import words
    from attnflow.reports.rundir import load_run

    out = Path(out)
    run = load_run(out)  # every file validated by its own loader
    findings = run.findings
    lines = []
    sinks = findings["sinks"]["tokens"]
    top = sorted(sinks, key=lambda s: -s["frequency"])[:3]
    lines.append("sinks: " + (", ".join(f"{s['modality']} {s['token']!r} @pos {s['pos']} (layer {s['layer']}, "
                                         f"share {s['share']:.2f}, {100 * s['frequency']:.0f}% of samples)"
                                         for s in top) or "none found")
                 + (f"; massive-activation dims {findings['sinks']['dims']}" if findings["sinks"]["dims"]
                    else "; no massive activations"))
    ex = findings["exit"]
    lines.append(f"visual exit layer: {ex['layer']} ({ex['criterion']})" if ex.get("layer") is not None
                 else f"visual exit: {ex.get('criterion') or 'not applicable'}")
    cands = findings["redundancy"]["candidates"]
    lines.append(f"most redundant layers: {cands[:3]}")
    if run.schedule is not None:
        sched = run.schedule
        lines.append("schedule: " + "; ".join(words.step_words(st) for st in sched["steps"]) if sched["steps"]
                     else "schedule: no step fits the budget (the model runs unreduced)")
        v = sched.get("verified") or {}
        pred = sched.get("predicted") or {}
        acc = "" if v.get("accuracy_delta") is None else f", accuracy {100 * v['accuracy_delta']:+.1f} pts"
        where = "held-out" if v.get("held_out") else "in-sample"
        derived = sched.get("derived_from") or {}
        within = "" if "within_budget" not in v else (
            f"; {'within' if v['within_budget'] else 'OUTSIDE'} the budget ({words.budget_words(derived.get('budget') or {})})")
        lines.append(f"verified ({where}, {v.get('n_examples')} prompts): agreement {_num(v.get('agreement'), '.3f')}, "
                     f"KL {_num(v.get('kl'), '.4f')}{acc}; FLOPs x{_num(pred.get('flops_ratio'), '.2f')}, "
                     f"prefill speedup x{_num(v.get('prefill_speedup'), '.2f')}{within}")
        for key, where in (("fidelity", "in-sample ({} prompts it was searched on)"),
                           ("validation", "validation ({} other prompts it was accepted on)")):
            fid = derived.get(key) or {}
            if fid.get("in_sample"):
                where = "validation (in-sample: {} prompt, too few to hold any out)"
            if fid:
                acc = "" if fid.get("accuracy_delta") is None else f", accuracy {100 * fid['accuracy_delta']:+.1f} pts"
                lines.append(f"{where.format(fid['n_examples'])}: agreement {_num(fid.get('agreement'), '.3f')}, "
                             f"KL {_num(fid.get('kl'), '.4f')}{acc}")
    else:
        lines.append(f"schedule: none ({run.why_missing('schedule', 'schedule.json')})")
    lines.append(f"report: {out / 'report.pdf'}")
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
