"""attnflow.compat is the one place that names transformers' and nnsight's internals, and a
missing internal is one clear error that names the installed and the tested versions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache
from typer.testing import CliRunner

from attnflow import compat
from attnflow.cli import app
from attnflow.probes.record import record
from attnflow.toys import tiny

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("attnflow", "probes", "analyses", "reducers", "reports", "toys", "benchmarks")
CACHE_NAMES = set(compat.CACHE_KWARGS)


def _modules() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py") if p != ROOT / "attnflow/compat.py")


def internals_named(source: str) -> list[str]:
    """Where ``source`` names a KV-cache forward kwarg or the attention-call op itself."""
    found = [f"line {m.string.count(chr(10), 0, m.start()) + 1}: {m.group()}"
             for m in re.finditer(r"attention_interface_\d+", source)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in CACHE_NAMES:
            found.append(f"line {node.lineno}: string {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in CACHE_NAMES:
            found.append(f"line {node.lineno}: attribute .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in CACHE_NAMES:
            found.append(f"line {node.lineno}: keyword {node.arg}=")
    return found


def test_only_compat_names_transformers_internals():
    offenders = {str(p.relative_to(ROOT)): hits for p in _modules() if (hits := internals_named(p.read_text()))}
    assert not offenders, f"read these through attnflow.compat instead: {offenders}"


@pytest.mark.parametrize("snippet", ['past = kwargs.get("past_key_values")', "c = out.past_key_values",
                                     "model(ids, cache=c)", "op = attn.source.attention_interface_1"])
def test_the_scan_catches_each_way_of_naming_an_internal(snippet):
    assert internals_named(snippet)


@pytest.mark.parametrize("name", compat.CACHE_KWARGS)
def test_a_decode_step_is_recognised_under_either_cache_name(name):
    cache = DynamicCache()
    assert not compat.is_decode_step({name: cache})  # an empty cache: a prefill
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    assert compat.is_decode_step({name: cache})
    assert not compat.is_decode_step({"input_ids": None})


def test_the_installed_cache_name_round_trips_through_a_forward():
    model, processor = tiny.build("llama")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        past = compat.output_cache(model(input_ids=ids, use_cache=True))
        assert past.get_seq_length() == 4
        step = model(input_ids=ids[:, -1:], use_cache=True, **compat.cache_kwargs(past)).logits
        full = model(input_ids=torch.cat([ids, ids[:, -1:]], 1)).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_a_missing_internal_names_installed_and_tested_versions(monkeypatch):
    monkeypatch.setattr(compat, "ATTENTION_CALL", "attention_interface_9")
    model, processor = tiny.build("llama")
    with pytest.raises(compat.InternalsError) as err:
        record(model, tiny.sample_prompts("llama"), processor=processor, progress=False)
    message = str(err.value)
    assert "attention_interface_9" in message and f"transformers {transformers.__version__}" in message
    assert re.search(r"tested with .*transformers[<>=,.0-9]+", message), message


def test_the_cli_prints_a_missing_internal_as_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(compat, "ATTENTION_CALL", "attention_interface_9")
    monkeypatch.setenv("ATTNFLOW_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["record", "--model", "toy-llama", "--out", str(tmp_path / "t.nc")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "attention_interface_9" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "t.nc").exists()
