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
    phrases = []
    for k, step in enumerate(schedule["steps"], start=1):
        where = str(step["layer"]) if "layer" in step else ", ".join(map(str, step["layers"]))
        phrases.append(f"{k} {step['op']} {where}")  # the steps table
        if step["op"] == "prune_visual":
            phrases.append(f"prune visual tokens at layer {step['layer']}, keeping {100 * step['keep']:.0f}%")
        elif step["op"] == "visual_exit":
            phrases.append(f"all visual tokens exit at layer {step['layer']}")
        else:
            phrases.append(f"skip layer{'s' if len(step['layers']) > 1 else ''} {where}")
    return phrases or ["The derived schedule removes nothing"]
