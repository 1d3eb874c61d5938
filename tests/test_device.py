"""On a CUDA device: the same statistics as on the CPU, in float32 and bfloat16, on one device
and under accelerate's device map, and the real-geometry LLaVA end to end in bfloat16.

Marked ``device``: they run where ``torch.cuda.is_available()`` and are skipped (with that
reason) elsewhere; ``pytest -m device`` runs only them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnflow.models import default_inputs, load_model
from attnflow.probes.record import record
from attnflow.toys import tiny

pytestmark = [pytest.mark.device,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
STATS = ("received", "last_row", "flow", "resid_last", "rms")


def _cpu_oracle(family: str):
    model, processor = load_model(f"toy-{family}", attn_implementation="eager", device="cpu")
    return record(model, tiny.sample_prompts(family), processor=processor, progress=False), processor


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cuda_float32_and_bfloat16_match_the_cpu_oracle(family):
    want, _ = _cpu_oracle(family)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 2e-2)):
        model, processor = load_model(f"toy-{family}", device="cuda", dtype=dtype)
        got = record(model, tiny.sample_prompts(family), processor=processor, progress=False)
        assert got.attrs["device"].startswith("cuda") and got.received.dtype == np.float32
        for name in STATS:
            np.testing.assert_allclose(got[name].values, want[name].values, atol=tol, rtol=tol, equal_nan=True,
                                       err_msg=f"{name} {dtype}")


def test_a_device_map_on_the_gpu_gives_the_cpu_trace():
    want, _ = _cpu_oracle("llama")
    model, tok = load_model("toy-llama", device_map="auto", dtype="float32")
    got = record(model, tiny.sample_prompts("llama"), processor=tok, progress=False)
    assert got.attrs["device"].startswith("cuda")
    for name in STATS:
        np.testing.assert_allclose(got[name].values, want[name].values, atol=1e-4, equal_nan=True)


def test_the_llava_geometry_runs_end_to_end_in_bfloat16_on_cuda(tmp_path):
    """576 visual tokens, 32 heads of 128, bf16: record, analyze (knockout, lens), schedule, verify."""
    exe = shutil.which("attnflow") or str(Path(sys.executable).parent / "attnflow")
    model = "geometry-llava-1.5-7b"
    load = ["--model", model, "--device", "cuda", "--dtype", "bfloat16"]
    steps = [["record", *load, "--inputs", str(default_inputs(model)), "--out", str(tmp_path / "trace.nc")],
             ["analyze", str(tmp_path / "trace.nc"), *load, "--out", str(tmp_path / "findings.json")],
             ["schedule", str(tmp_path / "findings.json"), *load, "--out", str(tmp_path / "schedule.json")],
             ["verify", "--schedule", str(tmp_path / "schedule.json"), *load, "--repeats", "2", "--new-tokens", "4",
              "--out", str(tmp_path / "verdict.json")]]
    for args in steps:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (args[0], done.stderr[-2000:])
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["device"].startswith("cuda")
    assert all(np.isfinite(r["kl"]) for r in verdict["rows"])


def test_the_fused_kernels_give_the_torch_path_statistics_on_cuda(monkeypatch):
    """Triton's compiled kernels (not the interpreter): a padded float32 batch, with and without them."""
    from attnflow.probes import fused

    calls = []
    real = fused.group_columns
    monkeypatch.setattr(fused, "group_columns", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, processor = load_model("toy-llava", device="cuda", dtype="float32")
    prompts = tiny.sample_prompts("llava")
    # rank_max_tokens=0: no ARank maps, so the kernels serve these short prompts too
    got = record(model, prompts, processor=processor, rank_max_tokens=0, progress=False)
    assert calls, "the kernels did not run"
    want = record(model, prompts, processor=processor, rank_max_tokens=0, fused=False, progress=False)
    for name in STATS + ("uniform", "n_seen"):
        np.testing.assert_allclose(got[name].values, want[name].values, atol=1e-5, equal_nan=True, err_msg=name)
