"""The analyses on real recordings of the tiny toys of every family, and their model-side
parts (knockout, logit lens, attention maps) checked against plain HF forwards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnflow.analyses import analyze
from attnflow.analyses.knockout import cut_visual, knockout
from attnflow.analyses.lens import lens_logprobs
from attnflow.analyses.maps import model_maps, trace_maps
from attnflow.analyses.thresholds import Thresholds
from attnflow.analyses.validate import TraceMismatchError
from attnflow.probes import adapters
from attnflow.probes.inputs import Example, encode
from attnflow.probes.io import TraceError, save_trace
from attnflow.probes.record import record
from attnflow.probes.schema import SCHEMA_VERSION
from attnflow.toys import tiny

VLMS = [f for f in tiny.FAMILIES if adapters.ADAPTERS[f].multimodal]
torch.set_num_threads(1)


def toy(family: str, attn: str = "sdpa", level: str = "summary"):
    model, processor = tiny.build(family, attn_implementation=attn)
    examples = [Example(p["prompt"], p["images"]) for p in tiny.sample_prompts(family)]
    trace = record(model, examples, processor=processor, level=level, progress=False)
    return model, processor, examples, trace


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_analyze_every_family_end_to_end(family):
    model, processor, examples, trace = toy(family)
    findings = analyze(trace, model, examples, processor=processor)
    data = json.loads(findings.to_json())
    L = trace.sizes["layer"]
    assert data["model"]["num_layers"] == L and data["model"]["fingerprint"] == adapters.fingerprint(model)
    for group in ("all", "text", "visual"):
        assert len(data["redundancy"]["block_influence"][group]) == L
    assert np.array(data["flow"]["matrix"]).shape == (L, 5, 5)
    assert data["thresholds"] == Thresholds().to_dict()
    if family in VLMS:
        ex = data["exit"]
        assert ex["applies"] and ex["criterion"] == "knockout" and 0 <= ex["layer"] <= L
        for curve in ("observational", "knockout", "logit_lens"):
            assert len(ex["curves"][curve]) == L
        linear = [l for l, has in enumerate(adapters.attention_layers(model)) if not has]
        assert data["flow"]["layers_without_attention"] == linear
        if linear:  # rollout needs every layer's map; a hybrid model's linear-attention layers have none
            assert data["flow"]["attribution"] is None and str(linear) in data["flow"]["attribution_note"]
            assert all(data["exit"]["curves"]["observational"][l] is None for l in linear)
            assert str(linear) in " ".join(ex["notes"])
        else:
            assert data["flow"]["attribution"]["rollout"]["by_modality"]["visual"] > 0
    else:
        assert data["exit"]["layer"] is None and not data["exit"]["applies"]


@pytest.mark.parametrize("family", VLMS)
def test_knockout_zeroes_exactly_the_cut_edges_and_leaves_the_model_as_it_was(family):
    model, processor, examples, trace = toy(family, attn="eager")
    batch = encode(processor, examples)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    visual = real & (ids == adapters.image_token_id(model))
    queries = real & ~visual
    L = trace.sizes["layer"]
    with torch.no_grad():
        base = model(**batch, output_attentions=True)
        with cut_visual(model, range(1, L), queries, visual):
            cut = model(**batch, output_attentions=True)
        after = model(**batch)
    # HF returns maps of the softmax-attention layers only (a hybrid model's linear ones have none)
    index = {int(layer): j for j, layer in enumerate(np.flatnonzero(adapters.attention_layers(model)))}
    blocked = (queries[:, None, :, None] & visual[:, None, None, :]).expand_as(base.attentions[0])
    if 0 in index:
        assert torch.equal(base.attentions[index[0]], cut.attentions[index[0]])  # layer 0 is not cut
    for layer in (layer for layer in range(1, L) if layer in index):
        j = index[layer]
        assert float(cut.attentions[j][blocked].abs().max()) == 0.0
        assert float(base.attentions[j][blocked].max()) > 0.0
        kept = cut.attentions[j].sum(-1)  # the remaining edges still make distributions
        assert torch.allclose(kept[real[:, None, :].expand_as(kept)], torch.tensor(1.0), atol=1e-5)
    assert torch.equal(after.logits, base.logits)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_knockout_curves_agree_under_eager_and_sdpa(family):
    curves = {}
    for attn in ("eager", "sdpa"):
        model, processor, examples, trace = toy(family, attn=attn)
        curves[attn] = knockout(model, processor, trace, examples, Thresholds())["curves"]["kl"]
        assert adapters.attn_implementation(model) == attn
    assert np.allclose(curves["eager"], curves["sdpa"], atol=1e-5)
    assert curves["sdpa"][0] > 0  # cutting from layer 0 changes the prediction


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llama"])
def test_logit_lens_at_the_last_depth_is_the_models_own_prediction(family):
    model, processor, examples, trace = toy(family)
    lens = lens_logprobs(model, trace["resid_last"].values)
    for s, ex in enumerate(examples):
        one = encode(processor, [ex])
        with torch.no_grad():
            logits = model(**one).logits[0, -1]
        assert torch.allclose(lens[s, -1], torch.log_softmax(logits.float(), -1), atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_model_maps_equal_the_full_traces_maps_and_restore_the_backend(family):
    model, processor, examples, full = toy(family, level="full")
    from_trace = trace_maps(full)
    from_model = model_maps(model, processor, full, examples, batch_size=2)
    assert adapters.attn_implementation(model) == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    for a, b in zip(from_trace, from_model):
        assert a.shape == b.shape
        assert np.allclose(a, b, atol=1e-5)


def test_mismatched_model_inputs_or_schema_are_refused(tmp_path):
    model, processor, examples, trace = toy("llava")
    other, other_processor = tiny.build("llama")
    with pytest.raises(TraceMismatchError, match="another model"):
        analyze(trace, other, examples, processor=other_processor)
    with pytest.raises(TraceMismatchError, match="2 inputs but the trace has 3"):
        analyze(trace, model, examples[:2], processor=processor)
    with pytest.raises(TraceMismatchError, match="does not encode to the tokens"):
        analyze(trace, model, examples[::-1], processor=processor)
    with pytest.raises(ValueError, match="processor"):
        analyze(trace, model, examples)
    old = trace.copy()
    old.attrs["attnflow_trace"] = SCHEMA_VERSION + 1
    with pytest.raises(TraceMismatchError, match="schema"):
        analyze(old)
    save_trace(old, tmp_path / "old.nc")
    with pytest.raises(TraceError, match="schema"):
        analyze(tmp_path / "old.nc")


def test_a_saved_trace_is_analysed_with_its_own_inputs_file(tmp_path):
    model, processor = tiny.build("llava")
    lines = []
    for i, p in enumerate(tiny.sample_prompts("llava")):
        names = [f"{i}-{j}.png" for j in range(len(p["images"]))]
        for name, image in zip(names, p["images"]):
            image.save(tmp_path / name)
        lines.append(json.dumps({"prompt": p["prompt"], "images": names}))
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("\n".join(lines) + "\n")
    path = save_trace(record(model, inputs, processor=processor, progress=False), tmp_path / "t.nc")
    findings = analyze(path, model, processor=processor)
    assert findings.trace["path"] == str(path) and findings.trace["inputs_path"] == str(inputs)
    assert "knockout" in findings.exit["layers"]
    inputs.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(TraceMismatchError, match="not the one the trace was recorded from"):
        analyze(path, model, inputs, processor=processor)


def test_answer_probability_metric_scores_the_correctly_answered_samples_only():
    model, processor = tiny.build("llava")
    prompts = tiny.sample_prompts("llava")
    greedy = []
    for p in prompts:
        with torch.no_grad():
            logits = model(**encode(processor, [Example(p["prompt"], p["images"])])).logits[0, -1]
        greedy.append(processor.tokenizer.convert_ids_to_tokens(int(logits.argmax())))
    wrong = next(w for w in tiny.WORDS if w.isalpha() and w not in greedy)
    answers = [greedy[0], greedy[1], wrong]
    examples = [Example(p["prompt"], p["images"], a) for p, a in zip(prompts, answers)]
    trace = record(model, examples, processor=processor, progress=False)
    ko = knockout(model, processor, trace, examples, Thresholds(knockout_metric="answer_prob"))
    assert ko["scored_samples"] == 2 and ko["base_accuracy"] == pytest.approx(2 / 3)
    assert np.all(np.isfinite(ko["curves"]["answer_prob"])) and ko["exit_layer"] is not None
    none_right = [Example(p["prompt"], p["images"], wrong) for p in prompts]
    trace = record(model, none_right, processor=processor, progress=False)
    ko = knockout(model, processor, trace, none_right, Thresholds(knockout_metric="answer_prob"))
    assert ko["scored_samples"] == 0 and ko["exit_layer"] is None
