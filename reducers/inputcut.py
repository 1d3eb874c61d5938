"""Prune steps at layer 0: visual tokens dropped before the first decoder layer.

DivPrune (arXiv 2503.02175), VisionZip's [CLS] attention (arXiv 2412.04467), spatial pooling and
random selection choose among the visual tokens at the LLM's input, so the KV cache never holds the
others. A forward pre-hook on the language
model (the module holding the decoder layers) replaces its inputs: the input embeddings gathered
to the kept positions (per sample; a sample that keeps fewer carries filler that nobody attends,
as padding), the position ids gathered (original positions, also Qwen2-VL's M-RoPE rows), and a
4-D mask built here from the kept layout, which transformers passes on as it is (a 2-D mask of
ones when the layout holds no filler: the model then builds its own causal mask, as it does
unreduced). Decode steps get the same mask over the shorter cache plus the new tokens. The planner of the later steps
(reducers.plan) then sees the shortened prompt, with each token's original visual-token index,
so protected sinks and seeded random scores stay the same. VisionZip's contextual merge (``merge``)
and SparseVLM's recycling (``recycle``) also rewrite the input states of some tokens they keep
(reducers.scores.contextual_merge, reducers.scores.recycle). With ``proportional`` each kept visual
token stands for the dropped ones nearest to it: log(size) is added to its column of the mask, in every
layer and decode step (reducers.scores.proportional_sizes), so the mask is additive then, under SDPA too.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attnflow import compat
from attnflow.probes import adapters
from attnflow.probes.spans import token_spans
from attnflow.reducers import scores as score_fns
from attnflow.reducers.plan import Planner, dropped, kept_count, rectangular, removable_visual
from attnflow.reducers.schedule import ScheduleError
from attnflow.reducers.shorten import gather_seq

INPUTS_EMBEDS = "inputs_embeds"


def language_model(model: nn.Module) -> nn.Module:
    """The module whose forward runs the decoder layers (their parent)."""
    return reduce(getattr, adapters.layers_path(model).rsplit(".", 1)[0].split("."), model)


def _mask(keys: Tensor, n_queries: int, first_query: int, bool_mask: bool, dtype: torch.dtype) -> Tensor:
    """A 4-D mask [B, 1, Q, K]: query i (key index ``first_query + i``) sees allowed ``keys`` [B, K]
    at or before it; a query whose own key is not allowed (filler) sees only itself."""
    k = torch.arange(keys.shape[1], device=keys.device)
    q = first_query + torch.arange(n_queries, device=keys.device)
    allowed = keys[:, None, :] & (k[None, None, :] <= q[None, :, None])
    allowed |= k[None, None, :] == q[None, :, None]
    allowed = allowed[:, None]
    if bool_mask:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)


class InputCut:
    """The layer-0 prune step of a schedule, executed on the language model's inputs."""

    def __init__(self, step: dict[str, Any], planner: Planner, bool_mask: bool) -> None:
        self.keep, self.by, self.seed = step["keep"], step["by"], step.get("seed", 0)
        self.merge, self.recycle = step.get("merge", False), step.get("recycle", False)
        self.proportional = step.get("proportional", False)
        self.planner, self.bool_mask = planner, bool_mask
        self.outer: dict[str, Tensor | None] = {}
        self.valid = torch.empty(0)  # [B, N'] kept (True) or filler, per reduced slot
        self.plain = False  # no filler and no size bias in this prompt's layout: the model's own causal mask
        self.bias: Tensor | None = None  # [B, N'] log size of each reduced slot (proportional), None: all zero
        self.cls: list[Tensor] = []  # per vision-tower call: [images, tokens] [CLS] attention
        self.keys: list[Tensor] = []  # per vision-tower call: [images, tokens, dh] unit head-mean keys (merge)
        self.offset = torch.empty(0)  # [B, 1] original position of a decode query minus its cache index

    def seen(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        """The outer model's forward arguments (the only place the token ids are)."""
        self.outer = {"input_ids": input_ids, "attention_mask": attention_mask}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        embeds = kwargs.get(INPUTS_EMBEDS)
        if args or embeds is None:
            raise compat.internals_error("attnflow's layer-0 pruning expects the language model to be called with "
                                         "keyword inputs_embeds")
        if compat.is_decode_step(kwargs):
            return args, self._decode(kwargs, embeds)
        return args, self._prefill(kwargs, embeds)

    def _prefill(self, kwargs: dict[str, Any], embeds: Tensor) -> dict[str, Any]:
        ids, am = self.outer["input_ids"], self.outer["attention_mask"]
        b, n = ids.shape
        dev = embeds.device
        real = torch.ones(b, n, dtype=torch.bool, device=dev) if am is None else am.to(dev).bool()
        planner = self.planner
        spans = token_spans(ids, am, image_token_id=planner.image_token_id, bos_ids=planner.bos_ids)
        visual = torch.as_tensor(spans.modality == "visual", device=dev)
        index = torch.where(visual, visual.long().cumsum(1) - 1, -1)
        candidates = removable_visual(visual, index, planner.sinks)
        n_keep = kept_count(self.keep, candidates.sum(1))
        depth = score_fns.rank_depth(candidates.sum(1), n_keep, self.recycle)
        limit = int(depth.max()) if b else 0
        rows, cols = (torch.as_tensor(a, device=dev) for a in (spans.patch_row, spans.patch_col))
        if self.by == "cls":
            flat = torch.cat(self.cls).to(dev) if self.cls else torch.empty(0, device=dev)
            self.cls = []
            if flat.numel() != int(visual.sum()):
                raise ScheduleError(f"the vision tower's [CLS] attention covers {flat.numel()} patches but the prompts "
                                    f"hold {int(visual.sum())} visual tokens: by='cls' needs one token per patch")
            scores = torch.full((b, n), float("-inf"), device=dev).masked_scatter(visual, flat.flatten().float())
            scores = scores.masked_fill(~candidates, float("-inf"))
        else:
            scores = score_fns.selection_scores(self.by, candidates, limit, seed=self.seed, visual_index=index,
                                                patch_row=rows, patch_col=cols, states=embeds)
        states = embeds
        if self.merge:
            keys = torch.cat(self.keys).to(dev)
            self.keys = []
            per_position = torch.zeros(b, n, keys.shape[-1], device=dev).masked_scatter(visual[..., None],
                                                                                        keys.flatten(0, 1))
            image = torch.as_tensor(spans.image, device=dev)
            kept, embeds = score_fns.contextual_merge(scores, candidates, n_keep, per_position, image, embeds)
            want = real & ~(candidates & ~kept)
        elif self.recycle:
            drop, embeds = score_fns.recycle(scores, candidates, n_keep, embeds)
            want = real & ~drop
        else:
            want = real & ~dropped(scores, candidates, n_keep)
        take, filler = rectangular(want, ~real)
        self.valid = ~filler
        self.bias = None
        if self.proportional and bool((gone := visual & real & ~want).any()):
            sizes = score_fns.proportional_sizes(states, visual & want, gone)
            self.bias = sizes.log().gather(1, take).to(embeds.dtype)  # 0 off the kept visual tokens, filler included
        self.plain = bool(self.valid.all()) and self.bias is None  # the model's own causal mask is right
        positions = kwargs.get(compat.POSITION_IDS)
        if positions is None:
            positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        last = positions.reshape(-1, b, n)[0, :, -1] if positions.dim() == 3 else positions[..., -1]
        self.offset = (last + 1 - take.shape[1])[:, None]  # generated tokens follow the prompt's last position
        out = {**kwargs, INPUTS_EMBEDS: gather_seq(embeds, take, 1), compat.POSITION_IDS: gather_seq(positions, take, -1),
               compat.ATTENTION_MASK: self._lm_mask(take.shape[1], 0, embeds.dtype)}
        modality = np.where(filler.cpu().numpy(), "pad", np.take_along_axis(spans.modality, take.cpu().numpy(), 1))
        planner.begin(ids.to(dev).gather(1, take), self.valid.long(),
                      labels={"modality": modality, "visual_index": index.gather(1, take), "patch_row": rows.gather(1, take),
                              "patch_col": cols.gather(1, take), "origin": take}, shortened=n - take.shape[1])
        return out

    def _lm_mask(self, n_queries: int, cached: int, dtype: torch.dtype) -> Tensor | None:
        """The language model's mask for ``n_queries`` new tokens after ``cached`` ones: the 4-D one of
        the module's ``_mask`` over the kept layout (and the tokens generated since), additive with the
        size bias added to its columns when there is one; without filler or bias the model builds its own
        causal mask at no extra cost: from a 2-D mask of ones in a prefill (not None: transformers would
        then read the gathered, gapped position ids as packed sequences), from none in a decode step (it
        reads packed sequences only without a cache, and would check a mask of ones every step)."""
        b, dev = self.valid.shape[0], self.valid.device
        generated = cached + n_queries - self.valid.shape[1]
        if self.plain:
            return None if cached else torch.ones(b, n_queries, dtype=torch.long, device=dev)
        keys = torch.cat([self.valid, torch.ones(b, generated, dtype=torch.bool, device=dev)], 1)
        if self.bias is None:
            return _mask(keys, n_queries, cached, self.bool_mask, dtype)
        bias = torch.nn.functional.pad(self.bias, (0, generated))
        return _mask(keys, n_queries, cached, False, dtype) + bias[:, None, None, :]

    def _decode(self, kwargs: dict[str, Any], embeds: Tensor) -> dict[str, Any]:
        if self.valid.numel() == 0:
            raise ScheduleError("a decode step arrived without a prefill under this schedule: "
                                "run the whole generation inside `with reducers.apply(...)`")
        q = embeds.shape[1]
        cached = compat.forward_cache(kwargs).get_seq_length()
        out = {**kwargs, compat.ATTENTION_MASK: self._lm_mask(q, cached, embeds.dtype)}
        if kwargs.get(compat.POSITION_IDS) is None:  # one op per step: decode steps are a few ms on small models
            out[compat.POSITION_IDS] = (self.offset + cached if q == 1
                                        else self.offset + cached + torch.arange(q, device=embeds.device))
        self.planner.decode_step(q)
        return out


def input_cut_refused(model: nn.Module) -> str | None:
    """Why prune steps at layer 0 cannot serve ``model``'s family (None: they can)."""
    adapter = adapters.adapter_for(model)
    if adapter.no_input_cut is None:
        return None
    return (f"prune steps before the first decoder layer (layer 0) cannot serve {adapter.family}: "
            f"{adapter.no_input_cut}; prune from layer 1 on")


def available_scores(model: nn.Module) -> tuple[str, ...]:
    """The scores of reducers.scores this model can rank by (``cls`` needs a [CLS] in its vision tower,
    and prune steps before the first decoder layer)."""
    return tuple(by for by in score_fns.SCORES if by != "cls" or (
        adapters.vision_cls_attention(model) is not None and input_cut_refused(model) is None))


def attach_input_cut(model: nn.Module, cut: InputCut) -> list[RemovableHandle]:
    """Run ``cut`` on every call of ``model``'s language model (and, for ``by='cls'``, keep the vision
    tower's [CLS] attention); a family whose tower has no [CLS], or whose mask a cut before the first
    layer cannot rebuild, is refused."""
    refused = input_cut_refused(model)
    if refused:
        raise ScheduleError(refused)
    found = adapters.vision_cls_attention(model) if cut.by == "cls" else None
    if cut.by == "cls" and found is None:
        raise ScheduleError(f"by='cls' ranks patches by the vision tower's [CLS] attention (VisionZip, VisPruner); "
                            f"{adapters.adapter_for(model).family}'s tower has none here: use divprune, pool or random")
    handles = [language_model(model).register_forward_pre_hook(cut.hook, with_kwargs=True)]
    if found is None:
        return handles
    attn, drop_cls = found
    q_proj, k_proj = adapters.adapter_for(model).projections
    captured: dict[str, Tensor] = {}
    for name in (q_proj, k_proj):
        handles.append(getattr(attn, name).register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output)))

    def rank(module: nn.Module, args: tuple, output: Any) -> None:
        scale = getattr(module, "scale", None) or module.head_dim ** -0.5
        keys = captured.pop(k_proj)
        cut.cls.append(score_fns.cls_attention(captured.pop(q_proj), keys, module.num_heads, scale, drop_cls))
        if cut.merge:
            cut.keys.append(score_fns.head_mean_keys(keys, module.num_heads, drop_cls))

    handles.append(attn.register_forward_hook(rank))
    return handles
