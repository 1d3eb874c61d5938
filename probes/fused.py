"""Attention statistics on a GPU without materialising attention: two Triton kernels.

The torch path (attnflow.probes.stats) computes a query chunk's probabilities and reduces them:
on a GPU at thousands of tokens that is dozens of small kernels per chunk and several passes over
B·H·c·T floats per layer. Here, as in FlashAttention (arXiv 2205.14135), q and k are read in
tiles and nothing of size T×T is written: a row pass computes each query's log-sum-exp (online
softmax), a column pass recomputes the scores, normalises them by it and sums, per key, what each
group of real queries pays (a [groups, keys] tile product). The layer's output stays the model's
own SDPA call. The kernels serve a causal or bidirectional mask over real tokens without logit
softcapping (``stats`` checks the model's mask is exactly that); anything else takes the torch path.

``TRITON_INTERPRET=1`` (Triton's interpreter, read when this module is imported) runs the same
kernels on the CPU: that is how the tests check them against the torch path.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves
    triton = None

GROUPS_PAD = 16  # the group one-hot's rows, padded to tl.dot's smallest size
# (query tile, key tile, warps, pipeline stages) of each kernel: the fastest of 30 pairs at 2,400 and
# 8,192 tokens (bf16, 32 heads of 128, causal) on an H200, 2.41 ms at 8,192 against SDPA's 0.89 ms
ROWS = (64, 128, 4, 3)
COLUMNS = (64, 64, 4, 2)


MAX_HEAD_DIM = 256  # a q tile of 64 × 256 still fits a multiprocessor's registers
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available(device: torch.device) -> bool:
    """Can the kernels run for tensors on ``device``: a CUDA device with Triton installed, or
    any device under Triton's interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def serves(q: torch.Tensor) -> bool:
    """Can the kernels take these queries: ``available`` on their device, a head size of at most
    MAX_HEAD_DIM, a float dtype they read."""
    return available(q.device) and q.shape[-1] <= MAX_HEAD_DIM and q.dtype in DTYPES


if triton is not None:

    @triton.jit
    def _row_lse(Q, K, GID, LSE, T, H, REP, D, scale, sqb, sqh, sqt, skb, skh, skt, sgb, slb, slh,
                 CAUSAL: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """LSE[b, h, q] = log Σ_k exp(scale · q·k) over the keys query q sees (+inf if none)."""
        m0 = tl.program_id(0) * BM
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        rows = m0 + tl.arange(0, BM)
        dims = tl.arange(0, DP)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :],
                    mask=(rows[:, None] < T) & (dims[None, :] < D), other=0.0)
        kbase = K + b * skb + (h // REP) * skh
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        end = T
        if CAUSAL:
            end = tl.minimum(T, m0 + BM)
        for n0 in range(0, end, BN):
            cols = n0 + tl.arange(0, BN)
            k = tl.load(kbase + cols[:, None] * skt + dims[None, :], mask=(cols[:, None] < T) & (dims[None, :] < D),
                        other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            ok = (tl.load(GID + b * sgb + cols, mask=cols < T, other=-1) >= 0)[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(LSE + b * slb + h * slh + rows, lse, mask=rows < T)

    @triton.jit
    def _column_sums(Q, K, GID, LSE, OUT, T, H, REP, D, G, scale, sqb, sqh, sqt, skb, skh, skt, sgb, slb, slh,
                     sob, soh, sog, CAUSAL: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     GP: tl.constexpr, PREC: tl.constexpr, P16: tl.constexpr):
        """OUT[b, h, g, k] = Σ over real queries q of group g that see key k of exp(scale · q·k − LSE[q])."""
        n0 = tl.program_id(0) * BN
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        cols = n0 + tl.arange(0, BN)
        dims = tl.arange(0, DP)
        k = tl.load(K + b * skb + (h // REP) * skh + cols[:, None] * skt + dims[None, :],
                    mask=(cols[:, None] < T) & (dims[None, :] < D), other=0.0)
        key_ok = (tl.load(GID + b * sgb + cols, mask=cols < T, other=-1) >= 0)[None, :]
        qbase = Q + b * sqb + h * sqh
        acc = tl.zeros([GP, BN], tl.float32)
        start = 0
        if CAUSAL:
            start = (n0 // BM) * BM
        for m0 in range(start, T, BM):
            rows = m0 + tl.arange(0, BM)
            q = tl.load(qbase + rows[:, None] * sqt + dims[None, :], mask=(rows[:, None] < T) & (dims[None, :] < D),
                        other=0.0)
            g = tl.load(GID + b * sgb + rows, mask=rows < T, other=-1)
            lse = tl.load(LSE + b * slb + h * slh + rows, mask=rows < T, other=float("inf"))
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            ok = key_ok & (g >= 0)[:, None]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            if P16:  # 16-bit models: the probabilities rounded as the model's own eager weights are
                onehot = (g[None, :] == tl.arange(0, GP)[:, None]).to(Q.dtype.element_ty)  # [GP, BM]
                acc += tl.dot(onehot, p.to(Q.dtype.element_ty))
            else:
                onehot = (g[None, :] == tl.arange(0, GP)[:, None]).to(tl.float32)
                acc += tl.dot(onehot, p, input_precision="tf32x3")
        groups = tl.arange(0, GP)
        tl.store(OUT + b * sob + h * soh + groups[:, None] * sog + cols[None, :], acc,
                 mask=(groups[:, None] < G) & (cols[None, :] < T))


def group_columns(q: torch.Tensor, k: torch.Tensor, gid: torch.Tensor, n_groups: int, scale: float,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(by_group [B, H, G, T], lse [B, H, T]), float32: what the real queries of each group pay
    each key, summed, and each real query's log-sum-exp; ``q`` [B, H, T, d], ``k`` [B, Hkv, T, d]
    (GQA: H a multiple of Hkv), ``gid`` [B, T] each position's group (-1: a pad, which no query
    sees and which pays nothing)."""
    B, H, T, D = q.shape
    if n_groups > GROUPS_PAD:
        raise ValueError(f"at most {GROUPS_PAD} token groups, not {n_groups}")
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    gid = gid.to(torch.int32).contiguous()
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, n_groups, T, dtype=torch.float32, device=q.device)
    wide = q.dtype == torch.float32
    prec = "tf32x3" if wide else "tf32"  # 16-bit inputs: products exact in the fp32 sum
    strides = (*q.stride()[:3], *k.stride()[:3], gid.stride(0), *lse.stride()[:2])
    dp, rep = max(16, triton.next_power_of_2(D)), H // k.shape[1]
    bm, bn, warps, stages = ROWS
    _row_lse[(triton.cdiv(T, bm), B * H)](q, k, gid, lse, T, H, rep, D, scale, *strides, CAUSAL=causal, DP=dp, BM=bm,
                                          BN=bn, PREC=prec, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = COLUMNS
    _column_sums[(triton.cdiv(T, bn), B * H)](q, k, gid, lse, out, T, H, rep, D, n_groups, scale, *strides,
                                              *out.stride()[:3], CAUSAL=causal, DP=dp, BM=bm, BN=bn, GP=GROUPS_PAD,
                                              PREC=prec, P16=not wide, num_warps=warps, num_stages=stages)
    return out, lse
