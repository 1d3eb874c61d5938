"""How a ``prune_visual`` step ranks the visual tokens it may remove (its ``by`` key), beside
FastV's last-row attention (reducers.rank).

Each scorer returns scores [B, R] over the tokens layer K-1 processed (higher: kept first); only
``candidates`` [B, R] (unprotected visual tokens still present) are ranked. Selection rules that
build a set greedily (farthest points, DART's pivots) are written as their selection order, so
keeping the top ``n`` scores is the set the rule picks for ``n``:

- ``random`` (the control of UniPruneBench, arXiv 2511.02650): a seeded random order of each
  sample's visual-token indices, the same whatever the batch;
- ``pool`` (the downsampling control, VTC-Bench arXiv 2510.07143): farthest-point order of the
  tokens' patch cells, a near-uniform spatial grid at any keep (token order where the cells are
  unknown);
- ``divprune`` (DivPrune, arXiv 2503.02175): greedy max-min diversity of the token states
  entering layer K-1 (at K = 0, before the LLM as DivPrune does: the LLM's input embeddings) under
  cosine distance: first the token farthest from its nearest neighbour, then repeatedly the token
  farthest from those chosen;
- ``cls`` (VisionZip's dominant tokens, arXiv 2412.04467; VisPruner, arXiv 2412.01818): the
  attention the vision tower's [CLS] query pays each patch, summed over heads, at the layer the
  model takes its image features from; before the LLM only, for towers with a [CLS] (VisionZip's
  contextual tokens, merged from the rest: ``contextual_merge``);
- ``dart`` (DART, arXiv 2502.11494; defaults K = 2, 4 visual + 4 text pivots): layer K-1's
  keys (before RoPE); pivots are the visual and the text tokens of largest key L1 norm, and each
  pivot in turn keeps the remaining visual token least cosine-similar to it (the most duplicated
  ones are dropped);
- ``text`` (SparseVLM, arXiv 2410.04417): the head-mean attention layer K-1's *rater* text
  tokens pay each visual token, averaged over the raters. Raters are the prompt's text tokens
  most relevant to the image, chosen once per prompt from the LLM's input embeddings: each visual
  token's softmax over the text tokens of v·t, averaged over the visual tokens, and the text
  tokens above that average's mean.

Any step may also recycle (SparseVLM's token recycling): of its kept share, a few tokens stand for
clusters of the tokens it drops (the function ``recycle``). A step before the LLM may also keep the
dropped tokens' share of attention (ToMe's proportional attention): each kept token stands for
itself and the dropped tokens nearest to it (the function ``proportional_sizes``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from attnflow.reducers.shorten import gather_seq

SCORES: tuple[str, ...] = ("last_row", "random", "pool", "divprune", "dart", "cls", "text")
CONTEXTUAL_SHARE = 10 / 64  # VisionZip's 64-token setting: 54 dominant + 10 contextual tokens
INPUT_SCORES: tuple[str, ...] = ("random", "pool", "divprune", "cls")  # need no LLM attention: may act before layer 0
DART_PIVOTS = (4, 4)  # visual, text: DART's defaults
RECYCLE_SHARE, RECYCLE_GROUP = 0.3, 10  # SparseVLM: the top 30% of the deleted tokens, ⌊n/10⌋+1 clusters


def order_scores(order: Tensor, candidates: Tensor) -> Tensor:
    """Scores from a selection order [B, R] of slot indices (first = kept first): -rank, -inf off the candidates."""
    b, r = order.shape
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(r, device=order.device).expand(b, r))
    return (-rank.to(torch.float32)).masked_fill(~candidates, float("-inf"))


def farthest_point(distance: Tensor, candidates: Tensor, limit: int) -> Tensor:
    """Greedy max-min order [B, R] of the candidates under pairwise ``distance`` [B, R, R]: first the
    candidate farthest from its nearest other candidate, then the one farthest from all chosen
    (ties: the earlier slot); the first ``limit`` are chosen this way, every other slot follows in
    slot order. The greedy loop runs on the host (one device read), each step for the whole batch at
    once (one numpy pass over [B, R]), not as several small device ops per chosen token, which cost
    more than the forward saved at batch size 1, nor sample by sample."""
    b, r, _ = distance.shape
    dist, cand = distance.float().cpu().numpy(), candidates.cpu().numpy().astype(bool)
    rows, slots = np.arange(b), np.arange(r)
    others = np.where(cand[:, None, :], dist, np.inf)  # distances to the other candidates
    others[:, slots, slots] = np.inf
    nearest = others.min(2)
    score = np.where(cand, np.where(np.isinf(nearest), 0.0, nearest), -np.inf)  # a lone candidate: 0
    gap = np.where(cand, np.inf, -np.inf).astype(np.float32)  # to the nearest chosen; -inf: not to pick
    steps = np.minimum(cand.sum(1), limit)  # picks per sample
    picks = np.zeros((int(steps.max()) if b else 0, b), dtype=np.intp)
    flat_dist, flat_gap = dist.reshape(b * r, r), gap.reshape(-1)  # flat takes: cheaper than [rows, pick]
    for step in range(len(picks)):
        picks[step] = pick = score.argmax(1)  # the first among ties
        at = rows * r + pick
        flat_gap[at] = -np.inf
        score = np.minimum(gap, flat_dist.take(at, 0), out=gap)
    rank = np.broadcast_to(limit + slots, (b, r)).copy()  # unpicked slots follow in slot order
    order = np.broadcast_to(np.arange(len(picks))[:, None], picks.shape)
    real = order < steps  # a sample done picks nothing more
    rank[np.broadcast_to(rows, picks.shape)[real], picks[real]] = order[real]
    return torch.from_numpy(np.argsort(rank, axis=1, kind="stable")).to(distance.device)


def cosine_distance(x: Tensor) -> Tensor:
    """Pairwise 1 - cos [B, R, R] of states [B, R, D] (float32)."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1 - unit @ unit.transpose(1, 2)


def random_scores(visual_index: Tensor, candidates: Tensor, seed: int) -> Tensor:
    """A seeded random score per visual-token index: a sample's order does not depend on its batch."""
    top = int(visual_index.max()) + 1 if visual_index.numel() else 0
    scores = _draw(max(top, 1), seed, visual_index.device)[visual_index.clamp_min(0)]
    return scores.masked_fill(~candidates, float("-inf"))


@functools.lru_cache(maxsize=64)
def _draw(n: int, seed: int, device: torch.device) -> Tensor:
    """``n`` seeded uniform draws on ``device``, made once per (n, seed, device): read-only."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(device)


def pool_scores(row: Tensor, col: Tensor, candidates: Tensor, limit: int) -> Tensor:
    """Farthest-point order of the candidates' patch cells (row, col); a token without a cell
    counts by its slot, so a model whose grid is unknown keeps evenly spaced tokens."""
    slot = torch.arange(row.shape[1], device=row.device).expand_as(row).float()
    known = (row >= 0) & (col >= 0)
    y = torch.where(known, row.float(), torch.zeros_like(slot))
    x = torch.where(known, col.float(), slot)
    points = torch.stack([y, x], -1)
    return order_scores(farthest_point(torch.cdist(points, points), candidates, limit), candidates)


def divprune_scores(states: Tensor, candidates: Tensor, limit: int) -> Tensor:
    """DivPrune: greedy max-min cosine diversity of the states [B, R, D]."""
    return order_scores(farthest_point(cosine_distance(states), candidates, limit), candidates)


def selection_scores(by: str, candidates: Tensor, limit: int, *, seed: int, visual_index: Tensor,
                     patch_row: Tensor, patch_col: Tensor, states: Tensor | None) -> Tensor:
    """Scores of ``random``, ``pool`` or ``divprune`` (the scores that need no attention) over the
    same [B, R] slots as ``candidates``; ``states`` [B, R, D] for divprune."""
    if by == "random":
        return random_scores(visual_index, candidates, seed)
    if by == "pool":
        return pool_scores(patch_row, patch_col, candidates, limit)
    return divprune_scores(states, candidates, limit)


def cls_attention(q: Tensor, k: Tensor, heads: int, scale: float, drop_cls: bool) -> Tensor:
    """Head-summed attention [N, P] of each image's [CLS] query (position 0) over its tokens, from the
    tower layer's q/k projection outputs [N, P+1, heads·dh]; without the [CLS] column when ``drop_cls``."""
    n, t, _ = k.shape
    q_cls = q[:, 0].reshape(n, heads, -1).float()
    keys = k.reshape(n, t, heads, -1).float()
    attn = (torch.einsum("nhd,nthd->nht", q_cls, keys) * scale).softmax(-1).sum(1)
    return attn[:, 1:] if drop_cls else attn


def head_mean_keys(k: Tensor, heads: int, drop_cls: bool) -> Tensor:
    """Each token's key averaged over heads and L2-normalised [N, P, dh], from a tower layer's key
    projection output [N, P+1, heads·dh] (without the [CLS] row when ``drop_cls``): VisionZip's
    similarity metric."""
    n, t, _ = k.shape
    keys = torch.nn.functional.normalize(k.reshape(n, t, heads, -1).float().mean(2), dim=-1)
    return keys[:, 1:] if drop_cls else keys


def contextual_merge(scores: Tensor, candidates: Tensor, n_keep: Tensor, keys: Tensor, image: Tensor,
                     states: Tensor) -> tuple[Tensor, Tensor]:
    """VisionZip's dominant and contextual tokens (arXiv 2412.04467) per sample: of ``n_keep`` [B]
    kept candidates [B, R], ``round(n_keep · CONTEXTUAL_SHARE)`` are contextual and the rest the top
    ``scores``; the candidates left over are split into targets at a uniform stride and the others,
    each other assigned to the target of its image whose key (``keys`` [B, R, dh], unit length) is
    most similar, and a target's state becomes its own plus the mean of its assigned tokens' (a
    target none chose keeps its own). Returns (kept [B, R], ``states`` [B, R, D] with the targets'
    replaced). VisionZip merges the tower's outputs before the projector; here the LLM's input
    states are merged, after it."""
    kept = torch.zeros_like(candidates)
    merged = states.clone()
    for b in range(scores.shape[0]):
        slots = candidates[b].nonzero()[:, 0]
        total = int(n_keep[b])
        contextual = min(int(math.floor(total * CONTEXTUAL_SHARE + 0.5)), max(0, slots.numel() - total))
        order = slots[scores[b, slots].argsort(descending=True, stable=True)]
        kept[b, order[:total - contextual]] = True
        rest = order[total - contextual:].sort().values
        if contextual == 0:
            continue
        stride = rest.numel() // contextual
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(contextual, device=rest.device) * stride] = True
        targets, others = rest[is_target], rest[~is_target]
        kept[b, targets] = True
        similarity = keys[b, others] @ keys[b, targets].T
        similarity = similarity.masked_fill(image[b, others][:, None] != image[b, targets][None, :], float("-inf"))
        best = similarity.max(1)
        chosen = best.values > float("-inf")
        assign = best.indices[chosen]
        merged[b, targets] = states[b, targets] + group_means(states[b, others[chosen]], assign, contextual)
    return kept, merged


def proportional_sizes(states: Tensor, kept: Tensor, gone: Tensor) -> Tensor:
    """How many tokens each kept one stands for [B, N] (float32): itself plus the ``gone`` [B, N]
    tokens whose nearest ``kept`` [B, N] token, by cosine similarity of ``states`` [B, N, D], it is
    (ties: the earlier slot); 1 elsewhere. With log(size) added to its attention logits, a kept token
    draws the attention its dropped near-duplicates drew (ToMe's proportional attention, arXiv
    2210.09461, there for merged tokens): softmax normalisation over the shorter sequence then sees
    the image's mass as the full one did, which dropping alone shifts towards the kept tokens."""
    b, n = kept.shape
    width = int(kept.sum(1).max()) if b else 0
    sizes = torch.ones(b, n, dtype=torch.float32, device=kept.device)
    if not width or not bool(gone.any()):
        return sizes
    slots = kept.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :width]  # kept first, in order
    valid = kept.gather(1, slots)
    unit = torch.nn.functional.normalize(states.float(), dim=-1)
    similarity = (unit @ gather_seq(unit, slots, 1).transpose(1, 2)).masked_fill(~valid[:, None, :], float("-inf"))
    nearest = slots.gather(1, similarity.argmax(2))
    return sizes.scatter_add(1, nearest, gone.float())


def group_means(x: Tensor, assign: Tensor, groups: int) -> Tensor:
    """The mean [groups, D] of the rows of ``x`` [N, D] assigned to each group by ``assign`` [N]
    (accumulated in float32; zero for a group no row joined), in ``x``'s dtype."""
    sums = torch.zeros(groups, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, assign, x.float())
    counts = torch.bincount(assign, minlength=groups).clamp_min(1)
    return (sums / counts[:, None]).to(x.dtype)


def dart_scores(keys: Tensor, candidates: Tensor, text: Tensor, n_keep: Tensor,
                pivots: tuple[int, int] = DART_PIVOTS) -> Tensor:
    """DART: pivots by key L1 norm (``pivots`` visual among the candidates, text among ``text``),
    then each pivot in turn keeps the remaining candidate least cosine-similar to it, until
    ``n_keep`` [B] are kept per sample."""
    b, r, _ = keys.shape
    norm = keys.float().abs().sum(-1)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    vis_piv = norm.masked_fill(~candidates, -1).topk(min(pivots[0], r), dim=1).indices  # [B, Pv]: candidates first
    txt_piv = norm.masked_fill(~text, -1).topk(min(pivots[1], r), dim=1).indices
    anchors = torch.cat([vis_piv, txt_piv], 1)
    # each anchor's slots from least to most similar (ties: earlier slot first), walked on the host:
    # a few batched device ops instead of several small ones per kept token
    ranked = (gather_seq(unit, anchors, 1) @ unit.transpose(1, 2)).argsort(dim=2, stable=True).tolist()  # [B, P, R]
    cand_rows, n_cand, n_txt, wanted = candidates.tolist(), candidates.sum(1).tolist(), text.sum(1).tolist(), n_keep.tolist()
    vis_rows, n_pv = vis_piv.tolist(), vis_piv.shape[1]
    orders = []
    for i in range(b):
        n_vis, n_text = min(n_pv, n_cand[i]), min(txt_piv.shape[1], n_txt[i])
        rows = ranked[i][:n_vis] + ranked[i][n_pv:n_pv + n_text]
        allowed = cand_rows[i]
        picks = vis_rows[i][:n_vis]
        chosen = set(picks)
        limit, at = min(int(wanted[i]), n_cand[i]), [0] * len(rows)
        while len(picks) < limit and rows:
            for p, row in enumerate(rows):
                if len(picks) >= limit:
                    break
                j = at[p]
                while j < r and (not allowed[row[j]] or row[j] in chosen):
                    j += 1
                at[p] = j
                if j == r:
                    break
                chosen.add(row[j])
                picks.append(row[j])
        orders.append(picks + [s for s in range(r) if s not in chosen])
    return order_scores(torch.tensor(orders, device=keys.device), candidates)


def raters(states: Tensor, visual: Tensor, text: Tensor) -> Tensor:
    """SparseVLM's raters [B, R] (bool) among the ``text`` slots, from the input states [B, R, D]:
    each ``visual`` token's softmax over the sample's text tokens of v·t, averaged over its visual
    tokens, is each text token's relevance; the raters are the text tokens above the mean relevance
    (all of them when none is, e.g. a single text token)."""
    x = states.float()
    logits = (x @ x.transpose(1, 2)).masked_fill(~text[:, None, :], float("-inf"))  # [B, R(v), R(t)]
    share = torch.nan_to_num(logits.softmax(-1)) * visual[..., None]
    relevance = share.sum(1) / visual.sum(1, keepdim=True).clamp_min(1)  # [B, R]
    mean = (relevance * text).sum(1, keepdim=True) / text.sum(1, keepdim=True).clamp_min(1)
    above = text & (relevance > mean)
    return torch.where(above.any(1, keepdim=True), above, text)


def text_scores(rows: Tensor, rating: Tensor, candidates: Tensor) -> Tensor:
    """SparseVLM: the head-mean attention rows [B, Q, R] of the rater queries, averaged over the
    raters ``rating`` [B, Q]; -inf off the candidates."""
    weight = rating.float() / rating.sum(1, keepdim=True).clamp_min(1)
    return (weight[:, None, :] @ rows.float())[:, 0].masked_fill(~candidates, float("-inf"))


def recycle_counts(n_candidates: int, n_keep: int) -> tuple[int, int, int]:
    """SparseVLM's recycling counts (arXiv 2410.04417) for one sample, within a budget of ``n_keep``
    kept tokens: (selected, pooled, clusters). Of the ``n_candidates - selected`` tokens deleted, the
    ``pooled = int(0.3 · deleted) + 1`` best by score are recycled into ``clusters = int(pooled / 10)
    + 1`` merged tokens, and ``selected + clusters = n_keep`` (SparseVLM adds its merged tokens on top
    of the budget; here they count in it, so FLOPs stay those of ``n_keep``). The smallest
    ``clusters`` that is consistent, found by iterating from none; nothing deleted: nothing recycled."""
    clusters = 0
    while True:
        selected = n_keep - clusters
        deleted = n_candidates - selected
        pooled = min(deleted, int(RECYCLE_SHARE * deleted) + 1) if deleted > 0 else 0
        wanted = min(n_keep, pooled // RECYCLE_GROUP + 1) if pooled else 0
        if wanted <= clusters:
            return selected, pooled if clusters else 0, clusters
        clusters = wanted


def rank_depth(n_candidates: Tensor, n_keep: Tensor, recycling: bool) -> Tensor:
    """How many candidates a greedy order (farthest points, DART's round robin) must rank for a step
    keeping ``n_keep`` [B] of ``n_candidates`` [B]: the kept ones, and with ``recycling`` the selected
    ones and the pool after them (``recycle_counts``), no more: a greedy order's first picks do not
    depend on how many follow, and each pick is a host step at batch size 1."""
    if not recycling:
        return n_keep
    depth = [sum(recycle_counts(n, k)[:2]) for n, k in zip(n_candidates.tolist(), n_keep.tolist())]
    return torch.tensor(depth, dtype=n_keep.dtype, device=n_keep.device)


def density_peaks(x: Tensor, valid: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (DPC-kNN, as SparseVLM's recycling
    runs it), per sample of a batch: the rows of ``x`` [B, P, D] where ``valid`` [B, P] holds, into
    ``clusters`` [B] clusters. Distances are Euclidean over sqrt(D); a row's density is exp(-mean
    squared distance to its ``clusters`` nearest rows, itself included); its separation the distance
    to the nearest denser row (the sample's largest distance for the densest); the ``clusters`` rows
    of largest density × separation are the centres, and every row joins its nearest centre. Density
    ties go to the earlier row (SparseVLM adds random noise instead). Every step runs for the whole
    batch at once, on the host in float64 (sample by sample on the device, one recycling step cost
    ~5 ms of a 100 ms forward at batch 16; the arrays are small).
    Returns (centres [B, C] row indices, C = the largest count, the first ``clusters`` of each row
    real; assignment [B, P] of each row to a centre's index in them)."""
    b, p, d = x.shape
    rows, ok = x.detach().double().cpu().numpy(), valid.cpu().numpy()
    k = np.minimum(clusters.cpu().numpy(), ok.sum(1))
    square = (rows * rows).sum(2)
    dist = np.sqrt(np.maximum(square[:, :, None] + square[:, None, :] - 2 * rows @ rows.transpose(0, 2, 1), 0) / d)
    pair = ok[:, :, None] & ok[:, None, :]
    width = int(k.max()) if b else 0
    near = np.sort(np.where(pair, dist, np.inf), axis=2)[:, :, :width]
    counted = np.arange(width) < k[:, None, None]
    density = np.exp(-(np.where(counted, near, 0) ** 2).sum(2) / np.maximum(k, 1)[:, None])
    row = np.arange(p)
    ahead = (density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None])
                                                           & (row[None, :] < row[:, None]))
    top = np.where(pair, dist, -np.inf).reshape(b, -1).max(1, initial=0.0)
    separation = np.where(ahead, dist, top[:, None, None]).min(2, initial=np.inf)
    value = np.where(ok, separation * density, -np.inf)
    centres = np.argsort(-value, axis=1, kind="stable")[:, :width]
    real = np.arange(width) < k[:, None]  # [B, C]
    assign = np.where(real[:, None, :], np.take_along_axis(dist, np.broadcast_to(centres[:, None, :], (b, p, width)), 2),
                      np.inf).argmin(2) if width else np.zeros((b, p), dtype=np.intp)
    np.put_along_axis(assign, centres, np.where(real, np.arange(width), np.take_along_axis(assign, centres, 1)), 1)
    return tuple(torch.from_numpy(a).to(x.device) for a in (centres, assign))


def recycle(scores: Tensor, candidates: Tensor, n_keep: Tensor, states: Tensor) -> tuple[Tensor, Tensor]:
    """Selection with SparseVLM's token recycling (arXiv 2410.04417), per sample: keep the top
    ``selected`` candidates by ``scores`` [B, R], and of the candidates it deletes, cluster the
    ``pooled`` best by score (``recycle_counts`` of ``n_keep`` [B]) with ``density_peaks`` on their
    ``states`` [B, R, D]; each cluster's centre token is kept, its state replaced by the mean of its
    cluster's states. SparseVLM inserts the merged tokens after the kept visual tokens with
    renumbered positions; here each sits at its centre's original position (one convention for every
    reducer: original RoPE positions). Returns (dropped [B, R], ``states`` with the centres' rows
    replaced)."""
    b, r = candidates.shape
    dev = candidates.device
    by_score = scores.masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
    order = by_score.gather(1, (~candidates).gather(1, by_score).to(torch.uint8).argsort(dim=1, stable=True))
    counts = [recycle_counts(n, k) for n, k in zip(candidates.sum(1).tolist(), n_keep.tolist())]
    selected, pooled, clusters = torch.tensor(counts, dtype=torch.long, device=dev).view(b, 3).unbind(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(r, device=dev).expand(b, r))
    drop = candidates & (rank >= selected[:, None])
    width = int(pooled.max()) if b else 0
    if not width:
        return drop, states
    step = torch.arange(width, device=dev)
    pool = order.gather(1, (selected[:, None] + step).clamp_max(r - 1))  # [B, P] slots, best first
    valid = step < pooled[:, None]
    x = gather_seq(states, pool, 1)
    centres, assign = density_peaks(x, valid, clusters)
    c = centres.shape[1]
    sample = torch.arange(b, device=dev)[:, None]
    means = group_means(x[valid], (sample * c + assign)[valid], b * c).view(b, c, -1)
    real = torch.arange(c, device=dev) < clusters[:, None]
    rows, slots = sample.expand(b, c)[real], pool.gather(1, centres)[real]
    merged = states.clone()
    merged[rows, slots] = means[real]
    drop[rows, slots] = False
    return drop, merged
