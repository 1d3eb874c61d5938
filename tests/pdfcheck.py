"""Helpers shared by the report and pipeline tests: what a report must say, computed from the
JSON files independently of the code that writes the report."""

from __future__ import annotations

import re
from typing import Any

from pypdf import PdfReader


def pdf_text(path) -> str:
    """A PDF's text with runs of whitespace (line breaks included) made single spaces."""
    return re.sub(r"\s+", " ", " ".join(page.extract_text() for page in PdfReader(path).pages))


def schedule_phrases(schedule: dict[str, Any]) -> list[str]:
    """What the report's words and steps table must say about each step of ``schedule``."""
    said = {
        "prune_visual": lambda s: ("prune visual tokens " + ("before the first decoder layer" if s["layer"] == 0
                                                             else f"at layer {s['layer']}") + f", keeping {100 * s['keep']:.0f}%"),
        "visual_exit": lambda s: f"all visual tokens exit at layer {s['layer']}",
        "skip_layers": lambda s: f"skip layer{'s' * (len(s['layers']) > 1)} {', '.join(map(str, s['layers']))}",
    }
    table = [f"{k} {s['op']} {s.get('layer', ', '.join(map(str, s.get('layers', []))))}"
             for k, s in enumerate(schedule["steps"], start=1)]
    return table + [said[s["op"]](s) for s in schedule["steps"]] or ["The derived schedule removes nothing"]
