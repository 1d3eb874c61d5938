"""The one shortening mechanism every reducer op shares: decoder-layer hooks that really
drop tokens.

A planner decides, for each call of each decoder layer, a ``Cut``: which slots of the incoming
hidden states the layer processes, which of its keys are filler nobody may attend, and which
slots continue to the next layer. The hooks here only execute cuts: a forward pre-hook (with
kwargs) returns *new* args/kwargs with the hidden states, the position embeddings (cos/sin,
sequence dim -2, any leading dims such as M-RoPE's kept), ``position_ids`` and the 4-D
attention mask (bool or additive) gathered per sample; a forward hook writes the layer output
back into the continuing residual stream when some tokens bypassed the layer. Nothing is
masked instead of dropped, and no tensor passed in is edited in place. Each layer's KV cache
therefore only ever holds the tokens that layer processed, so ``generate`` works unchanged;
original positions are kept because the position tensors are gathered, never rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attnflow import compat


@dataclass
class Cut:
    """How one call of one decoder layer is shortened; every tensor is [B, ·] per sample.

    ``take`` [B, R]: slots of the incoming hidden states the layer processes; None: all of
    them, in order (a layer that changes nothing since the previous cut).
    ``rows`` [B, R]: their indices into the call's position tensors and mask rows; None: all
    of them, in order (a decode step, whose new tokens all run).
    ``row_keys`` [B, R]: the same tokens' indices into the mask's key dim.
    ``cols`` [B, C]: indices into the mask's key dim of the layer's keys (cache included).
    ``blocked`` [B, C]: filler keys (kept only to keep the batch rectangular): never attended.
    ``keep`` [B, A] or None: incoming slots that continue after the layer; None means
    exactly the processed ones (``take``), so the layer output continues as it is.
    ``put`` [B, R] and ``write`` [B, R]: where in ``keep`` each processed slot's output goes,
    and whether it is written (filler outputs are not).
    ``states`` [B, N, D] or None: incoming hidden states to use instead of the layer's input (a
    step that rewrites the states of the tokens it keeps: recycling).
    ``appended`` or None: a decode cut kept for a whole generation: ``cols`` and ``blocked`` cover the
    cached prompt keys only, and the mask's key columns from ``appended`` on (the generated tokens)
    follow as the model gives them. ``prefix`` holds the prompt columns of the mask once gathered:
    no decode step changes them, so each step pays one concatenation, not a gather per layer group.
    """

    take: Tensor | None
    rows: Tensor | None
    row_keys: Tensor
    cols: Tensor
    blocked: Tensor
    keep: Tensor | None = None
    put: Tensor | None = None
    write: Tensor | None = None
    states: Tensor | None = None
    appended: int | None = None
    prefix: Tensor | None = None


Planner = Callable[[int, Tensor, bool], "Cut | None"]  # (layer, hidden states, a mask was passed) -> cut


def gather_seq(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """``x`` gathered along sequence dim ``dim`` with per-sample indices ``idx`` [B, R]; the
    batch dim is the one just before ``dim`` and may be 1 (broadcast)."""
    dim = dim % x.dim()
    bdim = dim - 1
    shape = list(x.shape)
    shape[bdim] = idx.shape[0]
    x = x.expand(shape)
    view = [1] * x.dim()
    view[bdim], view[dim] = idx.shape
    index_shape = list(shape)
    index_shape[dim] = idx.shape[1]
    return x.gather(dim, idx.to(x.device).view(view).expand(index_shape))


def _cut_mask(mask: Tensor | None, cut: Cut, use_bool: bool, dtype: torch.dtype) -> Tensor | None:
    """The layer's 4-D mask: HF's rows and key columns gathered per sample, filler keys
    blocked (each filler row keeps itself so no row is empty); None stays None when SDPA's
    causal flag still says everything."""
    if cut.appended is not None and mask is not None:
        return _appended_mask(mask, cut, use_bool, dtype)
    any_blocked = bool(cut.blocked.any())
    if mask is None and not any_blocked:
        return None
    if mask is None:
        allowed = cut.cols[:, None, None, :] <= cut.row_keys[:, None, :, None]
        mask = allowed if use_bool else torch.zeros(allowed.shape, dtype=dtype).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    else:
        if mask.dim() != 4:
            raise ValueError(f"attnflow reducers need a 4-D attention mask inside the decoder, got {mask.dim()}-D")
        b = cut.cols.shape[0]
        mask = mask.expand(b, *mask.shape[1:])
        if cut.rows is not None:
            rows = cut.rows.to(mask.device)[:, None, :, None].expand(b, mask.shape[1], -1, mask.shape[3])
            mask = mask.gather(2, rows)
        cols = cut.cols.to(mask.device)[:, None, None, :].expand(b, mask.shape[1], mask.shape[2], -1)
        mask = mask.gather(3, cols)
    if any_blocked:
        block = cut.blocked[:, None, None, :] & (cut.cols[:, None, None, :] != cut.row_keys[:, None, :, None])
        block = block.to(mask.device)
        mask = mask & ~block if mask.dtype == torch.bool else mask.masked_fill(block, torch.finfo(mask.dtype).min)
    return mask


def _appended_mask(mask: Tensor, cut: Cut, use_bool: bool, dtype: torch.dtype) -> Tensor:
    """A decode step's mask under an ``appended`` cut: the prompt columns gathered at the generation's
    first step (and again only if the mask's head or row count changes), then the generated ones."""
    b = cut.cols.shape[0]
    mask = mask.expand(b, *mask.shape[1:])
    prefix = cut.prefix
    if prefix is None or prefix.shape[1:3] != mask.shape[1:3]:
        # the prompt columns as any cut gathers them; a row key (-1) that is no column: every filler key blocked
        cached = Cut(take=None, rows=None, row_keys=torch.full_like(cut.cols[:, :1], -1), cols=cut.cols,
                     blocked=cut.blocked)
        prefix = cut.prefix = _cut_mask(mask[..., :cut.appended], cached, use_bool, dtype)
    return torch.cat([prefix, mask[..., cut.appended:]], -1)


def sliced_kwargs(cut: Cut, kwargs: dict[str, Any], dtype: torch.dtype, bool_mask: bool) -> dict[str, Any]:
    """The position embeddings, position ids and attention mask of a decoder layer's ``kwargs``
    cut by ``cut`` (a bool mask under SDPA when ``bool_mask``, else additive in ``dtype``)."""
    pe, ids = kwargs.get(compat.POSITION_EMBEDDINGS), kwargs.get(compat.POSITION_IDS)
    out: dict[str, Any] = {compat.ATTENTION_MASK: _cut_mask(kwargs.get(compat.ATTENTION_MASK), cut, bool_mask, dtype)}
    if pe is not None and cut.rows is not None:
        out[compat.POSITION_EMBEDDINGS] = tuple(gather_seq(t, cut.rows, -2) for t in pe)
    if ids is not None and cut.rows is not None:
        out[compat.POSITION_IDS] = gather_seq(ids, cut.rows, -1)
    return out


class Shortener:
    """Hooks on every decoder layer that execute the ``Cut`` a planner gives for each call."""

    def __init__(self, layers: nn.ModuleList, planner: Planner, *, bool_mask: bool, first: int = 0) -> None:
        """Hooks go on layers ``first`` onwards: the planner cuts no earlier layer, and a hook's mere
        presence costs every call of its module (PyTorch's slow call path)."""
        self.layers, self.planner, self.bool_mask, self.first = layers, planner, bool_mask, first
        self._pending: dict[int, tuple[Cut, Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        # layers share HF's position and mask tensors, and consecutive layers often share a
        # cut: the last (cut, inputs) -> sliced tensors is reused instead of gathered again
        self._memo: tuple[tuple, dict[str, Any]] | None = None

    def attach(self) -> None:
        for i, layer in enumerate(self.layers):
            if i < self.first:
                continue
            self._handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()
        self._memo = None

    def _sliced(self, cut: Cut, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """``sliced_kwargs`` of ``kwargs``, reused while the cut and HF's tensors are the same objects."""
        pe, ids = kwargs.get(compat.POSITION_EMBEDDINGS), kwargs.get(compat.POSITION_IDS)
        key = (cut, *(pe or (None, None)), ids, kwargs.get(compat.ATTENTION_MASK))
        if self._memo is not None and all(a is b for a, b in zip(self._memo[0], key)):
            return self._memo[1]
        out = sliced_kwargs(cut, kwargs, dtype, self.bool_mask)
        self._memo = (key, out)
        return out

    def _pre(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            positional = bool(args)
            hidden = args[0] if positional else kwargs[compat.HIDDEN_STATES]
            cut = self.planner(i, hidden, kwargs.get(compat.ATTENTION_MASK) is not None)
            if cut is None:
                return None
            hidden = hidden if cut.states is None else cut.states
            new_kwargs = {**kwargs, **self._sliced(cut, kwargs, hidden.dtype)}
            new_hidden = hidden if cut.take is None else gather_seq(hidden, cut.take, 1)
            self._pending[i] = (cut, hidden)
            if positional:
                return (new_hidden, *args[1:]), new_kwargs
            new_kwargs[compat.HIDDEN_STATES] = new_hidden
            return args, new_kwargs
        return hook

    def _post(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Any):
            cut, incoming = self._pending.pop(i, (None, None))
            if cut is None or cut.keep is None:
                return None
            out = compat.layer_hidden(output)
            merged = gather_seq(incoming, cut.keep, 1)
            put = cut.put[..., None].expand(-1, -1, merged.shape[-1])
            merged = merged.scatter(1, put, torch.where(cut.write[..., None], out, merged.gather(1, put)))
            return (merged, *output[1:]) if isinstance(output, tuple) else merged
        return hook
