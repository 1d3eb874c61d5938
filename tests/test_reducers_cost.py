"""The cost model against worked LLaVA-1.5-7B values (FastV arXiv 2403.06764 and PyramidDrop
arXiv 2410.17247 conventions), and the predicted
per-layer counts against the tokens the layers really processed."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnflow.reducers import Schedule, apply
from attnflow.reducers.cost import Shape, fixed_share, forward_ratio, layer_counts, predict
from attnflow.reducers.scores import cosine_distance, recycle_counts
from attnflow.toys import tiny

LLAVA_7B = Shape(num_layers=32, hidden=4096, q_width=4096, kv_width=4096, mlp=11008, bytes_per_value=2)
PROMPT = (35 + 576 + 64, 576)  # system + visual + text tokens


def paper_schedule(steps):
    return Schedule(model={"model_type": "llava", "fingerprint": "sha256:x", "num_layers": 32}, steps=steps)


def test_fastv_and_pdrop_match_the_worked_values():
    fastv = predict(paper_schedule([{"op": "prune_visual", "layer": 2, "keep": 0.5}]), LLAVA_7B, [PROMPT])
    assert fastv["flops_ratio"] == pytest.approx(0.594, abs=5e-4)  # SwiGLU variant of FastV's formula
    assert fastv["visual_tokens_equivalent"] == pytest.approx((2 * 576 + 30 * 288) / 32)
    fastv_144 = predict(paper_schedule([{"op": "prune_visual", "layer": 2, "keep": 0.25}]), LLAVA_7B, [PROMPT])
    assert fastv_144["visual_tokens_equivalent"] == pytest.approx(171.0)  # 144 kept of 576 from layer 2 of 32
    pdrop = predict(paper_schedule([{"op": "prune_visual", "layer": 8, "keep": 0.5},
                                    {"op": "prune_visual", "layer": 16, "keep": 0.25},
                                    {"op": "prune_visual", "layer": 24, "keep": 0.125}]), LLAVA_7B, [PROMPT])
    assert pdrop["visual_tokens_equivalent"] == pytest.approx(270.0)  # 576 / 2 / 4 / 8 by quarters
    # 0.5 MiB of fp16 KV per token over all layers (32 layers x 2 x 4096 x 2 bytes)
    assert pdrop["kv_bytes_full"] == pytest.approx(PROMPT[0] * 0.5 * 2**20)
    assert pdrop["kv_bytes_ratio"] == pytest.approx(1 - (576 - 270) / PROMPT[0])


def test_gqa_shrinks_only_the_kv_projections():
    gqa = Shape(num_layers=1, hidden=64, q_width=64, kv_width=16, mlp=128, bytes_per_value=4)
    mha = Shape(num_layers=1, hidden=64, q_width=64, kv_width=64, mlp=128, bytes_per_value=4)
    n = 10
    assert mha.layer_flops(n) == 4 * n * 64**2 + 2 * n * n * 64 + 3 * n * 64 * 128
    assert mha.layer_flops(n) - gqa.layer_flops(n) == 2 * n * 64 * (64 - 16)


@pytest.mark.parametrize("steps", [
    [{"op": "prune_visual", "layer": 1, "keep": 0.4}, {"op": "skip_layers", "layers": [2], "tokens": "visual"}],
    [{"op": "visual_exit", "layer": 2}, {"op": "skip_layers", "layers": [1], "tokens": "all"}],
])
def test_predicted_counts_are_what_ran(steps):
    model, processor = tiny.build("llava")
    prompts = tiny.sample_prompts("llava")
    batch = processor(text=[p["prompt"] for p in prompts], images=[p["images"] for p in prompts],
                      padding=True, return_tensors="pt")
    schedule = Schedule.for_model(model, steps, protect={"visual_sinks": [1]})
    with torch.no_grad(), apply(model, schedule) as planner:
        model(**batch)
    visual = batch["input_ids"] == model.config.image_token_id
    for b in range(len(prompts)):
        counts = layer_counts(schedule, int(batch["attention_mask"][b].sum()), int(visual[b].sum()))
        for layer, count in enumerate(counts):
            rows, real = planner.layer_tokens[layer]
            ran = rows[b][real[b]]
            assert count.tokens == len(ran)
            assert count.visual == int(visual[b, ran].sum())


def test_fixed_share_counts_what_lies_outside_the_decoder_layers():
    """A text-only decoder's fixed share is its unembedding alone (2·n·d·V FLOPs) against L·2·F(n) in
    the layers, F the cost model's multiply-accumulates: the counter (CPU attention included) and the
    analytic layer formula agree; a VLM's vision tower and projector add to it."""
    model, processor = tiny.build("llama")
    batch = processor([tiny.sample_prompts("llama")[0]["prompt"]], return_tensors="pt")
    n, shape = batch["input_ids"].shape[1], Shape.of(model)
    head = 2 * n * shape.hidden * model.config.vocab_size
    assert fixed_share(model, batch) == pytest.approx(head / (head + 2 * shape.num_layers * shape.layer_flops(n)),
                                                      rel=1e-12)
    vlm, vlm_processor = tiny.build("llava")
    prompt = tiny.sample_prompts("llava")[0]
    vlm_batch = vlm_processor(text=[prompt["prompt"]], images=[prompt["images"]], return_tensors="pt")
    n, shape = vlm_batch["input_ids"].shape[1], Shape.of(vlm)
    text_only = 2 * n * shape.hidden * vlm.config.text_config.vocab_size
    assert fixed_share(vlm, vlm_batch) > text_only / (text_only + 2 * shape.num_layers * shape.layer_flops(n))
    assert forward_ratio({"flops_ratio": 0.4, "scoring_flops_ratio": 0.01}, 0.25) == pytest.approx(0.25 + 0.75 * 0.41)


def test_scoring_counts_the_quadratic_scores_that_the_field_formula_leaves_out():
    """DivPrune's pairwise distances cost R²·d multiply-accumulates, as torch's counter counts the
    distance it computes; recycling adds its pool's P²·d, proportional attention n·k·d; attention-row
    scores add nothing; the decoder ratio (the field's) stays without them."""
    shape = Shape(num_layers=2, hidden=64, q_width=64, kv_width=64, mlp=128, bytes_per_value=4)
    n, v = 40, 32
    full = shape.num_layers * shape.layer_flops(n)

    def cost(**step):
        steps = [{"op": "prune_visual", "layer": 0, "keep": 0.25, **step}]
        return predict(Schedule(model={"model_type": "llava", "fingerprint": "sha256:x", "num_layers": 2},
                                steps=steps), shape, [(n, v)])

    with FlopCounterMode(display=False) as counter:
        cosine_distance(torch.randn(1, v, shape.hidden))
    divprune = cost(by="divprune")
    assert divprune["scoring_flops_ratio"] * full == pytest.approx(counter.get_total_flops() / 2)  # FLOPs = 2·MACs
    pooled = recycle_counts(v, 8)[1]
    assert cost(by="divprune", recycle=True)["scoring_flops_ratio"] * full == pytest.approx((v * v + pooled ** 2) * 64)
    assert cost(by="pool", proportional=True)["scoring_flops_ratio"] * full == pytest.approx(n * 8 * 64)
    assert predict(paper_schedule([{"op": "prune_visual", "layer": 2, "keep": 0.5}]), LLAVA_7B,
                   [PROMPT])["scoring_flops_ratio"] == 0
    assert divprune["flops_ratio"] == cost(by="pool")["flops_ratio"]
