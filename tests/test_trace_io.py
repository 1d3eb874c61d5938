"""Trace save/load round trip, and bad input: clear errors, no partial files left behind."""

import json

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from typer.testing import CliRunner

from attnflow.cli import app
from attnflow.probes.adapters import UnsupportedModelError, adapter_for
from attnflow.probes.inputs import InputError, load_examples
from attnflow.probes.io import TraceError, load_trace, save_trace
from attnflow.probes.record import record
from attnflow.toys import tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def llava():
    return tiny.build("llava")


def test_round_trip_is_identical(llava, tmp_path):
    model, processor = llava
    trace = record(model, tiny.sample_prompts("llava"), processor=processor, progress=False)
    path = save_trace(trace, tmp_path / "t.nc")
    back = load_trace(path)
    xr.testing.assert_identical(trace, back)
    assert [p.name for p in tmp_path.iterdir()] == ["t.nc"]


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.nc"
    bad.write_bytes(b"\x89HDF not really")
    with pytest.raises(TraceError, match="not a readable attnflow trace"):
        load_trace(bad)
    foreign = tmp_path / "foreign.nc"
    xr.Dataset({"x": ("a", np.arange(3))}).to_netcdf(foreign, engine="h5netcdf")
    with pytest.raises(TraceError, match="not an attnflow trace"):
        load_trace(foreign)
    old = tmp_path / "old.nc"
    xr.Dataset({"x": ("a", np.arange(3))}, attrs={"attnflow_trace": 0}).to_netcdf(old, engine="h5netcdf")
    with pytest.raises(TraceError, match="schema 0"):
        load_trace(old)


def test_unsupported_model_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2.*Supported: .*llava"):
        adapter_for(model)


def _write(tmp_path, rows, image=True):
    if image:
        Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "a.png")
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows,message", [
    ([{"image": "a.png", "prompt": "what color is it ?"}], "no image placeholder"),
    ([{"images": ["a.png", "a.png"], "prompt": "<image> what color ?"}], "2 image"),
    ([{"image": "missing.png", "prompt": "<image> what ?"}], "cannot read image"),
    ([{"prompt": ""}], "non-empty string 'prompt'"),
])
def test_bad_inputs_fail_clearly_and_write_nothing(llava, tmp_path, rows, message):
    model, processor = llava
    path = _write(tmp_path, rows)
    with pytest.raises(InputError, match=message):
        record(model, path, processor=processor, progress=False)
    out = tmp_path / "trace.nc"
    result = runner.invoke(app, ["record", "--model", "toy-llava", "--inputs", str(path), "--out", str(out)])
    assert result.exit_code == 2 and message.split()[0] in result.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_empty_input_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(InputError, match="holds no examples"):
        load_examples(path)
    result = runner.invoke(app, ["record", "--model", "toy-llama", "--inputs", str(path), "--out",
                                 str(tmp_path / "t.nc")])
    assert result.exit_code == 2 and "no examples" in result.output


def test_cli_records_a_trace_that_loads(tmp_path):
    out = tmp_path / "t.nc"
    result = runner.invoke(app, ["record", "--model", "toy-llama", "--out", str(out), "--level", "full",
                                 "--layers", "0,1"])
    assert result.exit_code == 0, result.output
    trace = load_trace(out)
    assert trace.layer_full.values.tolist() == [0, 1] and trace.attrs["model_type"] == "llama"
