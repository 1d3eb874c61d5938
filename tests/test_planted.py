"""The analyses recover exactly what was planted in toy transformers, over random placements
and sizes, and find no sink in random-initialised tiny models of any family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnflow.analyses import analyze
from attnflow.probes.inputs import Example
from attnflow.probes.record import record
from attnflow.toys import planted, tiny

torch.set_num_threads(1)


def recorded(p: planted.Planted):
    return record(p.model, p.examples, processor=p.processor, progress=False)


@pytest.mark.parametrize("seed", range(6))
def test_planted_sinks_are_recovered_exactly(seed):
    rng = np.random.default_rng(seed)
    L, d, H, T = int(rng.integers(2, 6)), int(rng.choice([32, 64, 96])), int(rng.choice([2, 4])), int(rng.integers(32, 49))
    positions = sorted(rng.choice(T - 5, size=int(rng.integers(1, 4)), replace=False).tolist())
    layers = sorted(rng.choice(L, size=int(rng.integers(1, L + 1)), replace=False).tolist())
    sink_dim = int(rng.integers(0, d))
    p = planted.sink_model(positions, layers, num_layers=L, hidden_size=d, num_heads=H, sink_dim=sink_dim,
                           length=T, seed=seed)
    sinks = analyze(recorded(p)).sinks
    assert sorted((t["layer"], t["pos"]) for t in sinks["tokens"]) == sorted((l, q) for l in layers for q in positions)
    assert all(t["frequency"] == 1.0 and t["share"] > 0.25 for t in sinks["tokens"])
    assert sinks["dims"] == [sink_dim]
    assert sorted({m["pos"] for m in sinks["massive"]}) == positions
    assert {m["dim"] for m in sinks["massive"]} == {sink_dim}


@pytest.mark.parametrize("seed", range(6))
def test_planted_identity_layers_are_the_redundancy_candidates(seed):
    rng = np.random.default_rng(100 + seed)
    L, d, H = int(rng.integers(3, 9)), int(rng.choice([32, 64])), int(rng.choice([2, 4]))
    identity = sorted(rng.choice(L, size=int(rng.integers(1, L)), replace=False).tolist())
    red = analyze(recorded(planted.identity_model(identity, num_layers=L, hidden_size=d, num_heads=H,
                                                  seed=seed))).redundancy
    bi = np.array(red["block_influence"]["all"])
    assert sorted(red["candidates"]) == [l for l in identity if l != L - 1]  # never the last layer
    assert np.all(bi[identity] < 1e-6) and np.all(np.delete(bi, identity) > 0.1)
    assert all(red["angular_distance"][0][l] < 1e-3 for l in identity)


@pytest.mark.parametrize("seed", range(8))
def test_planted_visual_exit_is_recovered_by_knockout_and_attention(seed):
    rng = np.random.default_rng(200 + seed)
    L, d, H = int(rng.integers(2, 6)), int(rng.choice([32, 64, 96])), int(rng.choice([2, 4]))
    exit_layer = [0, L][seed] if seed < 2 else int(rng.integers(1, L))
    p = planted.exit_vlm(exit_layer, num_layers=L, hidden_size=d, num_heads=H, seed=seed)
    ex = analyze(recorded(p), p.model, p.examples, processor=p.processor).exit
    assert ex["criterion"] == "knockout" and ex["layer"] == exit_layer
    assert ex["layers"]["observational"]["layer"] == exit_layer
    kl = np.array(ex["curves"]["knockout"])
    assert np.all(kl[:exit_layer] > 10 * ex["layers"]["knockout"]["tolerance"]) and np.all(kl[exit_layer:] < 1e-6)


def test_planted_builders_refuse_impossible_truths():
    with pytest.raises(ValueError, match="sink positions"):
        planted.sink_model([15], [0], length=16)
    with pytest.raises(ValueError, match="exit_layer"):
        planted.exit_vlm(5, num_layers=4)


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("seed", range(3))
def test_no_sink_in_random_tiny_models(family, seed):
    model, processor = tiny.build(family, seed=seed)
    examples = [Example(p["prompt"], p["images"]) for p in tiny.sample_prompts(family)]
    sinks = analyze(record(model, examples, processor=processor, progress=False)).sinks
    assert sinks["tokens"] == [] and sinks["dims"] == [] and sinks["visual"] == []
