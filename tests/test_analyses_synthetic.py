"""The analyses on hand-built traces that follow the schema, where the answer is known.

``make_trace`` computes every summary variable from explicit attention maps and hidden
states with the definitions in attnflow.probes.schema (an oracle written independently of
probes/record.py), so each test sets up a pattern and checks that the analysis finds it.
"""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import xarray as xr

from attnflow.analyses import flow as flow_mod
from attnflow.analyses.exits import find_exit, first_stable, last_to_visual, text_to_visual
from attnflow.analyses.findings import Findings, FindingsError
from attnflow.analyses.redundancy import find_redundancy
from attnflow.analyses.sinks import find_sinks, var_phi
from attnflow.analyses.thresholds import Thresholds
from attnflow.analyses.validate import TraceMismatchError, check_trace
from attnflow.probes.schema import FIELDS, GROUPS, NO_PATCH, SCHEMA_VERSION

RNG = np.random.default_rng(0)


def causal_uniform(T: int) -> np.ndarray:
    """Uniform causal attention: row q spreads evenly over keys 0..q."""
    return np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]


def with_sink(T: int, pos: int, weight: float) -> np.ndarray:
    """Causal attention where every query after ``pos`` sends ``weight`` to ``pos``."""
    a = causal_uniform(T)
    for q in range(pos + 1, T):
        a[q] *= (1 - weight) / (1 - a[q, pos])
        a[q, pos] = weight
    return a


def make_trace(attn: np.ndarray, hidden: np.ndarray, modality: list[list[str]],
               causal: bool = True) -> xr.Dataset:
    """A schema-following trace from per-sample attention ``attn`` [S, L, H, T, T] (rows sum
    to 1) and residual streams ``hidden`` [S, L + 1, T, d] (depth 0 = embeddings); all
    samples have length T. Visual tokens get a square patch grid in order."""
    S, L, H, T, _ = attn.shape
    mod = np.array(modality)
    visible = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
    n_seen = visible.sum(0).astype(float)
    uniform = (visible / visible.sum(1, keepdims=True)).sum(0) / n_seen
    received = (attn * visible).sum(-2) / n_seen
    flow = np.full((S, L, H, len(GROUPS), len(GROUPS)), np.nan)
    for s in range(S):
        for i, src in enumerate(GROUPS):
            for j, dst in enumerate(GROUPS):
                rows, cols = mod[s] == src, mod[s] == dst
                if rows.any():
                    flow[s, :, :, i, j] = attn[s][:, :, rows][:, :, :, cols].sum(-1).mean(-1)
    x_in, x_out = hidden[:, :-1], hidden[:, 1:]
    cos = (x_in * x_out).sum(-1) / (np.linalg.norm(x_in, axis=-1) * np.linalg.norm(x_out, axis=-1))
    absx = np.abs(x_out)
    side = int(np.sqrt((mod[0] == "visual").sum()))
    patch_row = np.full((S, T), NO_PATCH)
    patch_col = np.full((S, T), NO_PATCH)
    for s in range(S):
        idx = np.flatnonzero(mod[s] == "visual")
        patch_row[s, idx] = np.arange(len(idx)) // max(side, 1)
        patch_col[s, idx] = np.arange(len(idx)) % max(side, 1)
    values = {
        "received": received, "last_row": attn[..., -1, :],
        "uniform": np.broadcast_to(uniform, (S, L, T)).copy(), "n_seen": np.broadcast_to(n_seen, (S, L, T)).copy(),
        "flow": flow, "arank": np.full((S, L, H), float(T - 1)), "update_cos": cos,
        "max_abs": absx.max(-1), "argmax_dim": absx.argmax(-1).astype(float),
        "topk_abs": -np.sort(-absx, -1)[..., :3].transpose(0, 1, 3, 2),
        "topk_dim": np.argsort(-absx, -1, kind="stable")[..., :3].transpose(0, 1, 3, 2).astype(float),
        "median_abs": np.median(absx, -1), "rms": np.sqrt((x_out ** 2).mean(-1)), "resid_last": hidden[:, :, -1],
        "modality": mod, "token": np.array([[f"{m}{t}" for t, m in enumerate(r)] for r in mod]),
        "token_id": np.tile(np.arange(T), (S, 1)), "image": np.where(mod == "visual", 0, -1),
        "patch_row": patch_row, "patch_col": patch_col, "length": np.full(S, T),
        "answer": np.array([""] * S), "qtype": np.array([""] * S), "prompt": np.array(["synthetic"] * S),
    }
    fields = {name: (FIELDS[name].dims, v) for name, v in values.items()}  # dims from the one schema table
    data = {k: v for k, v in fields.items() if not FIELDS[k].coord}
    coords = {**{k: v for k, v in fields.items() if FIELDS[k].coord},
              "sample": np.arange(S), "layer": np.arange(L), "head": np.arange(H), "pos": np.arange(T),
              "src": list(GROUPS), "dst": list(GROUPS), "depth": np.arange(L + 1)}
    attrs = {"attnflow_trace": SCHEMA_VERSION, "model_type": "synthetic", "num_layers": L, "num_heads": H,
             "fingerprint": "sha256:synthetic", "causal": int(causal), "level": "summary", "layers_full": "[]"}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def vlm_modality(S: int, n_visual: int = 9, n_text: int = 6) -> list[list[str]]:
    return [["bos"] + ["visual"] * n_visual + ["text"] * n_text] * S


def random_hidden(S: int, L: int, T: int, d: int = 32) -> np.ndarray:
    return RNG.normal(size=(S, L + 1, T, d))


def stack(maps: list[list[np.ndarray]], H: int = 2, every_head: bool = False) -> np.ndarray:
    """[S][L] maps [T, T] -> [S, L, H, T, T]: head 0 (or every head) is the map, the others
    attend uniformly."""
    out = []
    for per_layer in maps:
        T = per_layer[0].shape[0]
        out.append([[m] + [m if every_head else causal_uniform(T)] * (H - 1) for m in per_layer])
    return np.array(out)


TH = Thresholds()


def test_uniform_causal_attention_has_no_sink_although_early_keys_get_large_raw_shares():
    S, L, T = 3, 2, 16
    trace = make_trace(stack([[causal_uniform(T)] * L] * S), random_hidden(S, L, T), vlm_modality(S))
    # pos 0 takes more than the raw-share threshold, only because causal masking favours it
    assert float(trace["received"].isel(pos=0).min()) > TH.sink_share
    assert find_sinks(trace, TH)["tokens"] == []


def test_planted_sink_is_found_with_its_share_ratio_head_and_frequency():
    S, L, T, pos = 4, 3, 16, 5
    maps = [[causal_uniform(T), with_sink(T, pos, 0.6), causal_uniform(T)]] * S
    trace = make_trace(stack(maps), random_hidden(S, L, T), vlm_modality(S))
    tokens = find_sinks(trace, TH)["tokens"]
    assert [(t["layer"], t["pos"]) for t in tokens] == [(1, pos)]
    t = tokens[0]
    expected_share = float(trace["received"].sel(layer=1, head=0, pos=pos).mean())
    assert t["share"] == pytest.approx(expected_share)
    assert t["ratio"] == pytest.approx(expected_share / float(trace["uniform"].sel(layer=1, pos=pos).mean()))
    assert t["heads"] == [0] and t["frequency"] == 1.0
    assert (t["token"], t["modality"]) == ("visual5", "visual")


def test_sink_frequency_counts_all_samples_and_gates_listing():
    S, L, T = 4, 1, 16
    maps = [[with_sink(T, 3, 0.7)]] * 2 + [[causal_uniform(T)]] * 2
    trace = make_trace(stack(maps), random_hidden(S, L, T), vlm_modality(S))
    assert find_sinks(trace, TH)["tokens"] == []  # a sink in half the samples: not listed at 0.75
    tokens = find_sinks(trace, Thresholds(sink_frequency=0.5))["tokens"]
    assert [(t["pos"], t["frequency"]) for t in tokens] == [(3, 0.5)]


def test_sink_needs_material_share_and_enough_queries():
    S, L, T = 2, 1, 16
    weak = [[with_sink(T, 10, 0.18)]] * S  # 2.2x uniform for pos 10 but a share of 0.165
    trace = make_trace(stack(weak), random_hidden(S, L, T), vlm_modality(S))
    assert find_sinks(trace, TH)["tokens"] == []
    assert find_sinks(trace, Thresholds(sink_share=0.1))["tokens"]
    late = [[with_sink(T, T - 3, 0.9)]] * S  # seen by 3 queries only
    trace = make_trace(stack(late), random_hidden(S, L, T), vlm_modality(S))
    assert find_sinks(trace, TH)["tokens"] == []
    assert find_sinks(trace, Thresholds(sink_min_queries=3))["tokens"]


def massive_hidden(S: int, L: int, T: int, d: int, dim: int, pos: int, value: float) -> np.ndarray:
    hidden = random_hidden(S, L, T, d)
    hidden[:, 1:, pos, dim] = value
    return hidden


def test_massive_activation_dims_are_discovered_and_scale_free():
    S, L, T, d = 3, 2, 16, 64
    maps = stack([[causal_uniform(T)] * L] * S)
    trace = make_trace(maps, massive_hidden(S, L, T, d, dim=37, pos=0, value=5000.0), vlm_modality(S))
    sinks = find_sinks(trace, TH)
    assert sinks["dims"] == [37]
    assert {(m["layer"], m["pos"], m["dim"]) for m in sinks["massive"]} == {(0, 0, 37), (1, 0, 37)}
    scaled = make_trace(maps, massive_hidden(S, L, T, d, dim=37, pos=0, value=5000.0) * 1e-3, vlm_modality(S))
    assert find_sinks(scaled, TH)["dims"] == [37]  # relative thresholds: units do not matter


def test_a_token_carrying_two_massive_dims_reports_both():
    S, L, T, d = 3, 2, 16, 64
    hidden = massive_hidden(S, L, T, d, dim=37, pos=0, value=6000.0)
    hidden[:, 1:, 0, 11] = -4000.0  # LLaMA-2-style: a second massive dim on the same token
    trace = make_trace(stack([[causal_uniform(T)] * L] * S), hidden, vlm_modality(S))
    assert sorted(find_sinks(trace, TH)["dims"]) == [11, 37]
    phi = var_phi(trace, [11])  # the second-largest entry still counts for VAR's phi
    x = hidden[0, 1, 0]
    assert phi[0, 0, 0] == pytest.approx(4000.0 / np.sqrt((x ** 2).mean()))


def test_no_massive_activation_when_the_largest_entry_is_only_tens_of_medians():
    S, L, T, d = 3, 2, 16, 64
    trace = make_trace(stack([[causal_uniform(T)] * L] * S),
                       massive_hidden(S, L, T, d, dim=5, pos=0, value=12.0), vlm_modality(S))
    sinks = find_sinks(trace, TH)
    assert sinks["dims"] == [] and sinks["massive"] == [] and sinks["visual"] == []


def test_var_phi_flags_visual_tokens_with_sink_dimension_mass():
    S, L, T, d = 3, 2, 16, 64
    hidden = massive_hidden(S, L, T, d, dim=9, pos=0, value=5000.0)
    hidden[:, 1:, 4, 9] = 5000.0  # a visual token carrying the same dimension
    trace = make_trace(stack([[causal_uniform(T)] * L] * S), hidden, vlm_modality(S))
    phi = var_phi(trace, [9])
    x = hidden[0, 1, 4]
    assert phi[0, 0, 4] == pytest.approx(5000.0 / np.sqrt((x ** 2).mean()))
    assert phi[0, 0, 7] == 0.0  # largest entry elsewhere: not a sink dimension
    visual = find_sinks(trace, TH)["visual"]
    assert [(v["layer"], v["pos"], v["by"]) for v in visual] == [(0, 4, ["phi"]), (1, 4, ["phi"])]


def test_block_influence_angular_distance_and_candidates():
    S, L, T, d = 2, 4, 16, 32
    hidden = random_hidden(S, L, T, d)
    hidden[:, 2] = hidden[:, 1]  # layer 1 is an identity
    hidden[:, 4] = hidden[:, 3]  # so is the last layer, which is never a candidate
    trace = make_trace(stack([[causal_uniform(T)] * L] * S), hidden, vlm_modality(S))
    red = find_redundancy(trace, TH)
    x_in, x_out = hidden[:, :-1], hidden[:, 1:]
    cos = (x_in * x_out).sum(-1) / (np.linalg.norm(x_in, axis=-1) * np.linalg.norm(x_out, axis=-1))
    visual = np.array(vlm_modality(S))[0] == "visual"
    assert red["block_influence"]["all"] == pytest.approx(list(1 - cos.mean((0, 2))))
    assert red["block_influence"]["visual"] == pytest.approx(list(1 - cos[:, :, visual].mean((0, 2))))
    assert red["candidates"] == [1]
    last = hidden[:, :, -1]
    unit = last / np.linalg.norm(last, axis=-1, keepdims=True)
    want = np.arccos(np.clip((unit[:, 0] * unit[:, 2]).sum(-1), -1, 1)).mean() / np.pi
    assert red["angular_distance"][1][0] == pytest.approx(want)  # d(x^0, x^2)
    assert red["angular_distance"][0][1] == pytest.approx(0.0, abs=1e-6)
    assert int(np.nanargmin(red["angular_distance"][0])) in (1, 3)


def test_first_stable():
    assert first_stable(np.array([False, True, False, True, True])) == 3
    assert first_stable(np.array([True, True])) == 0
    assert first_stable(np.array([True, False])) == 2


def exit_trace(reads_until: int, L: int = 5, S: int = 2) -> xr.Dataset:
    """Text queries put 0.8 of their attention on visual keys in layers < reads_until and 0 after."""
    mod = vlm_modality(S)
    T = len(mod[0])
    visual = np.array(mod[0]) == "visual"
    text = np.array(mod[0]) == "text"
    maps = []
    for layer in range(L):
        a = causal_uniform(T)
        for q in np.flatnonzero(text):
            seen = np.arange(T) <= q
            target = 0.8 if layer < reads_until else 0.0
            a[q] = np.where(visual, target / visual.sum(), (1 - target) / (seen & ~visual).sum()) * seen
        maps.append(a)
    return make_trace(stack([maps] * S, every_head=True), random_hidden(S, L, T), mod)


@pytest.mark.parametrize("reads_until", [0, 2, 5])
def test_observational_exit_layer(reads_until):
    trace = exit_trace(reads_until)
    ex = find_exit(trace, TH)
    assert ex["applies"] and ex["criterion"] == "observational"
    assert ex["layer"] == reads_until
    curve = text_to_visual(trace)
    assert ex["curves"]["observational"] == pytest.approx(list(curve))
    assert ex["curves"]["knockout"] is None and ex["curves"]["logit_lens"] is None
    assert last_to_visual(trace) == pytest.approx(curve)  # the last query is a text query like the others


def test_exit_does_not_apply_without_visual_tokens():
    S, L, T = 2, 3, 12
    trace = make_trace(stack([[causal_uniform(T)] * L] * S), random_hidden(S, L, T),
                       [["bos"] + ["text"] * (T - 1)] * S, causal=False)
    ex = find_exit(trace, TH)
    assert ex["layer"] is None and not ex["applies"] and "no visual tokens" in ex["reason"]


def test_flow_matrix_is_the_sample_and_head_mean():
    trace = exit_trace(2)
    out = flow_mod.flow_matrix(trace)
    want = trace["flow"].mean(("sample", "head")).fillna(0).values
    assert np.allclose(out["matrix"], want, atol=1e-6)
    assert out["labels"]["src"] == list(GROUPS) and out["axes"] == ["layer", "src", "dst"]


def random_causal(L: int, T: int, rng: np.random.Generator) -> np.ndarray:
    a = np.tril(rng.random((L, T, T)) ** 4)
    return a / a.sum(-1, keepdims=True)


def test_rollout_is_the_product_of_residual_augmented_maps():
    rng = np.random.default_rng(1)
    maps = random_causal(3, 7, rng)
    rows = flow_mod.rollout(maps, last=6)
    aug = [0.5 * m + 0.5 * np.eye(7) for m in maps]
    assert np.allclose(rows[0], (aug[2] @ aug[1] @ aug[0])[6])
    assert np.allclose(rows.sum(1), 1.0)


def networkx_flow(maps: np.ndarray, source: int, target: int) -> float:
    """Abnar & Zuidema's layered graph, solved by networkx (an independent max-flow)."""
    L, T, _ = maps.shape
    aug = flow_mod.augmented(maps)
    g = nx.DiGraph()
    for layer in range(L):
        for i in range(T):
            for j in range(T):
                if aug[layer, i, j] > 0:
                    g.add_edge((layer + 1, i), (layer, j), capacity=float(aug[layer, i, j]))
    return nx.maximum_flow_value(g, (L, source), (0, target))


def test_token_level_max_flow_matches_networkx_and_pooling_bounds_it():
    rng = np.random.default_rng(2)
    L, T = 3, 8
    maps = random_causal(L, T, rng)
    singletons = np.arange(T)
    ours = flow_mod.max_flows(flow_mod.pooled_capacities(maps, singletons), source=T - 1)
    theirs = [networkx_flow(maps, T - 1, j) for j in range(T)]
    assert np.allclose(ours, theirs, atol=1e-5)
    pooled_groups = np.array([0, 1, 1, 2, 2, 3, 4, 5])
    pooled = flow_mod.max_flows(flow_mod.pooled_capacities(maps, pooled_groups), source=5)
    for g in range(pooled_groups.max() + 1):  # merging nodes can only raise a max-flow
        members = np.flatnonzero(pooled_groups == g)
        assert pooled[g] >= max(theirs[j] for j in members) - 1e-5


def test_span_groups_pool_visual_patches_into_blocks():
    modality = np.array(["bos"] + ["visual"] * 16 + ["text"] * 2)
    rows = np.array([-1] + [i // 4 for i in range(16)] + [-1, -1])
    cols = np.array([-1] + [i % 4 for i in range(16)] + [-1, -1])
    image = np.where(modality == "visual", 0, -1)
    groups = flow_mod.span_groups(modality, image, rows, cols, block=2)
    assert len(set(groups)) == 1 + 4 + 2
    assert len(set(flow_mod.span_groups(modality, image, rows, cols, block=1))) == len(modality)


def test_auto_block_keeps_at_most_eight_blocks_per_side():
    grid = np.arange(24)
    assert flow_mod.auto_block(grid, grid) == 3
    assert flow_mod.auto_block(np.arange(4), np.arange(4)) == 1
    assert flow_mod.auto_block(np.array([-1]), np.array([-1])) == 1


def test_attribution_sums_and_patch_grid():
    S, L = 2, 3
    mod = vlm_modality(S)
    T = len(mod[0])
    trace = make_trace(stack([[causal_uniform(T)] * L] * S), random_hidden(S, L, T), mod)
    rng = np.random.default_rng(3)
    out = flow_mod.attribution([random_causal(L, T, rng) for _ in range(S)], trace, block=1)
    assert sum(out["rollout"]["by_modality"].values()) == pytest.approx(1.0)
    grid = np.array(out["rollout"]["patches"][0])
    assert grid.shape == (3, 3) and grid.sum() == pytest.approx(out["rollout"]["by_modality"]["visual"], abs=1e-5)
    assert sum(out["maxflow"]["by_modality"].values()) == pytest.approx(1.0)
    assert 0 < out["maxflow"]["by_modality"]["visual"] < 1


def test_bad_traces_are_refused_with_the_reason():
    trace = exit_trace(2)
    check_trace(trace)
    old = trace.copy()
    old.attrs["attnflow_trace"] = SCHEMA_VERSION - 1
    with pytest.raises(TraceMismatchError, match=f"schema {SCHEMA_VERSION - 1}"):
        check_trace(old)
    with pytest.raises(TraceMismatchError, match="resid_last"):
        check_trace(trace.drop_vars("resid_last"))
    with pytest.raises(TraceMismatchError, match="'received' has dims"):
        check_trace(trace.assign(received=trace.received.transpose("sample", "head", "layer", "pos")))
    no_attr = trace.copy()
    del no_attr.attrs["attnflow_trace"]
    with pytest.raises(TraceMismatchError, match="not an attnflow trace"):
        check_trace(no_attr)


def test_thresholds_are_checked_by_name_and_value():
    assert Thresholds.from_kwargs(sink_ratio=3.0).sink_ratio == 3.0
    with pytest.raises(TypeError, match="sink_ratoi"):
        Thresholds.from_kwargs(sink_ratoi=3.0)
    with pytest.raises(ValueError, match="knockout_metric"):
        Thresholds(knockout_metric="accuracy")
    with pytest.raises(ValueError, match="sink_share"):
        Thresholds(sink_share=-1)


def test_findings_round_trip_atomically_and_refuse_other_files(tmp_path):
    trace = exit_trace(2)
    f = Findings(sinks=find_sinks(trace, TH), redundancy=find_redundancy(trace, TH), exit=find_exit(trace, TH),
                 flow=flow_mod.flow_matrix(trace), thresholds=TH.to_dict(), model={"num_layers": 5},
                 trace={"path": ""})
    path = f.save(tmp_path / "out" / "findings.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["findings.json"]
    data = json.loads(path.read_text())
    assert data == json.loads(f.to_json()) and data["attnflow_findings"] == 1
    assert Findings.load(path).to_dict() == data
    assert len(data["redundancy"]["block_influence"]["text"]) == 5 and data["exit"]["layer"] == 2
    (tmp_path / "old.json").write_text(json.dumps({**data, "attnflow_findings": 0}))
    with pytest.raises(FindingsError, match="version"):
        Findings.load(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FindingsError, match="not a readable"):
        Findings.load(tmp_path / "bad.json")
    assert Findings.load(data).to_dict() == data and Findings.load(f) is f
    assert Findings.load(data).exit_applies
    for broken in ({k: v for k, v in data.items() if k != "flow"},
                   {**data, "exit": {k: v for k, v in data["exit"].items() if k != "applies"}}):
        with pytest.raises(FindingsError, match="lacks the section"):
            Findings.load(broken)
