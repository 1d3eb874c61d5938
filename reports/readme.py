"""The README's demo section, written from a run committed under ``docs/demo``.

``make docs`` runs the demo, then ``python -m attnflow.reports.readme RUN_DIR`` copies the run's
JSON files and two figures into ``docs/demo`` and rewrites the README between the demo markers
with the report's own sentences (reports.words) about those files. The README therefore quotes a
real run that the repository holds, and a test checks that it still does.
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


def quoted(readme_text: str) -> str:
    """The demo section a README holds (markers included); ValueError when it has none."""
    start, end = readme_text.find(START), readme_text.find(END)
    if start < 0 or end < start:
        raise ValueError("the README has no demo section markers")
    return readme_text[start:end + len(END)]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--demo", type=Path, default=Path("docs/demo"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    publish(args.run_dir, args.demo, args.readme)


if __name__ == "__main__":
    main()
