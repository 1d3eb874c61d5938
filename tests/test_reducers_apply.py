"""Reducers held to their oracles on a tiny LLaVA, under eager and SDPA:

- a schedule that removes nothing reproduces the model exactly;
- drop == mask: for every op, the kept tokens' logits equal those of the unreduced model
  (eager, explicit 4-D masks) with attention to the removed tokens masked from the same layer
  on and bypassing tokens' residual restored;
- the prune ranking equals the eager attention row of the last position at layer K-1;
- generate with the KV cache equals a loop that recomputes the whole prefix every step;
- a padded batch (one sample with two images) equals its samples run one at a time.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnflow import compat
from attnflow.probes import adapters
from attnflow.reducers import Schedule, ScheduleError, apply
from attnflow.toys import tiny

BACKENDS = ("eager", "sdpa")
STEPS = {
    "prune": [{"op": "prune_visual", "layer": 1, "keep": 0.5}],
    "pdrop": [{"op": "prune_visual", "layer": 1, "keep": 0.5}, {"op": "prune_visual", "layer": 2, "keep": 0.25}],
    "exit": [{"op": "visual_exit", "layer": 2}],
    "skip_visual": [{"op": "skip_layers", "layers": [1], "tokens": "visual"}],
    "skip_all": [{"op": "skip_layers", "layers": [1], "tokens": "all"}],
    "mixed": [{"op": "prune_visual", "layer": 1, "keep": 0.5}, {"op": "skip_layers", "layers": [2], "tokens": "visual"}],
    "random": [{"op": "prune_visual", "layer": 1, "keep": 0.5, "by": "random", "seed": 3}],
    "pool": [{"op": "prune_visual", "layer": 1, "keep": 0.4, "by": "pool"}],
    "divprune": [{"op": "prune_visual", "layer": 1, "keep": 0.3, "by": "divprune"}],
    "dart": [{"op": "prune_visual", "layer": 2, "keep": 0.4, "by": "dart"}],
    "text": [{"op": "prune_visual", "layer": 1, "keep": 0.5, "by": "text"},  # SparseVLM, two stages
             {"op": "prune_visual", "layer": 2, "keep": 0.3, "by": "text"}],
    "input_divprune": [{"op": "prune_visual", "layer": 0, "keep": 0.5, "by": "divprune"}],  # before the LLM
    "input_cls": [{"op": "prune_visual", "layer": 0, "keep": 0.4, "by": "cls"}],  # VisionZip's dominant tokens
    "input_visionzip": [{"op": "prune_visual", "layer": 0, "keep": 0.6, "by": "cls", "merge": True}],  # + contextual
    "recycle": [{"op": "prune_visual", "layer": 1, "keep": 0.3, "by": "text", "recycle": True}],  # SparseVLM's
    "input_recycle": [{"op": "prune_visual", "layer": 0, "keep": 0.3, "by": "random", "seed": 1, "recycle": True}],
    "input_then_prune": [{"op": "prune_visual", "layer": 0, "keep": 0.6, "by": "pool"},
                         {"op": "prune_visual", "layer": 2, "keep": 0.3}],
    "input_proportional": [{"op": "prune_visual", "layer": 0, "keep": 0.4, "by": "divprune", "proportional": True}],
    "proportional_then_prune": [{"op": "prune_visual", "layer": 0, "keep": 0.6, "by": "random", "seed": 2,
                                 "recycle": True, "proportional": True}, {"op": "prune_visual", "layer": 2, "keep": 0.3}],
}
FIELD = ["random", "pool", "divprune", "dart", "text", "recycle", "input_divprune", "input_cls", "input_visionzip",
         "input_recycle", "input_then_prune", "input_proportional", "proportional_then_prune"]  # beside FastV's last row
MERGING = {"input_visionzip", "recycle", "input_recycle"}  # rewrite states: held to their own oracles, not to plain masking
WEIGHING = {"input_proportional", "proportional_then_prune"}  # bias attention: held to masking with the size bias


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {b: tiny.build("llava", attn_implementation=b) for b in BACKENDS}


def prompts():
    """The toy's prompts plus a long one, so that the two-image prompt is padded and, once
    visual tokens leave, must carry some of its dropped tokens as filler."""
    base = tiny.sample_prompts("llava")
    words = "the cat is on the left of the house and the dog is on the right ."
    return base + [{"prompt": f"<image> {words} {words} {words} what color is it ?", "images": base[0]["images"]}]


def encode(processor, prompts):
    return processor(text=[p["prompt"] for p in prompts], images=[p["images"] for p in prompts],
                     padding=True, return_tensors="pt")


def positions(batch):
    """The position ids generate uses for a left-padded batch."""
    am = batch["attention_mask"]
    return (am.cumsum(-1) - 1).masked_fill(am == 0, 0)


def masked_run(model, batch, planner, bias=None, **call):
    """Unreduced run in which layer l's keys are only the tokens the reduced run processed at
    l, and every other token's residual passes layer l unchanged (the masking oracle); ``bias``
    [B, N] (additive masks only) is added to every layer's attention logits of each key."""
    b, n = batch["input_ids"].shape
    processed = {layer: torch.zeros(b, n, dtype=torch.bool).scatter(1, planner.original(rows), real)
                 for layer, (rows, real) in planner.layer_tokens.items()}
    handles = []
    for i, layer in enumerate(adapters.decoder_layers(model)):
        def pre(module, args, kwargs, i=i):
            m, keys = kwargs["attention_mask"], processed[i][:, None, None, :]
            m = m & keys if m.dtype == torch.bool else m.masked_fill(~keys, torch.finfo(m.dtype).min)
            if bias is not None:
                m = m + bias[:, None, None, :]
            return args, dict(kwargs, attention_mask=m)

        def post(module, args, output, i=i):
            return torch.where(processed[i][..., None], output, args[0])
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    try:
        with torch.no_grad():
            return model(**batch, **call)
    finally:
        for h in handles:
            h.remove()


def masked_oracle(model, batch, planner, bias=None):
    """The masking oracle under eager attention, with generate's position ids and the weights."""
    return masked_run(model, batch, planner, bias, position_ids=positions(batch), output_attentions=True)


def reduced(model, steps, batch, **kw):
    schedule = Schedule.for_model(model, steps)
    with torch.no_grad(), apply(model, schedule, **kw) as planner:
        logits = model(**batch, position_ids=positions(batch)).logits
    return logits, planner


KEEP_ALL = {  # every score, merging and recycling, at keep 1.0 (layer 0: before the LLM)
    "last_row": {"layer": 1}, "random": {"layer": 1, "by": "random"}, "pool": {"layer": 1, "by": "pool"},
    "divprune": {"layer": 1, "by": "divprune"}, "dart": {"layer": 2, "by": "dart"}, "text": {"layer": 1, "by": "text"},
    "recycle": {"layer": 1, "by": "text", "recycle": True}, "input_divprune": {"layer": 0, "by": "divprune"},
    "input_random": {"layer": 0, "by": "random"}, "input_pool": {"layer": 0, "by": "pool"},
    "input_cls": {"layer": 0, "by": "cls"}, "input_visionzip": {"layer": 0, "by": "cls", "merge": True},
    "input_recycle": {"layer": 0, "by": "divprune", "recycle": True},
    "input_proportional": {"layer": 0, "by": "divprune", "proportional": True},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(KEEP_ALL))
def test_keeping_every_token_reproduces_the_model(models, backend, op):
    """A prune step that keeps every token, whatever its score (and merging or recycling nothing),
    reproduces the unreduced logits and greedy generation."""
    model, processor = models[backend]
    batch = encode(processor, prompts())
    steps = [{"op": "prune_visual", "keep": 1.0, **KEEP_ALL[op]}]
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        full = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with apply(model, Schedule.for_model(model, steps)):
            same = model(**batch).logits
            same_gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(same[real], full[real], atol=1e-6, rtol=1e-6)
    assert torch.equal(gen, same_gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_schedule_reproduces_logits_and_generation(models, backend):
    model, processor = models[backend]
    batch = encode(processor, prompts())
    with torch.no_grad():
        full = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with apply(model, Schedule.for_model(model, [])):
            same = model(**batch).logits
            same_gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(full, same)
    assert torch.equal(gen, same_gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(set(STEPS) - MERGING - WEIGHING))
def test_drop_equals_mask(models, backend, op):
    model, processor = models[backend]
    batch = encode(processor, prompts())
    logits, planner = reduced(model, STEPS[op], batch)
    oracle = masked_oracle(models["eager"][0], batch, planner).logits
    want = oracle.gather(1, planner.original(planner.positions)[..., None].expand(-1, -1, oracle.shape[-1]))
    real = planner.real
    assert logits.shape[1] <= batch["input_ids"].shape[1]
    if op not in ("skip_visual", "skip_all"):
        assert logits.shape[1] < batch["input_ids"].shape[1]  # really shorter, not masked
    torch.testing.assert_close(logits[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_keeps_the_top_of_the_last_row(models, backend):
    model, processor = models[backend]
    batch = encode(processor, prompts())
    steps = STEPS["pdrop"]
    _, planner = reduced(model, steps, batch)
    oracle = masked_oracle(models["eager"][0], batch, planner)
    visual = batch["input_ids"] == adapters.image_token_id(model)
    for step in steps:
        k, keep = step["layer"], step["keep"]
        row = oracle.attentions[k - 1][:, :, -1, :].mean(1)  # [B, N] head mean of the last row
        rows, real = planner.layer_tokens[k - 1]
        torch.testing.assert_close(planner.scores[k][real], row.gather(1, rows)[real], atol=1e-5, rtol=1e-5)
        kept_rows, kept_real = planner.layer_tokens[k]
        for b in range(visual.shape[0]):
            alive = rows[b][real[b] & visual[b, rows[b]]]
            n_keep = int(keep * int(visual[b].sum()) + 0.5)
            top = alive[row[b, alive].argsort(descending=True, stable=True)[:n_keep]]
            kept = kept_rows[b][kept_real[b] & visual[b, kept_rows[b]]]
            assert sorted(kept.tolist()) == sorted(top.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_scores_are_the_raters_attention(models, backend):
    """SparseVLM: raters by hand from the input embeddings (each visual token's softmax over the
    text tokens, averaged; those above the mean), scores = their mean eager attention rows."""
    model, processor = models[backend]
    batch = encode(processor, prompts())
    steps = STEPS["text"]
    _, planner = reduced(model, steps, batch)
    oracle = masked_run(models["eager"][0], batch, planner, position_ids=positions(batch), output_attentions=True,
                        output_hidden_states=True)
    embeds = oracle.hidden_states[0]
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    visual = (ids == adapters.image_token_id(model)) & am
    text = am & planner.text  # the prompts' text tokens (no answer follows them here)
    partial = 0
    for b in range(ids.shape[0]):
        v, t = visual[b].nonzero().flatten(), text[b].nonzero().flatten()
        relevance = torch.stack([(embeds[b, i] @ embeds[b, t].T).softmax(-1) for i in v]).mean(0)
        chosen = t[relevance > relevance.mean()]
        partial += 0 < len(chosen) < len(t)
        assert sorted(planner.raters[b].nonzero().flatten().tolist()) == sorted(chosen.tolist())
        for step in steps:
            k = step["layer"]
            rows, real = planner.layer_tokens[k - 1]
            heads = oracle.attentions[k - 1][b].mean(0)  # [N, N]
            want = heads[chosen].mean(0)  # over the raters, at every key
            ok = real[b] & visual[b, rows[b]] & torch.isfinite(planner.scores[k][b])
            assert ok.any()
            torch.testing.assert_close(planner.scores[k][b][ok], want[rows[b][ok]], atol=1e-5, rtol=1e-5)
    assert partial  # some prompt rates by a strict subset of its text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["pdrop", "exit", "skip_all", "mixed", *FIELD])
def test_generate_with_cache_equals_recomputing_the_prefix(models, backend, op):
    model, processor = models[backend]
    batch = encode(processor, prompts())
    schedule = Schedule.for_model(model, STEPS[op])
    steps, n = 5, batch["input_ids"].shape[1]
    with torch.no_grad():
        with apply(model, schedule):
            out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None)
        ids, am = batch["input_ids"], batch["attention_mask"]
        for step in range(steps):
            cur = dict(batch, input_ids=ids, attention_mask=am)
            with apply(model, schedule, prompt_length=n):
                last = model(**cur, position_ids=positions(cur), use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], last, atol=1e-5, rtol=1e-5)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
    assert torch.equal(out.sequences, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["pdrop", "exit", "mixed", "skip_all", *FIELD])
def test_padded_batch_equals_one_sample_at_a_time(models, backend, op):
    model, processor = models[backend]
    schedule = Schedule.for_model(model, STEPS[op])
    batch = encode(processor, prompts())
    assert not bool(batch["attention_mask"].all())  # really padded
    logits, planner = reduced(model, STEPS[op], batch)
    with torch.no_grad(), apply(model, schedule):
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    for b, prompt in enumerate(prompts()):
        one = encode(processor, [prompt])
        alone, alone_planner = reduced(model, STEPS[op], one)
        torch.testing.assert_close(logits[b, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
        offset = batch["input_ids"].shape[1] - one["input_ids"].shape[1]
        kept = planner.original(planner.positions)[b][planner.real[b]] - offset
        assert kept.tolist() == alone_planner.original(alone_planner.positions)[0][alone_planner.real[0]].tolist()
        torch.testing.assert_close(logits[b][planner.real[b]], alone[0][alone_planner.real[0]], atol=1e-5, rtol=1e-5)
        with torch.no_grad(), apply(model, schedule):
            gen_one = model.generate(**one, max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert gen[b, -4:].tolist() == gen_one[0, -4:].tolist()


def test_random_is_reproducible_by_seed_and_field_scores_keep_what_they_claim(models):
    model, processor = models["sdpa"]
    batch = encode(processor, prompts())

    def kept(step):
        return reduced(model, [step], batch)[1].positions.tolist()

    step = {"op": "prune_visual", "layer": 1, "keep": 0.5, "by": "random"}
    assert kept({**step, "seed": 5}) == kept({**step, "seed": 5}) != kept({**step, "seed": 6})
    # pool keeps spread cells: with 4 of a 4x4 grid, the corners
    from attnflow.reducers.scores import pool_scores
    cells = torch.arange(16)
    scores = pool_scores((cells // 4)[None], (cells % 4)[None], torch.ones(1, 16, dtype=torch.bool), 4)
    assert sorted(scores.topk(4).indices[0].tolist()) == [0, 3, 12, 15]
    # DivPrune keeps one of two duplicates before any second copy: 3 distinct directions, 2 copies each
    from attnflow.reducers.scores import divprune_scores
    states = torch.eye(3).repeat_interleave(2, 0)[None]
    top = divprune_scores(states, torch.ones(1, 6, dtype=torch.bool), 3).topk(3).indices[0]
    assert sorted((top // 2).tolist()) == [0, 1, 2]


def test_cls_keeps_the_patches_the_towers_cls_attends_most(models):
    """by='cls' keeps, per sample, the visual tokens with the largest head-summed [CLS] attention of
    the vision tower's feature layer, as CLIP's own eager output_attentions give it."""
    from attnflow.reducers.plan import kept_count

    model, processor = models["eager"]
    batch = encode(processor, prompts())
    _, planner = reduced(model, STEPS["input_cls"], batch)
    with torch.no_grad():
        attentions = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    cls = attentions[model.config.vision_feature_layer][:, :, 0, 1:].sum(1)  # [images, patches]
    visual = batch["input_ids"] == model.config.image_token_id
    scores = torch.full(visual.shape, float("-inf")).masked_scatter(visual, cls.flatten())
    kept = planner.original(planner.positions)
    for b in range(visual.shape[0]):
        n = kept_count(0.4, visual[b].sum()).item()
        want = set(scores[b].topk(n).indices.tolist())
        got = {p for p in kept[b][planner.real[b]].tolist() if visual[b, p]}
        assert got == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_contextual_ones(models, backend):
    """VisionZip (keep 60%): per sample, the top tokens by the tower's [CLS] attention (from CLIP's
    own eager output_attentions) and ``round(kept · 10/64)`` targets at a uniform stride over the rest;
    each target's LLM input state becomes its own plus the mean of the other leftover tokens of its
    image whose head-mean unit key (the tower layer's k_proj, hooked here) is most like its key.
    The reduced logits equal the masking oracle fed those input states."""
    from attnflow.reducers.plan import kept_count
    from attnflow.reducers.inputcut import language_model

    model, processor = models[backend]
    eager = models["eager"][0]
    batch = encode(processor, prompts())
    logits, planner = reduced(model, STEPS["input_visionzip"], batch)
    tower = eager.model.vision_tower
    layer = eager.config.vision_feature_layer
    attn = tower.encoder.layers[layer].self_attn
    got_k, states = {}, {}

    def keep_embeds(module, args, kwargs):
        states.setdefault("e", kwargs["inputs_embeds"].clone())

    hooks = [attn.k_proj.register_forward_hook(lambda m, a, out: got_k.setdefault("k", out)),
             language_model(eager).register_forward_pre_hook(keep_embeds, with_kwargs=True)]
    with torch.no_grad():
        cls = tower(batch["pixel_values"], output_attentions=True).attentions[layer][:, :, 0, 1:].sum(1)
        eager(**batch)
    for h in hooks:
        h.remove()
    images, tokens, width = got_k["k"].shape
    keys = got_k["k"].view(images, tokens, attn.num_heads, -1).mean(2)[:, 1:]
    keys = keys / keys.norm(dim=-1, keepdim=True)
    visual = batch["input_ids"] == eager.config.image_token_id
    cls_at = torch.zeros(visual.shape).masked_scatter(visual, cls.flatten())
    key_at = torch.zeros(*visual.shape, keys.shape[-1]).masked_scatter(visual[..., None], keys.flatten(0, 1))
    image_at = torch.full(visual.shape, -1).masked_scatter(visual, torch.arange(images).repeat_interleave(tokens - 1))
    want = states["e"].clone()
    kept = planner.original(planner.positions)
    for b in range(visual.shape[0]):
        slots = visual[b].nonzero()[:, 0]
        total = int(kept_count(0.6, torch.tensor(len(slots))))
        contextual = int(total * 10 / 64 + 0.5)
        assert contextual >= 2  # the two-image prompt: targets in both images
        order = slots[cls_at[b, slots].argsort(descending=True, stable=True)]
        rest = order[total - contextual:].sort().values
        targets = rest[::len(rest) // contextual][:contextual]
        assert {p for p in kept[b][planner.real[b]].tolist() if visual[b, p]} == set(order[:total - contextual].tolist()) | set(targets.tolist())
        assigned = {t: [] for t in targets.tolist()}
        for o in set(rest.tolist()) - set(assigned):
            same = [t for t in assigned if image_at[b, t] == image_at[b, o]]
            if same:
                assigned[max(same, key=lambda t: float(key_at[b, t] @ key_at[b, o]))].append(o)
        for t, mine in assigned.items():
            if mine:
                want[b, t] = states["e"][b, t] + states["e"][b, mine].mean(0)

    assert_equals_oracle_fed(eager, batch, planner, logits, 0, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(WEIGHING))
def test_proportional_attention_equals_masking_with_the_log_size_bias(models, backend, op):
    """ToMe's proportional attention before the LLM: each kept visual token stands for itself and the
    dropped visual tokens whose nearest kept one it is (cosine of the LLM's input embeddings, ties to
    the earlier; written out with loops here), and the reduced logits equal the masking oracle with
    log(size) added to that token's key in every layer (a later prune step carries the bias along).
    Without the bias the oracle differs: the test sees it."""
    model, processor = models[backend]
    eager = models["eager"][0]
    batch = encode(processor, prompts())
    logits, planner = reduced(model, STEPS[op], batch)
    with torch.no_grad():
        states = eager(**batch, position_ids=positions(batch), output_hidden_states=True).hidden_states[0]
    visual = (batch["input_ids"] == adapters.image_token_id(model)) & batch["attention_mask"].bool()
    rows, real = planner.layer_tokens[0]
    kept = torch.zeros_like(visual).scatter(1, planner.original(rows), real) & visual
    size = torch.ones(visual.shape)
    for b in range(visual.shape[0]):
        targets = kept[b].nonzero()[:, 0].tolist()
        for p in (visual[b] & ~kept[b]).nonzero()[:, 0].tolist():
            sims = [float(torch.nn.functional.cosine_similarity(states[b, p], states[b, q], dim=0)) for q in targets]
            size[b, targets[sims.index(max(sims))]] += 1
    assert size.max() > 2  # some kept token stands for several
    if op == "proportional_then_prune":  # recycled centres hold their clusters' mean: feed the oracle those states
        fed = []
        handle = adapters.decoder_layers(model)[0].register_forward_pre_hook(
            lambda m, a, kw: fed.append(a[0] if a else kw[compat.HIDDEN_STATES]), with_kwargs=True)
        try:
            reduced(model, STEPS[op], batch)
        finally:
            handle.remove()
        index = planner.original(rows)[..., None].expand(-1, -1, states.shape[-1])
        states = states.scatter(1, index, fed[0])
    assert_equals_oracle_fed(eager, batch, planner, logits, 0, states, bias=size.log())
    with pytest.raises(AssertionError):
        assert_equals_oracle_fed(eager, batch, planner, logits, 0, states)


def assert_equals_oracle_fed(eager, batch, planner, logits, layer, states, bias=None):
    """The reduced ``logits`` equal the masking oracle whose input to decoder layer ``layer`` (0: the
    language model's input embeddings) is replaced by ``states`` (with ``bias``, masked_run's)."""
    from attnflow.reducers.inputcut import language_model

    def fed(module, args, kwargs):
        if layer == 0:
            return args, dict(kwargs, inputs_embeds=states)
        return (states, *args[1:]), kwargs

    target = language_model(eager) if layer == 0 else adapters.decoder_layers(eager)[layer]
    handle = target.register_forward_pre_hook(fed, with_kwargs=True)
    try:
        oracle = masked_oracle(eager, batch, planner, bias).logits
    finally:
        handle.remove()
    kept = planner.original(planner.positions)
    oracle = oracle.gather(1, kept[..., None].expand(-1, -1, oracle.shape[-1]))
    torch.testing.assert_close(logits[planner.real], oracle[planner.real], atol=1e-5, rtol=1e-5)


def _density_peaks_by_hand(x: torch.Tensor, clusters: int) -> tuple[list[int], list[int]]:
    """DPC-kNN written out with loops: density from the ``clusters`` nearest rows (itself included),
    separation to the nearest denser row (ties: the earlier row is denser), centres by the product."""
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / d ** 0.5 for j in range(n)] for i in range(n)]
    k = min(clusters, n)
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in dist]
    top = max(max(row) for row in dist)
    separation = [min([dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)],
                      default=top) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -separation[i] * density[i])[:k]
    assign = [centres.index(i) if i in centres else min(range(k), key=lambda c: dist[i][centres[c]]) for i in range(n)]
    return centres, assign


def test_density_peaks_and_recycling_counts_by_hand():
    """Three tight blobs: the three centres are one per blob and every point joins its own blob's;
    the recycling counts are the smallest consistent ones (SparseVLM's 300-of-576 stage by hand)."""
    from attnflow.reducers.scores import density_peaks, recycle_counts

    g = torch.Generator().manual_seed(0)
    blobs = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (blobs.repeat_interleave(5, 0) + 0.3 * torch.randn(15, 2, generator=g))[torch.randperm(15, generator=g)]
    blob = ((x[:, None] - blobs[None]).norm(dim=-1)).argmin(1)
    centres, assign = (t[0] for t in density_peaks(x[None], torch.ones(1, 15, dtype=torch.bool), torch.tensor([3])))
    assert sorted(blob[centres].tolist()) == [0, 1, 2]
    assert torch.equal(blob[centres][assign], blob)
    want = _density_peaks_by_hand(x, 3)
    assert (centres.tolist(), assign.tolist()) == want
    # a padded batch: each sample's rows (its first n; the rest are filler) clustered alone, by hand
    sizes, counts = [15, 9, 4, 1], [3, 2, 4, 1]
    rows = torch.randn(4, 15, 6, generator=g)
    rows[0] = torch.nn.functional.pad(x, (0, 4))
    valid = torch.arange(15) < torch.tensor(sizes)[:, None]
    centres, assign = density_peaks(rows, valid, torch.tensor(counts))
    for b, (n, k) in enumerate(zip(sizes, counts)):
        want_centres, want_assign = _density_peaks_by_hand(rows[b, :n], k)
        assert centres[b, :min(k, n)].tolist() == want_centres and assign[b, :n].tolist() == want_assign
    # 576 candidates, keep 300: 9 clusters -> 291 selected, 285 deleted, int(0.3 * 285) + 1 = 86 pooled, 86 // 10 + 1 = 9
    assert recycle_counts(576, 300) == (291, 86, 9)
    assert recycle_counts(100, 100) == (100, 0, 0)  # nothing deleted, nothing recycled
    assert recycle_counts(100, 0) == (0, 0, 0)


def test_recycling_ranks_only_as_deep_as_it_reads():
    """The greedy order is ranked to the selected tokens and the pool after them (291 + 86 of 576 at
    keep 300), and recycling then keeps and merges exactly what a full ranking would give it."""
    from attnflow.reducers.scores import divprune_scores, rank_depth, recycle, recycle_counts

    g = torch.Generator().manual_seed(1)
    states = torch.randn(2, 60, 8, generator=g)
    candidates = torch.ones(2, 60, dtype=torch.bool)
    candidates[1, 50:] = False  # the second sample has 50 candidates
    n_keep = torch.tensor([20, 11])
    depth = rank_depth(candidates.sum(1), n_keep, True)
    assert depth.tolist() == [sum(recycle_counts(60, 20)[:2]), sum(recycle_counts(50, 11)[:2])]
    assert rank_depth(torch.tensor([576]), torch.tensor([300]), True).tolist() == [291 + 86]
    shallow = recycle(divprune_scores(states, candidates, int(depth.max())), candidates, n_keep, states)
    full = recycle(divprune_scores(states, candidates, 60), candidates, n_keep, states)
    assert torch.equal(shallow[0], full[0]) and torch.equal(shallow[1], full[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["recycle", "input_recycle"])
def test_recycling_keeps_cluster_centres_holding_their_clusters_mean(models, backend, op):
    """SparseVLM's recycling (keep 30%): per sample the top candidates by the step's score, and of the
    ones it deletes the 30% best (plus one) clustered by density peaks (written out here with loops)
    on the states entering the step's layer (an unreduced eager run's); each centre is kept with its
    cluster's mean state. The kept tokens equal that by hand, and the reduced logits equal the masking
    oracle fed those states."""
    from attnflow.reducers.plan import kept_count
    from attnflow.reducers.scores import random_scores

    model, processor = models[backend]
    eager = models["eager"][0]
    step = STEPS[op][0]
    k = step["layer"]
    batch = encode(processor, prompts())
    logits, planner = reduced(model, STEPS[op], batch)
    with torch.no_grad():
        states = eager(**batch, position_ids=positions(batch), output_hidden_states=True).hidden_states[k]
    visual = batch["input_ids"] == adapters.image_token_id(model)
    index = torch.where(visual, visual.long().cumsum(1) - 1, -1)
    if k == 0:
        scores = random_scores(index, visual, step["seed"])
    else:
        rows, _ = planner.layer_tokens[k - 1]
        scores = torch.full(visual.shape, float("-inf")).scatter(1, rows, planner.scores[k])
    want = states.clone()
    kept = planner.original(planner.positions)
    recycled = 0
    for b in range(visual.shape[0]):
        slots = visual[b].nonzero()[:, 0]
        n_keep = int(kept_count(0.3, torch.tensor(len(slots))))
        order = slots[scores[b, slots].argsort(descending=True, stable=True)]
        counts = []
        for clusters in range(n_keep + 1):  # the smallest consistent count, by search
            deleted = len(slots) - (n_keep - clusters)
            pooled = int(0.3 * deleted) + 1
            if clusters == pooled // 10 + 1:
                counts = [n_keep - clusters, pooled, clusters]
                break
        selected, pooled, clusters = counts
        pool = order[selected:selected + pooled]
        centres, assign = _density_peaks_by_hand(states[b, pool].float(), clusters)
        for c, centre in enumerate(centres):
            want[b, pool[centre]] = states[b, pool[[i for i, a in enumerate(assign) if a == c]]].mean(0)
        recycled += len(centres)
        got = {p for p in kept[b][planner.real[b]].tolist() if visual[b, p]}
        assert got == set(order[:selected].tolist()) | set(pool[centres].tolist())
    assert recycled >= visual.shape[0]

    assert_equals_oracle_fed(eager, batch, planner, logits, k, want)


def test_hooks_are_removed_on_exit_and_on_error(models):
    model, processor = models["sdpa"]
    batch = encode(processor, tiny.sample_prompts("llava")[:1])
    layers = adapters.decoder_layers(model)
    with torch.no_grad():
        full = model(**batch).logits
        with pytest.raises(RuntimeError, match="boom"):
            with apply(model, Schedule.for_model(model, STEPS["pdrop"])):
                assert model(**batch).logits.shape[1] < full.shape[1]
                raise RuntimeError("boom")
        assert torch.equal(model(**batch).logits, full)
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("op", ["pdrop", "input_divprune", "skip_all"])
def test_decode_steps_that_change_nothing_run_without_layer_hooks(models, op):
    """After a first decode step in which every hooked layer ran unmasked and uncut, the layer hooks
    leave until the next prefill; a padded batch (masked) or a skipped layer keeps them; the rankers'
    hooks (inside the layers) are there in prefills only; two generations in one block equal two in
    separate blocks."""
    model, processor = models["sdpa"]
    layers = adapters.decoder_layers(model)
    one, padded = encode(processor, tiny.sample_prompts("llava")[:1]), encode(processor, prompts())
    schedule = Schedule.for_model(model, STEPS[op])
    hooked, ranking = [], []

    def count(module, args, kwargs):
        hooked.append(any(layer._forward_pre_hooks for layer in layers))
        ranking.append(any(m._forward_hooks for layer in layers for m in layer.modules() if m is not layer))

    gen = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        with apply(model, schedule):
            apart = [model.generate(**b, **gen) for b in (one,)]
        with apply(model, schedule):
            apart.append(model.generate(**padded, **gen))
        with apply(model, schedule):
            handle = model.register_forward_pre_hook(count, with_kwargs=True)  # runs after apply's own
            try:
                together = [model.generate(**b, **gen) for b in (one, padded, one)]
            finally:
                handle.remove()
    assert torch.equal(together[0], apart[0]) and torch.equal(together[2], apart[0])
    assert torch.equal(together[1], apart[1])
    steps = len(hooked) // 3  # a prefill and 4 decode steps per generation: whether the layers were hooked
    first, second, third = hooked[:steps], hooked[steps:2 * steps], hooked[2 * steps:]
    assert ranking == ([True] + [False] * 4) * 3 if op == "pdrop" else not any(ranking)
    if op == "input_divprune":  # cut before the first layer: no layer needs a hook at all
        assert hooked == [False] * 15
        return
    unchanged = op != "skip_all"  # a skipped layer's decode step still bypasses it
    assert steps == 5 and first == third == [True, True] + [not unchanged] * 3
    assert second == [True] * 5  # the prefill re-attaches them; the padded batch is masked


def test_misuse_gets_a_clear_error(models):
    model, processor = models["sdpa"]
    batch = encode(processor, prompts()[:1])
    schedule = Schedule.for_model(model, STEPS["exit"])
    with torch.no_grad():
        cache = compat.output_cache(model(**batch, use_cache=True))  # a prefill outside the schedule
        nxt = {"input_ids": batch["input_ids"][:, -1:], **compat.cache_kwargs(cache),
               "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + 1, dtype=torch.long)}
        with apply(model, schedule), pytest.raises(ScheduleError, match="without a prefill"):
            model(**nxt)
        embeds = model.get_input_embeddings()(batch["input_ids"])
        with apply(model, schedule), pytest.raises(ScheduleError, match="needs input_ids"):
            model(inputs_embeds=embeds)
        with pytest.raises(ScheduleError, match="prompt_length 999"):
            with apply(model, schedule, prompt_length=999):
                model(**batch)


def test_farthest_point_order_against_a_plain_reference():
    """DivPrune's and pooling's greedy max-min order (arXiv 2503.02175) against loops over lists: first
    the candidate farthest from its nearest other candidate, then the one farthest from all chosen,
    ties to the earlier slot; the first ``limit`` chosen, then every other slot in slot order. Random
    points with duplicates (exact ties), uneven candidates, a lone candidate and none."""
    from attnflow.reducers.scores import farthest_point

    def reference(dist, cand, limit):
        slots = [s for s in range(len(cand)) if cand[s]]
        if len(slots) == 1:
            score = {slots[0]: 0.0}
        else:
            score = {s: min(dist[s][t] for t in slots if t != s) for s in slots}
        chosen = []
        while len(chosen) < min(limit, len(slots)):
            pick = max((s for s in slots if s not in chosen), key=lambda s: (score[s], -s))
            chosen.append(pick)
            score = {s: min(dist[c][s] for c in chosen) for s in slots}
        return chosen + [s for s in range(len(cand)) if s not in chosen]

    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        b, r = 4, 30
        points = torch.randn(b, r, 3, generator=gen)
        points[:, 12:16] = points[:, 4:8]  # duplicates: exact ties
        cand = torch.rand(b, r, generator=gen) < 0.7
        cand[2] = False
        cand[2, 9] = True  # a lone candidate
        cand[3] = False  # none
        limit = [3, 10, 30][trial % 3]
        dist = torch.cdist(points, points)
        got = farthest_point(dist, cand, limit)
        for i in range(b):
            assert got[i].tolist() == reference(dist[i].tolist(), cand[i].tolist(), limit)


def test_dart_keeps_what_its_pivots_find_least_duplicated():
    """DART (arXiv 2502.11494) against a plain reference: pivots are the candidates (and text tokens)
    with the largest key L1 norm; round robin over the pivots, each keeps the remaining candidate
    least cosine-similar to it (ties: the earlier slot), until n_keep are kept; the scores rank the
    kept first, in pick order. Random keys with duplicated rows (exact ties) and padded candidates."""
    from attnflow.reducers.scores import DART_PIVOTS, dart_scores

    def reference(keys, cand, text, want):
        norm, unit = keys.abs().sum(-1), torch.nn.functional.normalize(keys, dim=-1)
        vis = norm.masked_fill(~cand, -1).topk(min(DART_PIVOTS[0], int(cand.sum()))).indices.tolist()
        txt = norm.masked_fill(~text, -1).topk(min(DART_PIVOTS[1], int(text.sum()))).indices.tolist()
        picks = list(vis)
        while len(picks) < min(want, int(cand.sum())):
            for a in vis + txt:
                left = [s for s in range(len(cand)) if cand[s] and s not in picks]
                if len(picks) >= want or not left:
                    break
                sim = [float(unit[a] @ unit[s]) for s in left]
                picks.append(left[sim.index(min(sim))])
        return picks

    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        b, r = 3, 40
        keys = torch.randn(b, r, 8, generator=gen)
        keys[:, 20:24] = keys[:, 10:14]  # duplicated keys: exact ties
        cand = torch.zeros(b, r, dtype=torch.bool)
        cand[:, 5:35] = True
        cand[1, 30:] = False  # fewer candidates in one sample
        text = torch.zeros(b, r, dtype=torch.bool)
        text[:, 35:] = True
        n_keep = torch.tensor([3, 12, 29 if trial % 2 else 30])
        scores = dart_scores(keys, cand, text, n_keep)
        for i in range(b):
            want = reference(keys[i], cand[i], text[i], int(n_keep[i]))
            got = scores[i].masked_fill(~cand[i], float("-inf")).argsort(descending=True, stable=True)[:len(want)]
            assert got.tolist() == want
