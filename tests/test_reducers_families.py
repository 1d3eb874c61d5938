"""The shortening mechanism beyond LLaVA: LLaVA-NeXT (anyres tiles), Qwen2-VL and Qwen3-VL (M-RoPE
position ids, DeepStack), Idefics3, SmolVLM, InternVL, Mistral3 (Pixtral's row breaks) and Gemma3
(sliding-window layers): an empty schedule reproduces the model, drop == mask on a padded batch,
cached generation == recomputing the prefix; Gemma3 refuses cached generation under a schedule
with a clear error. Protected visual sinks survive every op."""

from __future__ import annotations

import pytest
import torch
from test_reducers_apply import masked_run

from attnflow.reducers import Schedule, ScheduleError, apply
from attnflow.toys import tiny

STEPS = [{"op": "prune_visual", "layer": 1, "keep": 0.5}, {"op": "visual_exit", "layer": 2}]
INPUT = [{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "divprune"}]  # before the first decoder layer
BY_SUFFIX = {"": STEPS, "input": INPUT, "prop": [{**INPUT[0], "proportional": True}]}  # the last: an additive mask


def encode(processor, prompts):
    processor.tokenizer.padding_side = "left"
    return processor(text=[p["prompt"] for p in prompts], images=[p["images"] for p in prompts],
                     padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl", "idefics3", "smolvlm", "internvl",
                                    "mistral3", "gemma3", "qwen2_vl+input", "idefics3+input"])
def test_drop_equals_mask_across_families(family):
    family, _, before = family.partition("+")
    steps = BY_SUFFIX[before]
    model, processor = tiny.build(family, attn_implementation="eager")
    batch = encode(processor, tiny.sample_prompts(family))
    with torch.no_grad():
        full = model(**batch).logits
        with apply(model, Schedule.for_model(model, [])):
            assert torch.equal(model(**batch).logits, full)
        with apply(model, Schedule.for_model(model, steps)) as planner:
            logits = model(**batch).logits
    assert logits.shape[1] < full.shape[1]
    oracle = masked_run(model, batch, planner).logits
    want = oracle.gather(1, planner.original(planner.positions)[..., None].expand(-1, -1, oracle.shape[-1]))
    torch.testing.assert_close(logits[planner.real], want[planner.real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl", "idefics3", "smolvlm", "internvl",
                                    "mistral3", "qwen2_vl+input", "idefics3+input", "qwen2_vl+prop", "internvl+prop"])
def test_cached_generation_equals_recomputing_across_families(family):
    family, _, before = family.partition("+")
    model, processor = tiny.build(family)
    batch = encode(processor, tiny.sample_prompts(family)[:1])
    schedule = Schedule.for_model(model, BY_SUFFIX[before])
    steps, n = 4, batch["input_ids"].shape[1]
    with torch.no_grad():
        with apply(model, schedule):
            out = model.generate(**batch, max_new_tokens=steps, do_sample=False, eos_token_id=None)
        ids = batch["input_ids"]
        for _ in range(steps):
            cur = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
            if "mm_token_type_ids" in batch:
                cur["mm_token_type_ids"] = torch.nn.functional.pad(batch["mm_token_type_ids"], (0, ids.shape[1] - n))
            with apply(model, schedule, prompt_length=n):
                last = model(**cur, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_gemma3_refuses_prune_steps_before_the_first_layer_and_its_baselines_prune_from_layer_1():
    """Gemma3's language model takes a mask per layer type (an image's tokens attend each other both
    ways), which a cut before the first layer would replace with a causal one: refused with the reason,
    before any forward, and the baselines that act there act at layer 1 instead (derive likewise)."""
    from attnflow.reducers.baselines import published

    model, processor = tiny.build("gemma3")
    batch = encode(processor, tiny.sample_prompts("gemma3")[:1])
    with pytest.raises(ScheduleError, match="both ways.*prune from layer 1 on"):
        with apply(model, Schedule.for_model(model, [{**INPUT[0], "proportional": True}])):
            raise AssertionError("apply must refuse before the forward")
    assert published(model)["divprune"].steps[0]["layer"] == 1
    with torch.no_grad(), apply(model, published(model)["divprune"]) as planner:
        model(**batch)
    assert planner.real.sum() < batch["input_ids"].shape[1]


def test_gemma3_refuses_cached_generation_under_a_schedule():
    model, processor = tiny.build("gemma3")
    batch = encode(processor, tiny.sample_prompts("gemma3")[:1])
    with torch.no_grad(), apply(model, Schedule.for_model(model, [{"op": "visual_exit", "layer": 2}])):
        with pytest.raises(ScheduleError, match="sliding_attention layers"):
            model.generate(**batch, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("family, why", [("qwen3_5", "Gated DeltaNet"), ("gemma4", "per-layer input embeddings"),
                                         ("paligemma", "not a causal decoder")])
def test_families_reducers_cannot_shorten_are_refused_with_the_reason(family, why):
    model, _ = tiny.build(family)
    with pytest.raises(ScheduleError, match=why):
        with apply(model, Schedule.for_model(model, [{"op": "visual_exit", "layer": 1}])):
            pass


@pytest.mark.parametrize("steps", [
    [{"op": "prune_visual", "layer": 1, "keep": 0.0}],
    [{"op": "visual_exit", "layer": 1}],
    [{"op": "skip_layers", "layers": [1], "tokens": "visual"}],
])
def test_protected_visual_sinks_are_never_removed(steps):
    model, processor = tiny.build("llava")
    prompts = tiny.sample_prompts("llava")
    batch = encode(processor, prompts)
    sinks = [0, 5, 20]  # visual-token indices; 20 exists only in the two-image prompt
    schedule = Schedule.for_model(model, steps, protect={"visual_sinks": sinks})
    with torch.no_grad(), apply(model, schedule) as planner:
        model(**batch)
    visual = batch["input_ids"] == model.config.image_token_id
    index = visual.long().cumsum(1) - 1
    rows, real = planner.layer_tokens[1]
    for b in range(len(prompts)):
        kept = rows[b][real[b] & visual[b, rows[b]]]
        expected = [i for i in sinks if i < int(visual[b].sum())]
        assert sorted(index[b, kept].tolist()) == expected


def test_cls_ranking_refuses_a_tower_without_cls_and_leaves_no_hook():
    model, processor = tiny.build("idefics3")
    schedule = Schedule.for_model(model, [{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "cls"}])
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ScheduleError, match=r"\[CLS\] attention .* idefics3's tower has none"):
        with apply(model, schedule):
            pass
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
