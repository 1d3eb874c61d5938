"""Statistics reduced inside the trace, so that no n×n attention map outlives one layer.

``attention_stats`` takes a layer's attention either as the weights an eager model returned
or as (q, k, mask, scaling) to compute in query chunks with GQA expanded; both paths feed the
same reduction. Given v as well, it also returns the attention output from the same
probabilities: the recorder's one pass (attnflow.probes.onepass) replaces the model's SDPA call
by it, so each layer's QKᵀ and softmax are computed once. ``hidden_stats`` reduces a layer's residual
input and output. All outputs are float32 tensors on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

import numpy as np
import torch

from attnflow.probes import fused as fusedk


@dataclass
class Layout:
    """Per-batch facts the reductions need: which positions are real and their groups."""

    valid: torch.Tensor  # [B, T] bool, non-pad
    group: torch.Tensor  # [B, T] long, index into GROUPS, -1 for pad
    last: torch.Tensor  # [B] long, last non-pad position
    n_groups: int
    causal: bool
    all_valid: bool = False  # no padding in the batch (known on the host: no device sync per layer)
    # per attention mask of this batch (layers share their mask objects): visibility and key ends
    masks: dict[Any, Visible] = field(default_factory=dict, repr=False)

    # made once per batch, not per layer: on a GPU each is a kernel launch the host would repeat
    @cached_property
    def onehot(self) -> torch.Tensor:
        """[B, T, G] float: each real position's group, zero rows for pads."""
        onehot = torch.nn.functional.one_hot(self.group.clamp(min=0), self.n_groups).float()
        return onehot * self.valid.float()[..., None]

    @cached_property
    def per_source(self) -> torch.Tensor:
        """[B, 1, G, 1]: 1 / (real positions of each source group), NaN for a group with none, so a
        flow row of an absent group comes out NaN."""
        n_src = self.onehot.sum(1)
        return torch.where(n_src > 0, 1 / n_src.clamp_min(1), float("nan"))[:, None, :, None]

    @cached_property
    def batch(self) -> torch.Tensor:
        """[B]: 0..B-1, for picking each sample's own row."""
        return torch.arange(self.valid.shape[0], device=self.valid.device)


def visibility(mask: torch.Tensor | None, layout: Layout, rows: slice, T: int) -> torch.Tensor:
    """Bool [B, 1|H, c, T] for the query rows ``rows``: may query q attend to key k, as the
    model itself decides (its mask), restricted to real queries and keys."""
    if mask is None:
        q = torch.arange(rows.start, rows.stop, device=layout.valid.device)[:, None]
        k = torch.arange(T, device=layout.valid.device)[None, :]
        vis = (k <= q) if layout.causal else torch.ones(q.shape[0], T, dtype=torch.bool, device=q.device)
        vis = vis[None, None] & layout.valid[:, None, None, :]
    elif mask.dtype == torch.bool:
        vis = mask[..., rows, -T:]
    else:
        vis = mask[..., rows, -T:] > torch.finfo(mask.dtype).min / 2
    return vis & layout.valid[:, None, rows, None]


def _chunks(T: int, size: int) -> Iterator[slice]:
    for start in range(0, T, size):
        yield slice(start, min(T, start + size))


MASK_ROWS = 256  # query rows per step of the per-mask sums: few steps (launches) and small float temporaries


@dataclass
class Visible:
    """What a layer's mask means for the reductions, computed once per mask of a batch (the
    layers share their mask objects), so a GPU syncs once, not once per chunk and layer."""

    vis: torch.Tensor  # bool [B, 1|H, T, T]: may query q attend to key k
    ends: list[int]  # per query chunk, one past the last key any of its queries may see
    n_seen: torch.Tensor  # [B, T] real queries that see each key
    uniform: torch.Tensor  # [B, T] the mean of 1/(keys seen) over the queries that see each key
    plain: bool  # the mask is exactly causal (or bidirectional) attention over real tokens

    @cached_property
    def per_key(self) -> torch.Tensor:
        """[B, 1, T]: 1 / (real queries that see each key), 1 for a key none sees."""
        return (1 / self.n_seen.clamp_min(1))[:, None]


def _visible(mask: torch.Tensor | None, layout: Layout, T: int, chunk: int) -> Visible:
    key = (id(mask), T, chunk)
    if key not in layout.masks:
        vis = visibility(mask, layout, slice(0, T), T)
        if mask is None:
            ends = [min(T, s + chunk) if layout.causal else T for s in range(0, T, chunk)]
        else:
            seen = vis.any(dim=(0, 1))  # [T queries, T keys]; a byte per pair, not an index
            last = torch.where(seen.any(1), T - seen.flip(-1).to(torch.uint8).argmax(1), 0)  # [T]
            ends = torch.nn.functional.pad(last, (0, -T % chunk)).view(-1, chunk).amax(1).tolist()
            ends = [e if e else min(T, i * chunk + chunk) for i, e in enumerate(ends)]
        n_seen = torch.zeros(layout.valid.shape, device=vis.device)
        uniform = torch.zeros(layout.valid.shape, device=vis.device)
        for rows in _chunks(T, MASK_ROWS):
            visf = vis[:, 0, rows].float()  # [B, c, T]
            n_seen += visf.sum(1)
            uniform += (visf / visf.sum(2, keepdim=True).clamp_min(1)).sum(1)
        plain = mask is None or bool((vis == visibility(None, layout, slice(0, T), T)).all())
        layout.masks[key] = Visible(vis, ends, n_seen, uniform / n_seen.clamp_min(1), plain)
    return layout.masks[key]


def _attention(qs: torch.Tensor, kt: torch.Tensor, vis: torch.Tensor, softcap: float | None, rows: slice,
               kend: int) -> torch.Tensor:
    """A for the query rows ``rows`` over keys [0, kend) (``kt``: keys transposed, [B, H, d, T]).
    Masked keys get a score of -huge, so their weight is exactly 0 without a NaN-producing -inf;
    the mask is added inside the score matmul (baddbmm), one pass over the scores."""
    bias = torch.zeros(vis.shape, dtype=qs.dtype, device=qs.device).masked_fill_(~vis, torch.finfo(qs.dtype).min)
    if softcap:
        scores = torch.tanh((qs[:, :, rows] @ kt[..., :kend]) / softcap) * softcap + bias
    else:
        B, H = qs.shape[:2]
        scores = torch.empty(B, H, rows.stop - rows.start, kend, dtype=qs.dtype, device=qs.device)
        for b in range(B):
            torch.baddbmm(bias[b], qs[b, :, rows], kt[b, :, :, :kend], out=scores[b])
    return scores.softmax(-1)


def attention_stats(
    layout: Layout,
    *,
    weights: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    chunk: int = 64,
    keep_full: bool = False,
    rank_max_tokens: int = 256,
    fused: bool = True,
) -> dict[str, torch.Tensor]:
    """received, uniform, n_seen, last_row, flow, arank (and attn if keep_full; output if ``v``).

    Give ``weights`` [B,H,T,T] (eager) or ``q`` [B,H,T,d], ``k`` [B,Hkv,T,d], ``mask``,
    ``scaling`` (computed per query chunk, memory O(B·H·chunk·T)), and ``v`` [B,Hkv,T,dv] for
    the attention output [B,H,T,dv] (float32) from the same probabilities. Each chunk only visits
    the keys its queries can see (half the work for causal models). ARank costs O(n³) per
    head, so it is computed only up to ``rank_max_tokens`` tokens (NaN beyond). With ``fused``,
    where attnflow.probes.fused serves (a GPU with Triton, a plain mask, no softcap, no full
    maps), the statistics come from its kernels and no output is returned: the caller's own
    attention computes it.
    """
    ref = weights if weights is not None else q
    B, H, T = ref.shape[0], ref.shape[1], ref.shape[2]
    seen = _visible(mask, layout, T, chunk)
    full = [] if keep_full or T <= rank_max_tokens else None
    scale = None if weights is not None else q.shape[-1] ** -0.5 if scaling is None else scaling
    output = None
    if fused and full is None and weights is None and not softcap and seen.plain and fusedk.serves(q):
        by_group, last_row = _fused(layout, q, k, scale, seen)
    else:
        by_group, last_row, output = _chunked(layout, seen, weights, q, k, v, scale, softcap, full, chunk)
    out = {
        "received": by_group.sum(2) * seen.per_key,
        "uniform": seen.uniform,
        "n_seen": seen.n_seen,
        "last_row": last_row,
        "flow": (by_group @ layout.onehot[:, None]) * layout.per_source,
    }
    out["arank"] = _arank(torch.cat(full, 2), layout) if full is not None and T <= rank_max_tokens \
        else torch.full((B, H), float("nan"), device=ref.device)
    if keep_full:
        out["attn"] = torch.cat(full, 2)
    if output is not None:
        out["output"] = output
    return out


def _fused(layout: Layout, q: torch.Tensor, k: torch.Tensor, scale: float,
           seen: Visible) -> tuple[torch.Tensor, torch.Tensor]:
    """(by_group [B,H,G,T], last_row [B,H,T]) from the Triton kernels: the column sums there, the
    last prompt row here, normalised by the kernels' log-sum-exp."""
    gid = torch.where(layout.valid, layout.group, -1)  # one launch; the kernels want int32 anyway
    by_group, lse = fusedk.group_columns(q, k, gid, layout.n_groups, scale, layout.causal)
    batch = layout.batch
    B, H, _, d = q.shape
    q_last = q[batch, :, layout.last].float().view(B, k.shape[1], -1, d)  # [B, Hkv, H/Hkv, d]: GQA groups
    logits = torch.einsum("bgrd,bgtd->bgrt", q_last, k.float()).reshape(B, H, -1)  # no key copy per query head
    scores = logits * scale - lse[batch, :, layout.last][..., None]
    row_vis = seen.vis[batch, 0, layout.last]  # [B, T]
    return by_group, torch.where(row_vis[:, None], scores.exp(), 0.0)


def _chunked(layout: Layout, seen: Visible, weights: torch.Tensor | None,
             q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None, scale: float | None,
             softcap: float | None, full: list | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(by_group [B,H,G,T], last_row [B,H,T], output or None), one query chunk at a time; appends
    each chunk's map to ``full`` when that is a list."""
    ref = weights if weights is not None else q
    B, H, T = ref.shape[0], ref.shape[1], ref.shape[2]
    if weights is None:
        kt = k.float().repeat_interleave(H // k.shape[1], dim=1).transpose(-1, -2).contiguous()
        qs = q.float() * scale
    output = None
    if v is not None:
        v = v.float().repeat_interleave(H // v.shape[1], dim=1)
        output = torch.zeros(B, H, T, v.shape[-1], device=ref.device)
    by_group = torch.zeros(B, H, layout.n_groups, T, device=ref.device)
    last_row = torch.zeros(B, H, T, device=ref.device)
    batch = layout.batch
    for rows, kend in zip(_chunks(T, chunk), seen.ends):
        vis = seen.vis[..., rows, :kend]
        if weights is not None:
            a = weights[:, :, rows, :kend].float().masked_fill(~vis, 0.0)
        else:
            a = _attention(qs, kt, vis, softcap, rows, kend)
        if v is not None:
            output[:, :, rows] = a @ v[:, :, :kend]
        if full is not None and not layout.all_valid:  # pad queries' rows (not in any group below) zeroed
            a = a * layout.valid.float()[:, None, rows, None]
        # [B, H, G, kend]: what each group of real queries pays each key; one read of ``a``
        by_group[..., :kend] += layout.onehot[:, None, rows].transpose(-1, -2) @ a
        at = layout.last - rows.start  # each sample's last prompt row, if it falls in this chunk
        hit = (at >= 0) & (at < rows.stop - rows.start)
        row = a[batch, :, at.clamp(0, rows.stop - rows.start - 1)]  # [B, H, kend]
        last_row[:, :, :kend] = torch.where(hit[:, None, None], row, last_row[:, :, :kend])
        if full is not None:
            full.append(torch.nn.functional.pad(a, (0, T - kend)))
    return by_group, last_row, output


def no_attention_stats(layout: Layout, heads: int, *, keep_full: bool = False) -> dict[str, torch.Tensor]:
    """What ``attention_stats`` returns, all NaN: the attention fields of a layer without
    softmax attention (a hybrid model's linear-attention layer)."""
    (B, T), G = layout.valid.shape, layout.n_groups
    shapes = {"received": (B, heads, T), "uniform": (B, T), "n_seen": (B, T), "last_row": (B, heads, T),
              "flow": (B, heads, G, G), "arank": (B, heads)}
    if keep_full:
        shapes["attn"] = (B, heads, T, T)
    return {name: torch.full(shape, float("nan"), device=layout.valid.device) for name, shape in shapes.items()}


def _arank(a: torch.Tensor, layout: Layout) -> torch.Tensor:
    """γ-MoD ARank: numerical rank of each head's map over real tokens, diagonal zeroed.

    Pad rows and columns of ``a`` are zero, so they add no rank: the whole batch goes in one
    call, with each sample's tolerance set as if its real-size map were given alone."""
    maps = a.double().clone()
    maps.diagonal(dim1=-2, dim2=-1).zero_()
    n_real = layout.valid.sum(1).double()  # [B]
    rtol = (torch.finfo(torch.float64).eps * n_real)[:, None]  # matrix_rank's default, per sample
    return torch.linalg.matrix_rank(maps, rtol=rtol).float()


TOPK = 3  # entries per hidden state kept for massive activations (Sun et al. record the top 3)


def _lower_median(x: torch.Tensor) -> torch.Tensor:
    """The lower median over the last dim (torch.median's convention); on the CPU through numpy's
    introselect, about 2.7x faster than torch.median on [2400, 512] and equal to it."""
    if x.device.type != "cpu":
        return x.median(-1).values
    k = (x.shape[-1] - 1) // 2
    return torch.from_numpy(np.partition(x.numpy(), k, axis=-1)[..., k])


def hidden_stats(h_in: torch.Tensor, h_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """update_cos of each token's residual update; of the output: the top-3 |x| and their
    dims (a token can carry several massive dims), max|x|, its dim, median|x|, rms."""
    x = h_out.float()
    # selections (top-k, median) are exact in the model's dtype: on a GPU, no float32 copy to sort
    ax = (h_out if h_out.device.type != "cpu" else x).abs()
    top = ax.topk(min(TOPK, ax.shape[-1]), dim=-1)
    return {
        "update_cos": torch.nn.functional.cosine_similarity(h_in.float(), x, dim=-1),
        "max_abs": top.values[..., 0].float(),
        "argmax_dim": top.indices[..., 0].float(),
        "topk_abs": top.values.float().transpose(-1, -2),  # [B, K, T]
        "topk_dim": top.indices.float().transpose(-1, -2),
        "median_abs": _lower_median(ax).float(),
        "rms": x.pow(2).mean(-1).sqrt(),
    }
