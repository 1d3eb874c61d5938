"""The structure the README promises, checked on the source: data flows one way through the
pipeline folders, the leaf modules import no layer, and family facts live in the adapter table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ("probes", "analyses", "reducers", "reports")  # upstream first
LEAVES = {"attnflow.compat", "attnflow.errors", "attnflow.fileio", "attnflow.timing", "attnflow.processors",
          "attnflow.parallel"}
FACE = {"attnflow.cli", "attnflow.pipeline", "attnflow.models"}


def _imports(path: Path) -> set[str]:
    """Every attnflow module ``path`` imports, at any depth (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnflow"):
            out |= {f"{node.module}.{a.name}" if node.module == "attnflow" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("attnflow")}
    return out


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PIPELINE else None


def layering_violations(folder: str, imported: set[str]) -> list[str]:
    """Imports a module of ``folder`` may not make: a pipeline folder downstream of it, the
    CLI/pipeline/loading face, or (for reducers) the analyses whose Findings it reads as data."""
    rank = PIPELINE.index(folder)
    bad = []
    for module in sorted(imported):
        other = _folder(module)
        if other is not None and PIPELINE.index(other) > rank:
            bad.append(f"{module} (downstream)")
        elif module in FACE or module == "attnflow.toys" or module.startswith("attnflow.toys."):
            bad.append(f"{module} (not a pipeline layer)")
        elif folder == "reducers" and other == "analyses" and module != "attnflow.analyses.findings":
            bad.append(f"{module} (reducers read Findings through its contract, nothing else of analyses)")
    return bad


@pytest.mark.parametrize("folder", PIPELINE)
def test_pipeline_folders_import_only_upstream(folder):
    offenders = {p.name: bad for p in sorted((ROOT / folder).glob("*.py"))
                 if (bad := layering_violations(folder, _imports(p)))}
    assert not offenders


def test_the_check_catches_a_downstream_import():
    assert layering_violations("probes", {"attnflow.reducers.apply"}) == ["attnflow.reducers.apply (downstream)"]
    assert layering_violations("reducers", {"attnflow.analyses.sinks"})
    assert not layering_violations("reducers", {"attnflow.analyses.findings"})
    assert layering_violations("analyses", {"attnflow.models"})
    assert not layering_violations("reports", {"attnflow.probes.io", "attnflow.fileio"})


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaf_modules_import_no_layer(leaf):
    imported = _imports(ROOT / "attnflow" / f"{leaf.split('.')[1]}.py")
    assert imported <= LEAVES, f"{leaf} imports {sorted(imported - LEAVES)}"


def model_type_comparisons(source: str) -> list[int]:
    """Lines comparing a ``model_type`` (or a name ending in it) with ==, != or in."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            names = [n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "")
                     for n in (node.left, *node.comparators)]
            if any(str(name).endswith("model_type") for name in names):
                lines.append(node.lineno)
    return lines


def test_no_model_type_comparison_outside_the_adapter_table():
    dirs = ("attnflow", *PIPELINE, "benchmarks")
    found = {str(p.relative_to(ROOT)): lines for d in dirs for p in sorted((ROOT / d).rglob("*.py"))
             if p != ROOT / "probes/adapters.py" and (lines := model_type_comparisons(p.read_text()))}
    assert not found, f"family facts belong in probes/adapters.py: {found}"
    assert model_type_comparisons('if config.model_type == "qwen2_vl": pass') == [1]
