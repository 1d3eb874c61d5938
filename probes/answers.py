"""The one rule that scores a generated text against an example's answer, used by every
accuracy attnflow reports (``attnflow eval``, ``verify``, ``derive``, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable


def answer_matches(text: str, answer: str) -> bool:
    """The generated text starts with the answer's words (case-insensitive, whitespace- and
    special-token-free text expected): "red" matches "red", "Red" and "red square", not "reddish"."""
    want = answer.lower().split()
    return bool(want) and text.lower().split()[:len(want)] == want


def accuracy_by_type(scored: Iterable[tuple[str | None, bool]]) -> tuple[float | None, dict[str, float], dict[str, int]]:
    """Overall accuracy, accuracy per question type and count per type of (type, correct)
    pairs (a missing type counts as "all"); (None, {}, {}) when there are none."""
    by_type: dict[str, list[bool]] = {}
    for qtype, ok in scored:
        by_type.setdefault(qtype or "all", []).append(bool(ok))
    n = sum(len(v) for v in by_type.values())
    if not n:
        return None, {}, {}
    return (sum(sum(v) for v in by_type.values()) / n,
            {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
            {k: len(v) for k, v in sorted(by_type.items())})
