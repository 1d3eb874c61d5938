"""The `attnflow` command line: record, analyze, schedule, verify, run, report, bench."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from attnflow import DEFAULT_MODEL, parallel
from attnflow.fileio import ensure_writable

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="How attention flows through vision-language transformers, and faster models from it.")
console = Console(stderr=True, soft_wrap=True)


MODEL = typer.Option(DEFAULT_MODEL, help="A Hugging Face repo id (org/name: the HF cache first, then the Hub unless "
                                     "HF_HUB_OFFLINE=1), a local model folder, a bundled model (`attnflow models`), "
                                     "or toy-<family>.")
INPUTS = typer.Option(None, help="JSONL of {image, prompt, answer}; default: the model's bundled inputs.")


@app.callback()
def main() -> None:
    """attnflow: record -> analyze -> schedule -> verify -> report, or all at once with `run`."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=UserWarning, module="nnsight")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def friendly(fn: Callable) -> Callable:
    """Turn attnflow's input errors into one clear line and exit code 2, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from attnflow.compat import InternalsError
        from attnflow.errors import UserError
        try:
            return fn(*args, **kwargs)
        except (UserError, InternalsError) as exc:
            world = parallel.world()
            console.print(f"[bold red]error{f' (rank {world.rank})' if world.size > 1 else ''}:[/] {exc}")
            raise typer.Exit(2) from None
    return wrapper


# Where and how every command that loads a model puts it (attnflow.models.load_model).
LOAD_OPTIONS: tuple[inspect.Parameter, ...] = tuple(
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=option)
    for name, option in (
        ("device", typer.Option(None, help="cpu, cuda, cuda:N or mps (default: cuda when available).")),
        ("dtype", typer.Option(None, help="auto, float32, bfloat16 or float16 (default: the checkpoint's).")),
        ("device_map", typer.Option(None, "--device-map", help="auto: spread the model over every device "
                                    "(accelerate), for models larger than one GPU.")),
        ("revision", typer.Option(None, help="Branch, tag or commit of a Hugging Face repo id.")),
    ))


def loads_model(fn: Callable) -> Callable:
    """Give a command the LOAD_OPTIONS; it receives them as one dict ``load`` for load_model."""
    sig = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        load = {p.name: kwargs.pop(p.name) for p in LOAD_OPTIONS}
        return fn(*args, load=load, **kwargs)

    params = [p for p in sig.parameters.values() if p.name != "load"]
    wrapper.__signature__ = sig.replace(parameters=[*params, *LOAD_OPTIONS])  # type: ignore[attr-defined]
    return wrapper


def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    """'0,3' -> [0, 3]."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--layers takes comma-separated integers, not {text!r}") from None


@app.command()
@friendly
@loads_model
def record(
    model: str = MODEL,
    inputs: Optional[Path] = INPUTS,
    out: Path = typer.Option(Path("trace.nc"), help="Where to write the trace (.nc)."),
    level: str = typer.Option("summary", help="summary (O(n) per layer) or full (adds n×n maps of --layers)."),
    layers: Optional[str] = typer.Option(None, help="Layers whose full maps are kept, e.g. 0,3."),
    batch_size: int = typer.Option(8, min=1),
    attn: Optional[str] = typer.Option(None, help="Attention backend override: eager or sdpa."),
    load: Optional[dict] = None,
) -> None:
    """Record per-layer, per-head attention statistics of MODEL on INPUTS into a trace."""
    ensure_writable(out)
    if level not in ("summary", "full"):
        raise typer.BadParameter(f"choose summary or full, not {level!r}", param_hint="--level")
    if attn not in (None, "eager", "sdpa"):
        raise typer.BadParameter(f"choose eager or sdpa, not {attn!r}", param_hint="--attn")
    from attnflow.models import default_inputs, load_model
    from attnflow.probes.io import save_trace
    from attnflow.probes.record import record as record_trace

    m, processor = load_model(model, attn_implementation=attn, **load)
    trace = record_trace(m, inputs or default_inputs(model), processor=processor, level=level,
                         layers=parse_layers(layers), batch_size=batch_size, model_path=model)
    save_trace(trace, out)
    samples = sum(parallel.gather(trace.sizes["sample"]))
    if parallel.world().main:
        shards = trace.attrs["world_size"]
        console.print(f"wrote {out}: {samples} samples × {trace.sizes['layer']} layers × {trace.sizes['head']} heads "
                      f"({trace.attrs['attn_implementation']})" + (f", {shards} shards" if shards > 1 else ""))


@app.command()
@friendly
@loads_model
def analyze(
    trace: Path = typer.Argument(..., help="Trace (.nc, or a folder of shards) written by `attnflow record`."),
    model: Optional[str] = typer.Option(None, help="The model the trace was recorded from (local folder, toy-vlm, "
                                                   "toy-<family>): enables knockout, logit lens and rollout/flow."),
    inputs: Optional[Path] = typer.Option(None, help="The trace's inputs (JSONL); default: the file it was recorded from."),
    out: Path = typer.Option(Path("findings.json"), help="Where to write the findings (JSON)."),
    threshold: list[str] = typer.Option([], "--threshold", "-t", help="Override a threshold, NAME=VALUE (repeatable)."),
    batch_size: int = typer.Option(8, min=1),
    chunks: Optional[int] = typer.Option(None, min=1, help="Read the trace this many samples at a time (dask) "
                                         "instead of whole: for traces larger than memory."),
    load: Optional[dict] = None,
) -> None:
    """Find sinks, redundant layers, the visual exit layer and cross-modal flow in TRACE."""
    ensure_writable(out)
    from attnflow.analyses import Thresholds
    from attnflow.analyses import analyze as run_analyses
    from attnflow.models import load_model

    try:
        overrides = Thresholds.parse(threshold).to_dict()
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--threshold") from None
    m, processor = load_model(model, **load) if model else (None, None)
    findings = run_analyses(trace, m, inputs, processor=processor, batch_size=batch_size, chunks=chunks, **overrides)
    if not parallel.world().main:
        return
    findings.save(out)
    ex = findings.exit
    exit_text = (f"layer {ex['layer']} by {ex['criterion']}" if ex["applies"] else "does not apply (no visual tokens)")
    console.print(f"wrote {out}: {len(findings.sinks['tokens'])} sink(s), massive dims {findings.sinks['dims']}, "
                  f"redundant layers {findings.redundancy['candidates']}, visual exit {exit_text}")
    for note in ex.get("notes", []):
        console.print(f"note: {note}")


@app.command()
@friendly
def report(
    run_dir: Path = typer.Argument(..., help="Run directory holding trace.nc and findings.json "
                                             "(schedule.json, verdict.json and run.json when present)."),
    svg: bool = typer.Option(False, "--svg", help="Also write every figure as SVG (for papers)."),
) -> None:
    """Rebuild RUN_DIR/figures and RUN_DIR/report.pdf from the files in RUN_DIR."""
    import time

    from attnflow.reports.build import build

    start = time.perf_counter()
    pdf = build(run_dir, svg=svg)
    console.print(f"wrote {pdf} and {run_dir / 'figures'}/ in {time.perf_counter() - start:.1f} s")


@app.command()
@friendly
@loads_model
def run(
    model: str = MODEL,
    inputs: Optional[Path] = INPUTS,
    out: Path = typer.Option(Path("runs/latest"), help="Run folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
    max_kl: Optional[float] = typer.Option(None, help="Fidelity budget: max mean KL(full || reduced), nats."),
    min_agreement: Optional[float] = typer.Option(None, help="Fidelity budget: min next-token top-1 agreement."),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="Fidelity budget: max accuracy loss as a share "
                                                                 "(0.01 = one point; the inputs need answers)."),
    batch_size: int = typer.Option(16, min=1),
    limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N inputs."),
    new_tokens: int = typer.Option(8, min=1, help="Greedy tokens generated per prompt when verifying."),
    repeats: int = typer.Option(5, min=1, help="Timing repeats when verifying (medians are reported)."),
    holdout: float = typer.Option(0.5, min=0.0, max=0.95, help="Share of the inputs held out: the schedule is "
                                  "derived on the rest and verified on these (0: verify in-sample)."),
    baselines: bool = typer.Option(True, help="Verify the field's reducers beside the schedule (--no-baselines: "
                                   "the schedule alone, for large models)."),
    load: Optional[dict] = None,
) -> None:
    """Record -> analyze -> schedule -> verify -> report, and print what was found. With no budget given,
    the tightest the validation prompts can certify: one accuracy point (268 of them, answers needed),
    KL 0.01 (185), 95% top-1 agreement (52)."""
    if parallel.world().size > 1:
        raise typer.BadParameter("`run` is one process: under torchrun use record, analyze, schedule and verify "
                                 "(README, Scaling out)")
    ensure_writable(out)
    import sys

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from attnflow.pipeline import STAGES, summarize
    from attnflow.pipeline import run as run_pipeline

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("loading", total=len(STAGES))

        def on_stage(name: str) -> None:
            bar.update(task, description=f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}",
                       completed=STAGES.index(name))

        result = run_pipeline(model, inputs, out, force=force, load=load, max_kl=max_kl, min_agreement=min_agreement,
                              max_accuracy_drop=max_accuracy_drop,
                              batch_size=batch_size, limit=limit, new_tokens=new_tokens, repeats=repeats,
                              holdout=holdout, baselines=baselines, command="attnflow " + " ".join(sys.argv[1:]),
                              on_stage=on_stage)
    console.print(summarize(result.out))
    console.print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))


@app.command()
@friendly
@loads_model
def schedule(
    findings: Path = typer.Argument(..., help="Findings (JSON) written by `attnflow analyze`."),
    out: Path = typer.Option(Path("schedule.json"), help="Where to write the schedule (JSON)."),
    model: Optional[str] = typer.Option(None, help="The model the findings describe (local folder, toy-vlm, "
                                                   "toy-<family>); default: the one their trace was recorded from."),
    inputs: Optional[Path] = typer.Option(None, help="JSONL the schedule is searched and verified on; default: "
                                                     "the trace's inputs."),
    max_kl: Optional[float] = typer.Option(None, help="Fidelity budget: max mean KL(full || reduced), nats."),
    min_agreement: Optional[float] = typer.Option(None, help="Fidelity budget: min next-token top-1 agreement."),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="Fidelity budget: max accuracy loss as a share "
                                                                 "(0.01 = one point; the inputs need answers)."),
    batch_size: int = typer.Option(8, min=1),
    load: Optional[dict] = None,
) -> None:
    """Derive a pruning schedule from FINDINGS under a fidelity budget (default: the tightest the inputs
    can certify, as `attnflow run` picks it), verified."""
    ensure_writable(out)
    from attnflow.models import default_inputs, load_model
    from attnflow.pipeline import default_budget
    from attnflow.probes.inputs import load_examples
    from attnflow.reducers.derive import derive
    from attnflow.reducers.verify import verify_schedule

    from attnflow.analyses.findings import Findings

    loaded = Findings.load(findings)
    provenance = loaded.trace
    model = model or provenance.get("model_path")
    if not model:
        raise typer.BadParameter("the findings do not name their model: pass --model", param_hint="--model")
    inputs = inputs or (Path(provenance["inputs_path"]) if provenance.get("inputs_path") else default_inputs(model))
    m, processor = load_model(model, **load)
    examples = load_examples(inputs)
    budget = default_budget(examples, max_kl, min_agreement, max_accuracy_drop)
    result = derive(findings, m, examples, processor, budget)
    verify_schedule(m, result, inputs, processor, budget, batch_size=batch_size, baselines=False, repeats=1,
                    new_tokens=4)
    if not parallel.world().main:
        return
    result.save(out)
    ver, pred = result.verified, result.predicted
    console.print(f"wrote {out}: {len(result.steps)} step(s), predicted FLOPs ratio {pred['flops_ratio']:.3f}, "
                  f"verified KL {ver['kl']:.4g}, agreement {ver['agreement']:.3f}"
                  + ("" if ver["within_budget"] else " (outside the budget: nothing smaller fits it)"))


@app.command()
@friendly
@loads_model
def verify(
    schedule: Path = typer.Option(..., help="Schedule (JSON) written by `attnflow schedule`."),
    model: str = MODEL,
    inputs: Optional[Path] = INPUTS,
    out: Path = typer.Option(Path("verdict.json"), help="Where to write the verdict (JSON)."),
    new_tokens: int = typer.Option(8, min=1, help="Greedy tokens generated per prompt."),
    repeats: int = typer.Option(5, min=1, help="Timing repeats (medians are reported)."),
    batch_size: int = typer.Option(8, min=1),
    load: Optional[dict] = None,
) -> None:
    """Verify SCHEDULE on MODEL: fidelity and cost against the unreduced model, FastV and PyramidDrop."""
    ensure_writable(out)
    from attnflow.models import default_inputs, load_model
    from attnflow.reducers.verify import verify as run_verify

    m, processor = load_model(model, **load)
    verdict = run_verify(m, schedule, inputs or default_inputs(model), processor, new_tokens=new_tokens,
                         batch_size=batch_size, repeats=repeats)
    if not parallel.world().main:
        return
    verdict.save(out)
    console.print(f"wrote {out} ({verdict.n_examples} prompts, {verdict.device}, {verdict.backend})")
    for r in verdict.rows:
        acc = "" if r.accuracy is None else f", accuracy {r.accuracy:.3f} ({100 * r.accuracy_delta:+.1f} pts)"
        speed = ", ".join(f"{part} {'n/a' if x is None else f'{x:.2f}x'}"
                          for part, x in (("prefill", r.prefill_speedup), ("decode", r.decode_speedup)))
        console.print(f"{r.name:>18}: FLOPs {r.flops_ratio:.3f}, T_eq {r.visual_tokens_equivalent:.1f}, agreement "
                      f"{r.agreement:.3f}, KL {r.kl:.4g}{acc}, {speed}{' (Pareto)' if r.pareto else ''}")


@app.command("eval")
@friendly
@loads_model
def eval_answers(
    model: str = MODEL,
    inputs: Optional[Path] = typer.Option(None, help="JSONL with answers; default: the model's bundled inputs."),
    batch_size: int = typer.Option(32, min=1),
    out: Optional[Path] = typer.Option(None, help="Also write both results here (JSON)."),
    load: Optional[dict] = None,
) -> None:
    """Accuracy of MODEL's greedy answers on INPUTS, overall and per type, with real and with blank images."""
    if out:
        ensure_writable(out)
    from attnflow.fileio import write_json
    from attnflow.models import default_inputs, load_model
    from attnflow.probes.inputs import load_examples
    from attnflow.toys.evaluate import evaluate

    m, processor = load_model(model, **load)
    examples = load_examples(inputs or default_inputs(model))
    seen = evaluate(m, processor, examples, batch_size=batch_size)
    blank = evaluate(m, processor, examples, blank=True, batch_size=batch_size)
    console.print(f"{model}: {seen['n']} prompts, greedy; accuracy {seen['accuracy']:.3f} with the images, "
                  f"{blank['accuracy']:.3f} with blank images "
                  f"({100 * (blank['accuracy'] - seen['accuracy']):+.1f} pts)")
    for qtype, acc in seen["per_type"].items():
        console.print(f"{qtype:>18}: {acc:.3f}  blank {blank['per_type'][qtype]:.3f}  (n={seen['n_per_type'][qtype]})")
    if out:
        write_json(out, {"model": model, "images": seen, "blank_images": blank})
        console.print(f"wrote {out}")


@app.command("models")
@friendly
def models_list(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects instead of a table."),
) -> None:
    """The bundled trained models: name, path, model_type, visual tokens per image, parameters, held-out set."""
    import json

    from attnflow.models import bundled_models

    rows = bundled_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for r in rows:
        if r["model_type"] is None:
            typer.echo(f"{r['name']}: missing from {r['path']} (rebuild: make {r['name']})")
            continue
        typer.echo(f"{r['name']}: {r['model_type']}, {r['visual_tokens']} visual tokens per image, "
                   f"{r['parameters'] / 1e6:.2f} M parameters, {r['size_mb']} MB, held-out accuracy "
                   f"{pct(r['accuracy'])} (blank images {pct(r['blank_accuracy'])})\n"
                   f"    {r['path']}\n    held-out: {r['heldout']}")


bench_app = typer.Typer(no_args_is_help=True,
                        help="Speed and memory benchmarks (attnflow.benchmarks).")
app.add_typer(bench_app, name="bench")


@bench_app.command("probe")
def bench_probe(
    tokens: int = typer.Option(600, min=3, help="Prompt length: BOS + one image's visual tokens + text."),
    repeats: int = typer.Option(5, min=1, help="Timing rounds (methods alternated within each)."),
    memory: bool = typer.Option(True, help="Also measure each method's peak memory (CPU: a fresh process each)."),
    threads: int = typer.Option(1, min=1, help="torch CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (top-level summary_ratio)."),
) -> None:
    """Time attnflow's summary recording against a plain forward, HF output_attentions and TransformerLens."""
    import json

    import torch

    from attnflow.benchmarks import probe, report
    from attnflow.benchmarks.machine import describe

    torch.set_num_threads(threads)
    result = probe.run(tokens, repeats=repeats, measure_memory=memory, threads=threads)
    if as_json:
        typer.echo(json.dumps({**result, "machine": describe()}))
    else:
        typer.echo(report.probe_table([result]))
        typer.echo(f"summary_ratio {result['summary_ratio']:.2f} (target <= {result['summary_target']['max_ratio']})")
