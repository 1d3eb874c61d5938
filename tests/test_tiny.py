"""Tiny random models: every family builds, processes its own prompts, runs, saves, reloads,
is reproducible by seed, and exposes the attention call attnflow reads through nnsight."""

from __future__ import annotations

from functools import cache, reduce

import nnsight
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoProcessor,
    BatchFeature,
    PreTrainedModel,
)

from attnflow import compat
from attnflow.probes.adapters import (
    adapter_for,
    attention_layers,
    decoder_layers,
    dims,
    image_token_id,
    layers_path,
)
from attnflow.toys import tiny

VLMS = [f for f in tiny.FAMILIES if tiny.placeholder(f) is not None]
TEXT_ONLY = [f for f in tiny.FAMILIES if f not in VLMS]


@cache
def _toy(family: str, attn: str = "sdpa"):
    """One build per family and backend for the read-only tests."""
    return tiny.build(family, attn_implementation=attn)


def _inputs(processor, prompts: list[dict]) -> BatchFeature:
    """Process a batch of sample prompts (images as one list per prompt)."""
    kwargs = {"text": [p["prompt"] for p in prompts], "padding": True, "return_tensors": "pt"}
    if any(p["images"] for p in prompts):
        kwargs["images"] = [p["images"] for p in prompts]
    return processor(**kwargs)


def _logits(model: PreTrainedModel, inputs: BatchFeature, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_each_toy_is_its_adapter_entry_with_images_exactly_when_multimodal(family):
    model, processor = _toy(family)
    adapter = adapter_for(model)
    assert adapter.family == family
    assert adapter.multimodal == (tiny.placeholder(family) is not None) == (image_token_id(model) is not None)
    assert adapter.multimodal == any(p.get("images") for p in tiny.sample_prompts(family))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_forward_on_each_prompt_and_padded_batch(family):
    model, processor = _toy(family)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = tiny.sample_prompts(family)
    assert 2 <= len(prompts) <= 3
    for batch in [[p] for p in prompts] + [prompts]:
        inputs = _inputs(processor, batch)
        logits = _logits(model, inputs).logits
        assert logits.shape == (len(batch), inputs["input_ids"].shape[1], vocab)
        assert torch.isfinite(logits).all()
    mask = _inputs(processor, prompts)["attention_mask"]
    assert (mask == 0).any(), "prompts of different lengths must be padded"


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_model_is_tiny_float32_eval(family):
    model, _ = _toy(family)
    d = dims(model)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert 2 <= d["num_layers"] <= 3 and d["hidden_size"] == 64 and d["num_heads"] == 4
    assert sum(p.numel() for p in model.parameters()) < 500_000
    if family != "bert":
        assert d["num_kv_heads"] == 2


@pytest.mark.parametrize("family", VLMS)
def test_processor_emits_the_configured_image_token(family):
    model, processor = _toy(family)
    token = model.config.image_token_id
    assert isinstance(token, int) and token == image_token_id(model)
    for prompt in tiny.sample_prompts(family):
        ids = _inputs(processor, [prompt])["input_ids"][0]
        per_image = int((ids == token).sum()) / len(prompt["images"])
        assert 4 <= per_image <= 64, f"{family}: {per_image} visual tokens per image"


@pytest.mark.parametrize("family", VLMS)
def test_sample_prompts_place_images_first_middle_and_twice(family):
    prompts = tiny.sample_prompts(family)
    slot = tiny.placeholder(family)
    assert all(p["prompt"].count(slot) == len(p["images"]) for p in prompts)
    assert any(p["prompt"].startswith(slot) for p in prompts)
    assert any(not p["prompt"].startswith(slot) and not p["prompt"].endswith(slot) for p in prompts)
    assert max(len(p["images"]) for p in prompts) == 2


@pytest.mark.parametrize("family", TEXT_ONLY)
def test_text_prompts_have_no_images_and_known_words(family):
    _, tokenizer = _toy(family)
    for prompt in tiny.sample_prompts(family):
        assert prompt["images"] == []
        assert tokenizer.unk_token_id not in tokenizer(prompt["prompt"])["input_ids"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tokenizer_adds_bos_or_cls_sep(family):
    _, processor = _toy(family)
    tok = getattr(processor, "tokenizer", processor)
    ids = tok("the red square")["input_ids"]
    if family == "bert":
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) == 5
    elif family == "paligemma":  # its processor, not the tokenizer, writes BOS: after the image tokens
        assert len(ids) == 3
        ids = _inputs(processor, tiny.sample_prompts(family)[:1])["input_ids"][0].tolist()
        assert ids.count(tok.bos_token_id) == 1 and ids[ids.index(tok.bos_token_id) - 1] == tok.image_token_id
    else:
        assert ids[0] == tok.bos_token_id and len(ids) == 4


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_same_seed_same_weights_other_seed_differs(family):
    a, _ = tiny.build(family, seed=1)
    sa, sb = a.state_dict(), _toy(family)[0].state_dict()
    assert sa.keys() == sb.keys()
    assert not all(torch.equal(sa[k], sb[k]) for k in sa), "seed 1 and seed 0 should differ"
    b, _ = tiny.build(family, seed=1)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sa.items())


_AUTO_MODEL = {**{f: AutoModelForCausalLM for f in TEXT_ONLY if f != "bert"}, "bert": AutoModelForMaskedLM}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_save_then_auto_load_gives_identical_logits(family, tmp_path):
    model, processor = _toy(family)
    path = tiny.save(family, tmp_path / family)
    loaded = _AUTO_MODEL.get(family, AutoModelForImageTextToText).from_pretrained(path).eval()
    assert type(loaded) is type(model)
    # text-only: the class the toy saved (AutoTokenizer swaps in Qwen2Tokenizer for any qwen2 checkpoint,
    # which would not read the toy's word-level vocabulary)
    reloaded = (AutoProcessor if family in VLMS else type(processor)).from_pretrained(path)
    prompts = tiny.sample_prompts(family)
    inputs, again = _inputs(processor, prompts), _inputs(reloaded, prompts)
    assert inputs.keys() == again.keys()
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    assert torch.equal(_logits(model, inputs).logits, _logits(loaded, again).logits)


def test_bert_loads_as_a_bare_encoder(tmp_path):
    path = tiny.save("bert", tmp_path / "bert")
    encoder = AutoModel.from_pretrained(path).eval()
    masked_lm, tokenizer = _toy("bert")
    inputs = _inputs(tokenizer, tiny.sample_prompts("bert"))
    assert torch.equal(_logits(encoder, inputs).last_hidden_state,
                       _logits(masked_lm.bert, inputs).last_hidden_state)


def test_cached_writes_once_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFLOW_CACHE", str(tmp_path))
    path = tiny.cached("llama", seed=2)
    assert path == tmp_path / "toys" / "llama-seed2"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.cached("llama", seed=2) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "toys").iterdir()] == ["llama-seed2"]  # no temp dir left
    loaded = AutoModelForCausalLM.from_pretrained(path)
    fresh, _ = tiny.build("llama", seed=2)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_unknown_family_is_a_clear_error():
    for call in (tiny.build, tiny.sample_prompts, tiny.cached, tiny.placeholder):
        with pytest.raises(ValueError, match="unknown toy family 'gpt9'.*llava"):
            call("gpt9")


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_attention_call_reachable_through_nnsight(family):
    model, processor = tiny.build(family)
    adapter = adapter_for(model)
    inputs = _inputs(processor, tiny.sample_prompts(family))
    batch, length = inputs["input_ids"].shape
    d = dims(model)
    wrapped = nnsight.NNsight(model)
    first = attention_layers(model).index(True)  # a hybrid model's first layers may be linear attention
    layer = reduce(getattr, layers_path(model).split("."), wrapped)[first]
    attention = reduce(getattr, adapter.attention.split("."), layer)
    with torch.no_grad(), wrapped.trace(**inputs):
        args, kwargs = compat.attention_call(attention).inputs
        shapes = nnsight.save([tuple(a.shape) for a in args[1:4]])
        scaling = nnsight.save(kwargs["scaling"])
    head_dim = d["hidden_size"] // d["num_heads"]
    assert shapes == [(batch, d["num_heads"], length, head_dim),
                      (batch, d["num_kv_heads"], length, head_dim),
                      (batch, d["num_kv_heads"], length, head_dim)]
    # Gemma4 scores RMS-normed queries and keys unscaled
    assert scaling == pytest.approx(1.0 if family == "gemma4" else head_dim ** -0.5)
    assert len(decoder_layers(model)) == d["num_layers"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_eager_returns_attention_weights(family):
    model, processor = _toy(family, "eager")
    inputs = _inputs(processor, tiny.sample_prompts(family))
    out = _logits(model, inputs, output_attentions=True)
    batch, length = inputs["input_ids"].shape
    assert len(out.attentions) == sum(attention_layers(model))  # linear-attention layers return none
    real = inputs["attention_mask"].bool()
    for weights in out.attentions:
        assert weights.shape == (batch, dims(model)["num_heads"], length, length)
        rows = weights.sum(-1).permute(0, 2, 1)[real]  # rows of real (non-pad) queries
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
