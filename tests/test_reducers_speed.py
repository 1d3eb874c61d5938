"""reducers.speed: decode time is read inside the generation, over its decode steps alone."""

from __future__ import annotations

import pytest
import torch

from attnflow.models import default_inputs, load_model
from attnflow.probes.inputs import load_examples
from attnflow.reducers import Schedule
from attnflow.reducers import speed as speed_module
from attnflow.reducers.fidelity import encode_batches


def test_decode_time_spans_the_decode_steps_alone(monkeypatch):
    """With a clock that reads how many forwards the model has run, every round's decode time per
    token is exactly one forward, unreduced and under a schedule: the stamps span the N decode steps
    of a generation of N+1 tokens and leave its prefill out."""
    torch.set_num_threads(1)
    model, processor = load_model("toy-vlm")
    batch = encode_batches(processor, load_examples(default_inputs("toy-vlm"))[:2], 2, torch.device("cpu"))[0]
    forwards = [0]
    handle = model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    monkeypatch.setattr(speed_module, "perf_counter", lambda: float(forwards[0]))
    fastv = Schedule.for_model(model, [{"op": "prune_visual", "layer": 2, "keep": 0.5, "by": "last_row"}])
    try:
        timed = speed_module.speed(model, {"unreduced": None, "fastv": fastv}, batch, new_tokens=3, repeats=2, pad=0)
    finally:
        handle.remove()
    for name in ("unreduced", "fastv"):
        assert timed[name]["decode"] == [1.0, 1.0]
        assert len(timed[name]["cpu_decode"]) == len(timed[name]["prefill"]) == len(timed[name]["cpu_prefill"]) == 2
    with pytest.raises(ValueError, match="new_tokens must be at least 1"):
        speed_module.speed(model, {"unreduced": None}, batch, new_tokens=0, repeats=1, pad=0)
