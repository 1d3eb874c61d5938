"""record() against independent oracles: HF eager ``output_attentions`` for every family
(recorded under SDPA and under eager, batched with padding), and TransformerLens."""

import numpy as np
import pytest
import torch

from attnflow import compat
from attnflow.probes.adapters import attention_layers, decoder_layers
from attnflow.probes.inputs import as_examples, encode
from attnflow.probes.record import record
from attnflow.probes.schema import GROUPS
from attnflow.toys import tiny

TOL = 1e-5


def _oracle(model, processor, example):
    """One unpadded sample's HF eager attention maps, and each decoder layer's (input, output)
    hidden states from plain forward hooks (HF's hidden_states miss what a family adds between
    layers, such as Qwen3-VL's DeepStack features)."""
    batch = encode(processor, as_examples([example]))
    io = []

    def keep(module, args, kwargs, output):
        io.append(((args[0] if args else kwargs["hidden_states"])[0], compat.layer_hidden(output)[0]))

    hooks = [layer.register_forward_hook(keep, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return batch, [a[0].double() for a in out.attentions], io


def _check_sample(trace, i, attns, groups):
    """``attns``: HF's maps, one per layer with softmax attention (in order); the others
    (a hybrid model's linear-attention layers) hold NaN."""
    T = len(groups)
    assert int(trace.length[i]) == T
    onehot = np.eye(len(GROUPS))[groups]  # [T, G]
    layers = np.flatnonzero(trace.has_attention.values)
    assert len(layers) == len(attns)
    for name in ("received", "uniform", "n_seen", "last_row", "flow", "arank"):
        assert np.isnan(trace[name].values[i, ~trace.has_attention.values]).all()
    for layer, A in zip(layers, attns):
        A = A.numpy()
        vis = A > 0  # what the model let each query see, read off its own output
        recv = (A * vis).sum(1) / vis.sum(1)
        np.testing.assert_allclose(trace.received.values[i, layer, :, :T], recv, atol=TOL)
        np.testing.assert_allclose(trace.last_row.values[i, layer, :, :T], A[:, -1], atol=TOL)
        mass = A @ onehot  # [H, T, G]
        counts = onehot.sum(0)
        flow = np.einsum("tg,htd->hgd", onehot, mass) / np.where(counts > 0, counts, 1)[None, :, None]
        got = trace.flow.values[i, layer]
        present = counts > 0
        np.testing.assert_allclose(got[:, present], flow[:, present], atol=TOL)
        assert np.isnan(got[:, ~present]).all()
    assert np.isnan(trace.received.values[i, :, :, T:]).all()


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_summary_matches_hf_eager_attentions(family, impl):
    model, processor = tiny.build(family, attn_implementation=impl)
    oracle_model, _ = tiny.build(family, attn_implementation="eager")
    examples = tiny.sample_prompts(family)
    # chunk=7: several query chunks, each restricted to the keys its queries can see
    trace = record(model, examples, processor=processor, batch_size=len(examples), chunk=7, progress=False)
    assert trace.attrs["attn_implementation"] == impl
    assert trace.has_attention.values.tolist() == attention_layers(model)
    lookup = {g: j for j, g in enumerate(GROUPS)}
    for i, ex in enumerate(examples):
        batch, attns, hidden = _oracle(oracle_model, processor, ex)
        T = batch["input_ids"].shape[1]
        groups = [lookup[m] for m in trace.modality.values[i, :T]]
        _check_sample(trace, i, attns, groups)
        for layer, (h_in, h_out) in enumerate(hidden):
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            np.testing.assert_allclose(trace.update_cos.values[i, layer, :T], cos.numpy(), atol=1e-4)
            rms = h_out.pow(2).mean(-1).sqrt().numpy()
            np.testing.assert_allclose(trace.rms.values[i, layer, :T], rms, rtol=1e-4, atol=1e-5)
            median = h_out.abs().median(-1).values.numpy()  # torch's lower median
            np.testing.assert_allclose(trace.median_abs.values[i, layer, :T], median, rtol=1e-4, atol=1e-5)
            # the layer's output itself (under SDPA: from the recorder's one attention pass)
            np.testing.assert_allclose(trace.resid_last.values[i, layer + 1], h_out[T - 1].numpy(), atol=1e-5)


def test_full_level_keeps_only_chosen_maps():
    model, processor = tiny.build("llama", attn_implementation="sdpa")
    examples = tiny.sample_prompts("llama")
    trace = record(model, examples, processor=processor, level="full", layers=[0], progress=False)
    assert trace.attn.dims == ("sample", "layer_full", "head", "q", "k")
    assert trace.layer_full.values.tolist() == [0]
    _, attns, _ = _oracle(tiny.build("llama", attn_implementation="eager")[0], processor, examples[1])
    T = attns[0].shape[-1]
    np.testing.assert_allclose(trace.attn.values[1, 0, :, :T, :T], attns[0].numpy(), atol=TOL)
    summary = record(model, examples, processor=processor, progress=False)
    assert "attn" not in summary


def test_received_matches_transformerlens_patterns():
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    model, processor = tiny.build("llava", attn_implementation="eager")
    example = tiny.sample_prompts("llava")[0]
    batch = encode(processor, as_examples([example]))
    bridge = build_bridge_from_module(model, "LlavaForConditionalGeneration", hf_config=model.config)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(batch["input_ids"], pixel_values=batch["pixel_values"])
    trace = record(tiny.build("llava", attn_implementation="sdpa")[0], [example], processor=processor,
                   progress=False)
    T = batch["input_ids"].shape[1]
    for layer in range(trace.sizes["layer"]):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].double().numpy()
        recv = pattern.sum(1) / np.arange(T, 0, -1)
        np.testing.assert_allclose(trace.received.values[0, layer, :, :T], recv, atol=TOL)


def test_answer_tokens_are_labelled_and_last_row_stays_at_the_prompt():
    model, processor = tiny.build("llava")
    examples = [dict(ex, answer="red square") for ex in tiny.sample_prompts("llava")]
    plain = record(model, examples, processor=processor, progress=False)
    teacher = record(model, examples, processor=processor, with_answer=True, progress=False)
    for i in range(len(examples)):
        mods = teacher.modality.values[i][: int(teacher.length[i])].tolist()
        assert mods[-2:] == ["answer", "answer"] and "answer" not in mods[:-2]
    # causal: the last prompt position attends exactly as it did without the answer appended
    for i in range(len(examples)):
        n = int(plain.length[i])
        np.testing.assert_allclose(teacher.last_row.values[i, ..., :n], plain.last_row.values[i, ..., :n], atol=TOL)
        assert (teacher.last_row.values[i, ..., n:int(teacher.length[i])] == 0).all()  # the answer is unseen
    np.testing.assert_allclose(teacher.resid_last.values, plain.resid_last.values, atol=1e-5)


def test_batched_arank_equals_the_rank_of_each_real_sized_map():
    from attnflow.probes.stats import Layout, _arank

    torch.manual_seed(0)
    B, H, T = 3, 2, 12
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :4] = valid[2, :7] = False  # left padding of different lengths
    a = torch.rand(B, H, T, T).tril() * valid[:, None, :, None] * valid[:, None, None, :]
    a[0, 1, 9, :9] = a[0, 1, 10, :9] = 0.5  # rows equal once the diagonal is zeroed: rank drops
    a[0, 1, 9, 9:] = a[0, 1, 10, 9:] = 0.0
    layout = Layout(valid, torch.zeros(B, T, dtype=torch.long), torch.full((B,), T - 1), 5, True)
    got = _arank(a, layout)
    for b in range(B):
        idx = valid[b].nonzero().flatten()
        sub = a[b][:, idx][:, :, idx].clone()
        sub.diagonal(dim1=-2, dim2=-1).zero_()
        assert got[b].tolist() == torch.linalg.matrix_rank(sub.double()).float().tolist()


@pytest.mark.parametrize("family", ["bert", "llama", "llava"])
def test_the_first_token_is_bos_when_the_family_says_so(family):
    """Encoders start with CLS, which plays BOS's part; decoders start with their config's BOS."""
    model, processor = tiny.build(family)
    trace = record(model, tiny.sample_prompts(family), processor=processor, progress=False)
    assert (trace.modality.values[:, 0] == "bos").all()
    first = trace.token_id.values[:, 0]
    tok = getattr(processor, "tokenizer", processor)
    want = tok.cls_token_id if family == "bert" else model.config.get_text_config().bos_token_id
    assert (first == want).all()
