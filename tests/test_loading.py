"""Models by Hugging Face repo id (from a real HF cache layout, offline), dtypes and devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnflow.models import ModelSpecError, default_inputs, load_model
from attnflow.probes.record import record
from attnflow.toys import tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache_with(tmp_path: Path, repo_id: str, family: str) -> Path:
    """An HF hub cache holding a tiny ``family`` model as ``repo_id`` at refs/main, laid out as
    huggingface_hub lays it out (models--org--name/snapshots/<commit>/, refs/main)."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    tiny.save(family, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def _attnflow(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "attnflow")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_a_cached_hub_id_records_offline_and_an_uncached_one_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_CACHE", str(tmp_path / "toys"))
    inputs = default_inputs("toy-llava")
    env = {"HF_HUB_CACHE": str(hf_cache_with(tmp_path, "acme/tiny-llava", "llava")), "HF_HUB_OFFLINE": "1",
           "ATTNFLOW_CACHE": str(tmp_path / "toys")}
    done = _attnflow(["record", "--model", "acme/tiny-llava", "--inputs", str(inputs), "--out",
                      str(tmp_path / "t.nc"), "--device", "cpu", "--dtype", "float32"], env)
    assert done.returncode == 0, done.stderr
    from attnflow.probes.io import load_trace
    trace = load_trace(tmp_path / "t.nc")
    assert trace.attrs["model_path"] == "acme/tiny-llava" and trace.attrs["model_type"] == "llava"
    assert trace.attrs["device"] == "cpu" and trace.attrs["device_map"] == "{}"

    missing = _attnflow(["record", "--model", "acme/not-cached", "--inputs", str(inputs)], env)
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not in the local Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_bfloat16_recording_matches_the_float32_eager_oracle():
    """bf16 keeps 8 bits of mantissa; on this tiny model the statistics stay within 1e-3 of the
    float32 eager oracle (measured: 4e-5), reduced in float32 either way."""
    examples = tiny.sample_prompts("llava")
    path = tiny.cached("llava")
    oracle_model, processor = load_model(str(path), attn_implementation="eager", device="cpu")
    half, _ = load_model(str(path), dtype="bfloat16", device="cpu")
    want = record(oracle_model, examples, processor=processor, progress=False)
    got = record(half, examples, processor=processor, progress=False)
    assert got.attrs["dtype"] == "bfloat16" and got.received.dtype == np.float32  # reduced in float32
    for name in ("received", "last_row", "uniform"):
        np.testing.assert_allclose(got[name].values, want[name].values, atol=1e-3, equal_nan=True)
    assert (got.modality.values == want.modality.values).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "float8"}, "dtype 'float8' is not one of"),
    ({"device": "cuda:99"}, "cannot put the model on device 'cuda:99'"),
])
def test_bad_dtype_or_device_is_one_clear_error(kwargs, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model("toy-llama", **kwargs)


def test_a_device_map_over_two_devices_gives_the_same_trace():
    """Layers alternate between the CPU and disk offload (accelerate moves them in and out)."""
    examples = tiny.sample_prompts("llama")
    one, tok = load_model("toy-llama", device="cpu")
    layers = one.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i % 2 == 0 else "disk" for i in range(layers)}}
    two, _ = load_model("toy-llama", device_map=device_map)
    want = record(one, examples, processor=tok, progress=False)
    got = record(two, examples, processor=tok, progress=False)
    assert '"disk"' in got.attrs["device_map"] and want.attrs["device_map"] == "{}"
    for name in ("received", "last_row", "flow", "resid_last", "rms"):
        np.testing.assert_allclose(got[name].values, want[name].values, atol=1e-6, equal_nan=True)
