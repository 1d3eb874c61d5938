"""The `attnflow` command line: record, analyze, schedule, verify, run, report, bench."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="How attention flows through vision-language transformers, and faster models from it.")
console = Console(stderr=True, soft_wrap=True)


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
        from attnflow.errors import USER_ERRORS
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None
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
def record(
    model: str = typer.Option("toy-vlm", help="Local HF model folder, toy-vlm, or toy-<family>."),
    inputs: Optional[Path] = typer.Option(None, help="JSONL of {image, prompt, answer}; default: the model's bundled inputs."),
    out: Path = typer.Option(Path("trace.nc"), help="Where to write the trace (.nc)."),
    level: str = typer.Option("summary", help="summary (O(n) per layer) or full (adds n×n maps of --layers)."),
    layers: Optional[str] = typer.Option(None, help="Layers whose full maps are kept, e.g. 0,3."),
    batch_size: int = typer.Option(8, min=1),
    attn: Optional[str] = typer.Option(None, help="Attention backend override: eager or sdpa."),
) -> None:
    """Record per-layer, per-head attention statistics of MODEL on INPUTS into a trace."""
    from attnflow.models import default_inputs, load_model
    from attnflow.probes.io import save_trace
    from attnflow.probes.record import record as record_trace

    m, processor = load_model(model, attn_implementation=attn)
    trace = record_trace(m, inputs or default_inputs(model), processor=processor, level=level,
                         layers=parse_layers(layers), batch_size=batch_size, model_path=model)
    save_trace(trace, out)
    console.print(f"wrote {out}: {trace.sizes['sample']} samples × {trace.sizes['layer']} layers × "
                  f"{trace.sizes['head']} heads ({trace.attrs['attn_implementation']})")


@app.command()
@friendly
def analyze(
    trace: Path = typer.Argument(..., help="Trace (.nc) written by `attnflow record`."),
    model: Optional[str] = typer.Option(None, help="The model the trace was recorded from (local folder, toy-vlm, "
                                                   "toy-<family>): enables knockout, logit lens and rollout/flow."),
    inputs: Optional[Path] = typer.Option(None, help="The trace's inputs (JSONL); default: the file it was recorded from."),
    out: Path = typer.Option(Path("findings.json"), help="Where to write the findings (JSON)."),
    threshold: list[str] = typer.Option([], "--threshold", "-t", help="Override a threshold, NAME=VALUE (repeatable)."),
    batch_size: int = typer.Option(8, min=1),
) -> None:
    """Find sinks, redundant layers, the visual exit layer and cross-modal flow in TRACE."""
    from attnflow.analyses import Thresholds
    from attnflow.analyses import analyze as run_analyses
    from attnflow.models import load_model

    try:
        overrides = Thresholds.parse(threshold).to_dict()
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--threshold") from None
    m, processor = load_model(model) if model else (None, None)
    findings = run_analyses(trace, m, inputs, processor=processor, batch_size=batch_size, **overrides)
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
) -> None:
    """Rebuild RUN_DIR/figures and RUN_DIR/report.pdf from the files in RUN_DIR."""
    import time

    from attnflow.reports.build import build

    start = time.perf_counter()
    pdf = build(run_dir)
    console.print(f"wrote {pdf} and {run_dir / 'figures'}/ in {time.perf_counter() - start:.1f} s")
