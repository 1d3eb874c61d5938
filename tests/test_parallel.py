"""Data parallelism (#15): `torchrun --nproc-per-node 2` (gloo, CPU) records, analyses (knockout
and logit lens included), derives and verifies a tiny LLaVA exactly as one process does; a rank
that fails leaves no output; a trace read lazily (dask) gives the same findings."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from attnflow import parallel
from attnflow.cli import app
from attnflow.models import default_inputs
from attnflow.probes.io import TraceError, load_trace

ATTNFLOW = str(Path(sys.executable).parent / "attnflow")
runner = CliRunner()


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 --no-python attnflow ARGS` in ``cwd``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", ATTNFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def one(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Five prompts of different lengths (one with two images) in batches of 2: three batches,
    rank 0 takes one and rank 1 two, so the ranks' shards are padded to different lengths."""
    folder = tmp_path_factory.mktemp("parallel")
    source = default_inputs("toy-llava")
    for image in source.parent.glob("*.png"):
        shutil.copy(image, folder / image.name)
    lines = source.read_text().splitlines()
    (folder / "inputs.jsonl").write_text("\n".join(lines + lines[:2]) + "\n")
    common = ["--model", "toy-llava", "--batch-size", "2"]
    ran = torchrun("record", "--inputs", "inputs.jsonl", "--out", "two.nc", *common, cwd=folder)
    assert ran.returncode == 0, ran.stderr[-3000:]
    one("record", "--inputs", str(folder / "inputs.jsonl"), "--out", str(folder / "one.nc"), *common)
    return folder


def test_two_ranks_record_one_trace_equal_to_one_process(work):
    assert sorted(p.name for p in (work / "two.nc").iterdir()) == ["shard-00000-of-00002.nc",
                                                                   "shard-00001-of-00002.nc"]
    two, single = load_trace(work / "two.nc"), load_trace(work / "one.nc")
    assert two.attrs["world_size"] == 2 and single.attrs["world_size"] == 1
    assert two["rank"].values.tolist() == [0, 0, 1, 1, 1] and single["rank"].values.tolist() == [0] * 5
    assert two["sample"].values.tolist() == list(range(5))
    assert two["prompt"].values.tolist() == single["prompt"].values.tolist()  # input order
    xr.testing.assert_allclose(two.drop_vars("rank"), single.drop_vars("rank"), rtol=0, atol=1e-6)
    lazy = load_trace(work / "two.nc", chunks=2)
    assert lazy["received"].chunks is not None
    xr.testing.assert_allclose(lazy.load(), two, rtol=0, atol=0)


def test_two_ranks_analyse_derive_and_verify_as_one_process(work):
    common = ["--model", "toy-llava", "--batch-size", "2"]
    ran = torchrun("analyze", "two.nc", "--out", "two.json", *common, cwd=work)
    assert ran.returncode == 0, ran.stderr[-3000:]
    one("analyze", str(work / "one.nc"), "--out", str(work / "one.json"), *common)
    two, single = (json.loads((work / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["exit"]["criterion"] == "knockout" and two["exit"]["curves"]["logit_lens"] is not None
    for part in ("sinks", "redundancy", "flow"):
        assert two[part] == single[part]
    np.testing.assert_allclose(two["exit"]["curves"]["knockout"], single["exit"]["curves"]["knockout"], atol=1e-6)
    np.testing.assert_allclose(two["exit"]["curves"]["logit_lens"], single["exit"]["curves"]["logit_lens"],
                               atol=1e-6)
    assert two["exit"]["layers"] == single["exit"]["layers"]

    ran = torchrun("schedule", "two.json", "--out", "s2.json", *common, cwd=work)
    assert ran.returncode == 0, ran.stderr[-3000:]
    one("schedule", str(work / "one.json"), "--out", str(work / "s1.json"), *common)
    s2, s1 = (json.loads((work / f"s{n}.json").read_text()) for n in (2, 1))
    assert s2["steps"] == s1["steps"] and s2["predicted"] == s1["predicted"]

    ran = torchrun("verify", "--schedule", "s1.json", "--inputs", "inputs.jsonl", "--out", "v2.json", "--repeats", "1",
                   *common, cwd=work)
    assert ran.returncode == 0, ran.stderr[-3000:]
    one("verify", "--schedule", str(work / "s1.json"), "--inputs", str(work / "inputs.jsonl"), "--out",
        str(work / "v1.json"), "--repeats", "1", *common)
    v2, v1 = (json.loads((work / f"v{n}.json").read_text()) for n in (2, 1))
    assert v2["n_examples"] == v1["n_examples"] == 5
    for a, b in zip(v2["rows"], v1["rows"]):
        assert a["name"] == b["name"]
        for key in ("agreement", "generation_agreement", "accuracy", "kl", "flops_ratio"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["name"], key)


FAULT = """import os, sys
from attnflow.probes import record
if os.environ["RANK"] == "1":  # rank 1 dies in its last batch, after rank 0 has recorded its share
    def fail(*args, **kwargs):
        raise RuntimeError("simulated fault")
    record._trace_batch = fail
from attnflow.cli import app
sys.argv[0] = "attnflow"
app()
"""


def test_a_failing_rank_fails_the_command_and_leaves_no_output(work, tmp_path):
    (tmp_path / "fault.py").write_text(FAULT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["record", "--inputs", str(work / "inputs.jsonl"), "--out", "t.nc", "--model", "toy-llava",
            "--batch-size", "2"]
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "fault.py", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode != 0 and "simulated fault" in ran.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fault.py"]  # no t.nc, no temporary folder
    ran = torchrun(*args, cwd=tmp_path)  # the rerun succeeds
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert load_trace(tmp_path / "t.nc").sizes["sample"] == 5


def test_bad_inputs_are_refused_before_any_rank_records(work, tmp_path):
    lines = (work / "inputs.jsonl").read_text().splitlines()
    broken = json.loads(lines[-1])
    broken["images"] = broken["images"] * 2
    (tmp_path / "inputs.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(broken)]) + "\n")
    for image in work.glob("*.png"):
        shutil.copy(image, tmp_path / image.name)
    ran = torchrun("record", "--inputs", "inputs.jsonl", "--out", "t.nc", "--model", "toy-llava", cwd=tmp_path)
    assert ran.returncode != 0
    assert "error (rank 0): example 4: 2 image(s) but 1 placeholder(s)" in ran.stderr
    assert "record:" not in ran.stderr  # no batch ran
    assert not (tmp_path / "t.nc").exists()


def test_an_incomplete_sharded_trace_is_refused(work, tmp_path):
    partial = tmp_path / "t.nc"
    partial.mkdir()
    shutil.copy(work / "two.nc" / "shard-00001-of-00002.nc", partial)
    with pytest.raises(TraceError, match="missing shard-00000-of-00002.nc"):
        load_trace(partial)


def test_lazy_findings_equal_in_memory_ones(work):
    result = runner.invoke(app, ["analyze", str(work / "two.nc"), "--chunks", "2", "--out",
                                 str(work / "lazy.json")])
    assert result.exit_code == 0, result.output
    one("analyze", str(work / "two.nc"), "--out", str(work / "whole.json"))
    lazy, whole = (json.loads((work / f"{n}.json").read_text()) for n in ("lazy", "whole"))
    for part in ("sinks", "redundancy", "exit", "flow"):
        assert_close(lazy[part], whole[part])


def assert_close(a, b, path: str = "") -> None:
    """Equal JSON values, floats within 1e-9 (a chunked sum adds in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_shares_are_contiguous_blocks_in_rank_order():
    blocks = [parallel.World(rank=r, size=3).share(8) for r in range(3)]
    assert [list(b) for b in blocks] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert parallel.World().share(4) == range(4)
