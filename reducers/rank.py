"""Rank the visual tokens a prune step may remove: by the attention the last prompt position pays
them (FastV / PyramidDrop), or by the other scores of reducers.scores, all from layer K-1; and
read the same attention row on the layers a dynamic exit decides after.

The head-mean attention row of one query is recomputed from that layer's own q/k: forward
hooks keep the query/key projection outputs the layer computes anyway, and after the attention
module has run the row is ``softmax(q_last · Kᵀ · scaling)`` with the family's own RoPE (and
q/k norms, soft-capping and sliding window when its adapter entry has them). It costs O(n·d) and works the same
under eager and SDPA, which never return attention weights.
"""

from __future__ import annotations

from functools import partial, reduce
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attnflow import compat
from attnflow.probes import adapters
from attnflow.reducers import scores as score_fns
from attnflow.reducers.plan import Planner
from attnflow.reducers.shorten import gather_seq


def attention_rows(attn: nn.Module, adapter: adapters.Adapter, q: Tensor, k: Tensor,
                   position_embeddings: tuple[Tensor, Tensor], query_slots: Tensor, key_ok: Tensor) -> Tensor:
    """Head-mean attention [B, Q, R] of the queries at ``query_slots`` [B, Q] over the R keys of
    one call of ``attn`` (a module of ``adapter``'s family), from its q/k projection outputs
    q [B, R, H·dh], k [B, R, Hkv·dh]; keys with ``key_ok`` [B, Q, R] False get none."""
    b, r, _ = k.shape
    n = query_slots.shape[1]
    dh = attn.head_dim
    q_rows = gather_seq(q, query_slots, 1).view(b, n, -1, dh)
    keys = k.view(b, r, -1, dh)
    if adapter.qk_norms:
        q_norm, k_norm = (getattr(attn, name) for name in adapter.qk_norms)
        q_rows, keys = q_norm(q_rows), k_norm(keys)
    q_rows, keys = q_rows.transpose(1, 2), keys.transpose(1, 2)  # [B, H, Q, dh], [B, Hkv, R, dh]
    cos, sin = position_embeddings
    rope = compat.rope_function(attn)
    q_rows = rope(q_rows, q_rows[:, :1], gather_seq(cos, query_slots, -2), gather_seq(sin, query_slots, -2))[0]
    keys = rope(keys[:, :1], keys, cos, sin)[1]
    heads, kv_heads = q_rows.shape[1], keys.shape[1]
    grouped = q_rows.reshape(b, kv_heads, heads // kv_heads * n, dh)  # GQA: query heads grouped by KV head
    logits = (grouped @ keys.transpose(-1, -2)).reshape(b, heads, n, r) * attn.scaling
    softcap = getattr(attn.config, adapter.softcap_field, None) if adapter.softcap_field else None
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float().masked_fill(~key_ok[:, None].to(logits.device), float("-inf"))
    return torch.nan_to_num(logits.softmax(-1)).mean(1)  # a padding query that sees nothing: a zero row


def last_row_attention(attn: nn.Module, adapter: adapters.Adapter, q: Tensor, k: Tensor,
                       position_embeddings: tuple[Tensor, Tensor], query_slot: Tensor, key_ok: Tensor) -> Tensor:
    """Head-mean attention [B, R] of the query at ``query_slot`` [B] (``attention_rows`` of one query)."""
    return attention_rows(attn, adapter, q, k, position_embeddings, query_slot[:, None], key_ok[:, None])[:, 0]


def attach_rankers(layers: nn.ModuleList, planner: Planner, adapter: adapters.Adapter) -> list[RemovableHandle]:
    """Hooks on layer K-1 of every prune step at layer K, and on every layer a dynamic exit reads:
    they keep what the scores need (q/k projection outputs, the layer's input states) and, once
    the attention module has run, hand them to ``planner.ranked`` and ``planner.exited`` (the
    last-row attention, computed once when both use it). Attach them after the shortener, so
    that a layer's input is seen as cut."""
    handles: list[RemovableHandle] = []
    q_proj, k_proj = adapter.projections
    for layer in sorted({k - 1 for k in planner.prunes} | set(planner.checks)):
        by, seed = planner.rank_by.get(layer + 1, (None, 0))
        row_needed = by == "last_row" or layer in planner.checks
        attn = reduce(getattr, adapter.attention.split("."), layers[layer])
        captured: dict[str, Tensor] = {}

        def wanted(layer: int = layer) -> bool:
            return planner.ranks_after(layer) or planner.checks_after(layer)

        def keep_output(name: str, captured: dict = captured, wanted=wanted):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                if wanted():
                    captured[name] = output
            return hook

        def keep_input(module: nn.Module, args: tuple, kwargs: dict[str, Any], captured: dict = captured,
                       wanted=wanted) -> None:
            if wanted():
                captured["states"] = args[0] if args else kwargs[compat.HIDDEN_STATES]

        def rank(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any, layer: int = layer,
                 captured: dict = captured, by: str | None = by, seed: int = seed) -> None:
            prune, check = planner.ranks_after(layer), planner.checks_after(layer)
            if not (prune or check):
                return
            row = _last_row(module, adapter, planner, layer, captured, kwargs) if check or by == "last_row" else None
            if prune:
                planner.ranked(layer, row if by == "last_row" else
                               _text_score(module, adapter, planner, layer, captured, kwargs) if by == "text" else
                               _score(by, seed, planner, layer, planner.candidates(layer), captured))
            if check:
                planner.exited(layer, row)
            captured.clear()

        if row_needed or by == "text":
            handles.append(getattr(attn, q_proj).register_forward_hook(keep_output("q")))
        if row_needed or by in ("dart", "text"):
            handles.append(getattr(attn, k_proj).register_forward_hook(keep_output("k")))
        if by == "divprune":
            handles.append(layers[layer].register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(attn.register_forward_hook(rank, with_kwargs=True))
    if any(by == "text" for by, _ in planner.rank_by.values()):
        handles.append(layers[0].register_forward_pre_hook(partial(_choose_raters, planner), with_kwargs=True))
    return handles


def _choose_raters(planner: Planner, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """At the first decoder layer of a prefill, SparseVLM's raters from the LLM's input states,
    kept as prompt positions (``planner.raters`` [B, n]) for the layers that rank by them."""
    if planner.decoding:
        return
    rows, real = planner.layer_tokens[0]
    states = args[0] if args else kwargs[compat.HIDDEN_STATES]
    visual = real & (planner.visual_index.gather(1, rows) >= 0)
    text = real & planner.text.gather(1, rows) & (rows <= planner.query_position)
    chosen = score_fns.raters(states, visual, text)
    planner.raters = torch.zeros_like(planner.text).scatter(1, rows, chosen)


def _text_score(attn: nn.Module, adapter: adapters.Adapter, planner: Planner, layer: int,
                captured: dict[str, Tensor], kwargs: dict[str, Any]) -> Tensor:
    """SparseVLM's scores [B, R] over the tokens layer ``layer`` processed: the raters' head-mean
    attention rows (each over the keys it sees), averaged over the raters."""
    rows, real = planner.layer_tokens[layer]
    rating = planner.raters.gather(1, rows) & real
    n = max(1, int(rating.sum(1).max()))
    slots = (~rating).to(torch.uint8).argsort(dim=1, stable=True)[:, :n]  # each sample's raters first
    at = rows.gather(1, slots)
    key_ok = real[:, None, :] & (rows[:, None, :] <= at[..., None])
    window = getattr(attn, "sliding_window", None) if adapter.sliding_window else None
    if window:
        key_ok &= rows[:, None, :] > at[..., None] - window
    attention = attention_rows(attn, adapter, captured["q"], captured["k"], kwargs[compat.POSITION_EMBEDDINGS],
                               slots, key_ok)
    return score_fns.text_scores(attention, rating.gather(1, slots), planner.candidates(layer))


def _last_row(attn: nn.Module, adapter: adapters.Adapter, planner: Planner, layer: int,
              captured: dict[str, Tensor], kwargs: dict[str, Any]) -> Tensor:
    """The last-row attention [B, R] of one call of ``attn`` over the tokens layer ``layer`` processed:
    the keys the query sees (real, not after it, within a sliding window)."""
    rows, real = planner.layer_tokens[layer]
    key_ok = real & (rows <= planner.query_position)  # a recomputed prefix's generated tokens come after it
    window = getattr(attn, "sliding_window", None) if adapter.sliding_window else None
    if window:
        key_ok &= rows > planner.query_position - window
    return last_row_attention(attn, adapter, captured["q"], captured["k"], kwargs[compat.POSITION_EMBEDDINGS],
                              planner.query_slots(layer), key_ok)


def _score(by: str, seed: int, planner: Planner, layer: int, candidates: Tensor, captured: dict[str, Tensor]) -> Tensor:
    """Scores [B, R] of reducers.scores' ``by`` over the tokens layer ``layer`` processed."""
    rows, _ = planner.layer_tokens[layer]
    depth = score_fns.rank_depth(candidates.sum(1), planner.n_keep[layer + 1], layer + 1 in planner.recycles)
    limit = int(depth.max()) if depth.numel() else 0
    if by != "dart":
        return score_fns.selection_scores(by, candidates, limit, seed=seed,
                                          visual_index=planner.visual_index.gather(1, rows),
                                          patch_row=planner.patch_row.gather(1, rows),
                                          patch_col=planner.patch_col.gather(1, rows), states=captured.get("states"))
    prompt_text = planner.text.gather(1, rows) & (rows <= planner.query_position)  # not generated tokens
    return score_fns.dart_scores(captured["k"], candidates, prompt_text, depth)
