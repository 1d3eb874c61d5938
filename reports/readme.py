"""The README's demo and bundled-models sections, written from runs committed under ``docs/``.

``make docs`` runs the demo and every bundled model, then ``python -m attnflow.reports.readme
RUN_DIR`` copies the demo run's JSON files and two figures into ``docs/demo``, and
``python -m attnflow.reports.readme --models MODELS_JSON RUN_DIR...`` (``attnflow models --json``
and one run per model) copies each run's JSON files into ``docs/models/<name>``; both rewrite the
README between their markers with the report's own sentences (reports.words) about those files.
The README therefore quotes real runs that the repository holds, and a test checks that it still
does.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from attnflow.fileio import atomic_dir, write_text
from attnflow.reports import words

START = "<!-- demo:start: `make docs` writes this section from docs/demo; do not edit it by hand -->"
END = "<!-- demo:end -->"
MODELS_START = "<!-- models:start: `make docs` writes this section from docs/models; do not edit it by hand -->"
MODELS_END = "<!-- models:end -->"
FILES = ("findings.json", "schedule.json", "verdict.json", "run.json")
FIGURES = ("exit.png", "patches.png")


def section(demo: str | Path) -> str:
    """The README's demo section (markers included) for the run files in ``demo``."""
    demo = Path(demo)
    data: dict[str, Any] = {name: json.loads((demo / name).read_text()) for name in FILES}
    findings, schedule, verdict, run = (data[n] for n in FILES)
    lines = [
        START,
        f"![Exit curves]({demo.as_posix()}/exit.png)",
        "",
        f"`{run['command']}` on {run['n_examples']} prompts of `{'/'.join(Path(run['inputs']).parts[-2:])}` "
        f"(its files are in `{demo.as_posix()}/`):",
        "",
        f"- **Sinks**: {words.sinks_sentence(findings)} {words.massive_sentence(findings)}",
        f"- **Redundancy**: {words.redundancy_sentence(findings)}",
        f"- **Exit**: {words.exit_sentence(findings)}",
        f"- {words.schedule_sentence(schedule)} {words.verified_sentence(schedule)} "
        f"{words.in_sample_sentence(schedule)}",
        f"- **Baselines**: {words.verdict_sentence(verdict)}",
        "",
        f"![Last-position attention on the patch grid]({demo.as_posix()}/patches.png)",
        END,
    ]
    return "\n".join(lines)


def models_section(docs: str | Path) -> str:
    """The README's bundled-models section (markers included) for ``docs/models.json`` and the runs
    in ``docs/<name>``: one table per model, of what it scores and what the analyses find."""
    docs = Path(docs)
    lines = [MODELS_START]
    for row in json.loads((docs / "models.json").read_text()):
        run = docs / row["name"]
        findings, schedule = (json.loads((run / n).read_text()) for n in ("findings.json", "schedule.json"))
        exits = ((findings["exit"]["layers"].get("knockout") or {}).get("by_qtype") or {})
        by_type = ", ".join(f"{t} {words.pct(a)}" for t, a in sorted((row.get("accuracy_by_type") or {}).items()))
        lines += [
            "", f"**`{row['name']}`** ({row['model_type']}, {row['visual_tokens']} visual tokens per image, "
            f"{row['parameters'] / 1e6:.2f} M parameters, {row['size_mb']} MB; held-out set `{Path(row['heldout']).name}`)",
            "", "| | |", "|---|---|",
            f"| held-out accuracy | {words.pct(row['accuracy'], 1)} (blank images: {words.pct(row['blank_accuracy'], 1)}) |",
            f"| by question type | {by_type or 'n/a'} |",
            f"| sinks | {words.sinks_sentence(findings)} |",
            f"| massive activations | {words.massive_sentence(findings)} |",
            f"| redundant layers | {words.redundancy_sentence(findings)} |",
            f"| exit | {words.exit_sentence(findings)} |",
            f"| exit layer by question type (knockout) | "
            f"{', '.join(f'{t} {layer}' for t, layer in sorted(exits.items())) or 'n/a'} |",
            f"| derived schedule | {words.schedule_sentence(schedule)} {words.verified_sentence(schedule)} |",
        ]
    return "\n".join([*lines, "", MODELS_END])


def quoted(readme_text: str, start_marker: str = START, end_marker: str = END) -> str:
    """The section between the markers a README holds (markers included); ValueError when it has none."""
    start, end = readme_text.find(start_marker), readme_text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {start_marker.split(':')[0].lstrip('<!- ')} section markers")
    return readme_text[start:end + len(end_marker)]


def publish(run_dir: str | Path, demo: str | Path, readme: str | Path) -> None:
    """Copy ``run_dir``'s files into ``demo`` (replacing it whole) and rewrite ``readme``'s section."""
    run_dir, demo = Path(run_dir), Path(demo)
    with atomic_dir(demo) as tmp:
        for name in FILES:
            shutil.copyfile(run_dir / name, tmp / name)
        for name in FIGURES:
            shutil.copyfile(run_dir / "figures" / name, tmp / name)
    text = Path(readme).read_text()
    write_text(readme, text.replace(quoted(text), section(demo)))


def publish_models(models_json: str | Path, run_dirs: list[Path], docs: str | Path, readme: str | Path) -> None:
    """Copy ``models_json`` and each model's run (``run_dirs``, in its order) into ``docs`` (replacing
    it whole) and rewrite ``readme``'s models section."""
    rows = json.loads(Path(models_json).read_text())
    if len(rows) != len(run_dirs):
        raise ValueError(f"{len(rows)} bundled models but {len(run_dirs)} run folders")
    with atomic_dir(docs) as tmp:
        shutil.copyfile(models_json, tmp / "models.json")
        for row, run_dir in zip(rows, run_dirs):
            (tmp / row["name"]).mkdir()
            for name in FILES:
                shutil.copyfile(Path(run_dir) / name, tmp / row["name"] / name)
    text = Path(readme).read_text()
    write_text(readme, text.replace(quoted(text, MODELS_START, MODELS_END), models_section(docs)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="the demo run, or with --models one run per model")
    parser.add_argument("--models", type=Path, help="`attnflow models --json` output: publish the models section")
    parser.add_argument("--demo", type=Path, default=Path("docs/demo"))
    parser.add_argument("--docs", type=Path, default=Path("docs/models"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    if args.models:
        publish_models(args.models, args.run_dirs, args.docs, args.readme)
    else:
        publish(args.run_dirs[0], args.demo, args.readme)


if __name__ == "__main__":
    main()
