"""The trace-only analyses on dask-backed (lazy) traces: the same findings as in memory, computed
one chunk of samples at a time (issue #15, traces larger than memory)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import xarray as xr
from dask.callbacks import Callback

from attnflow.analyses.exits import find_exit
from attnflow.analyses.flow import flow_matrix
from attnflow.analyses.maps import trace_maps
from attnflow.analyses.redundancy import find_redundancy
from attnflow.analyses.sinks import find_sinks, head_scores
from attnflow.analyses.thresholds import Thresholds
from attnflow.benchmarks.bigtrace import Sizes, analyse, synthetic_piece, write_trace
from attnflow.probes.io import load_trace
from attnflow.probes.record import record
from attnflow.toys import planted

torch.set_num_threads(1)
TH = Thresholds()
PLANTED = {
    "sinks": lambda: planted.sink_model([0, 3], [1, 2], num_layers=4, hidden_size=64, num_heads=4, sink_dim=7,
                                        length=24, samples=6),
    "identity": lambda: planted.identity_model([1, 3], num_layers=5, hidden_size=32, num_heads=2, samples=5, seed=1),
    "exit": lambda: planted.exit_vlm(2, num_layers=4, hidden_size=64, num_heads=4, samples=5, seed=2),
}


def analyses(trace: xr.Dataset) -> dict[str, Any]:
    return {"sinks": find_sinks(trace, TH), "redundancy": find_redundancy(trace, TH), "exit": find_exit(trace, TH),
            "flow": flow_matrix(trace), "head_scores": head_scores(trace, TH).tolist()}


def assert_same(lazy: Any, eager: Any, where: str = "") -> None:
    """Equal, floats to 1e-6 relative (NaN equals NaN); ``where`` names the place that differs."""
    if isinstance(eager, dict):
        assert lazy.keys() == eager.keys(), where
        for key in eager:
            assert_same(lazy[key], eager[key], f"{where}.{key}")
    elif isinstance(eager, (list, tuple)):
        assert len(lazy) == len(eager), where
        for i, (a, b) in enumerate(zip(lazy, eager)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(eager, float) and math.isnan(eager):
        assert math.isnan(lazy), where
    elif isinstance(eager, float):
        assert lazy == pytest.approx(eager, rel=1e-6, abs=1e-12), where
    else:
        assert lazy == eager, where


class LargestResult(Callback):
    """The most bytes any one dask task returns, the final gathering of a computed array included."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self.largest = max(self.largest, getattr(result, "nbytes", 0))


@pytest.fixture(scope="module", params=sorted(PLANTED))
def recorded(request) -> tuple[str, xr.Dataset]:
    p = PLANTED[request.param]()
    return request.param, record(p.model, p.examples, processor=p.processor, progress=False)


def test_lazy_planted_traces_give_the_in_memory_findings(recorded, tmp_path):
    name, trace = recorded
    eager = analyses(trace)
    sinks = eager["sinks"]
    found = {"sinks": [(t["layer"], t["pos"]) for t in sinks["tokens"]] == [(1, 0), (1, 3), (2, 0), (2, 3)]
             and sinks["dims"] == [7] and bool(sinks["massive"]),
             "identity": sorted(eager["redundancy"]["candidates"]) == [1, 3],
             "exit": eager["exit"]["applies"] and eager["exit"]["layer"] == 2}
    assert found[name]  # the comparison is not vacuous: what the model plants is there
    chunked = trace.chunk({"sample": 2})
    assert len(chunked.chunksizes["sample"]) > 1
    assert_same(analyses(chunked), eager, name)
    trace.to_netcdf(tmp_path / "trace.nc", engine="h5netcdf")
    with xr.open_dataset(tmp_path / "trace.nc", engine="h5netcdf", chunks={"sample": 2}) as opened:
        assert_same(analyses(opened), eager, name)


def test_full_maps_of_a_lazy_trace_are_read_one_sample_at_a_time_and_equal():
    p = PLANTED["exit"]()
    full = record(p.model, p.examples, processor=p.processor, level="full", progress=False)
    eager = trace_maps(full)
    with LargestResult() as seen:
        lazy = trace_maps(full.chunk({"sample": 2}))
    assert seen.largest <= full["attn"].nbytes // full.sizes["sample"]
    assert len(lazy) == len(eager) and all((a == b).all() for a, b in zip(lazy, eager))


def test_lazy_synthetic_trace_in_several_files_gives_the_in_memory_findings(tmp_path):
    write_trace(tmp_path, 96, 48, Sizes(layers=6, heads=4, positions=48, hidden=64, side=4))
    eager = analyses(load_trace(tmp_path))
    sinks = eager["sinks"]
    assert [(t["layer"], t["pos"]) for t in sinks["tokens"]] == [(2, 0), (3, 0), (4, 0), (5, 0), (5, 1)]
    assert sinks["dims"] == [7] and {(m["pos"], m["dim"]) for m in sinks["massive"]} == {(0, 7), (5, 7)}
    assert [(v["layer"], v["pos"], v["by"]) for v in sinks["visual"]] == (
        [(layer, 5, ["phi"]) for layer in range(1, 5)] + [(5, 1, ["attention"]), (5, 5, ["phi"])])
    assert sorted(eager["redundancy"]["candidates"]) == [2, 4] and eager["exit"]["layer"] == 3
    assert_same(analyses(load_trace(tmp_path, chunks=32)), eager)
    summary = analyse(tmp_path, 32)  # what the benchmark's child reports
    assert summary["found"]["candidates"] == eager["redundancy"]["candidates"] and summary["peak_rss_bytes"] > 0


def test_lazy_analyses_hold_a_chunk_of_samples_never_a_whole_variable():
    trace = synthetic_piece(0, 512, Sizes(layers=4, heads=16, positions=64, hidden=64, side=4)).chunk({"sample": 32})
    chunk = trace["received"].nbytes // 16  # 512 KiB of the 8 MiB the largest variable holds
    with LargestResult() as seen:
        analyses(trace)
    assert chunk <= seen.largest < 4 * chunk
