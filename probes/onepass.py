"""One attention pass while recording: the statistics and the layer's output from the same probabilities.

Under SDPA the weights are never materialised, so a recorder must compute them itself; computing
them beside SDPA doubles each layer's QKᵀ and softmax. Inside ``one_pass`` the decoder layers'
SDPA call is routed (attnflow.compat.sdpa_routed) to ``attention_stats`` with v: per query chunk
it computes the probabilities once, reduces them and multiplies them into v (memory O(chunk·T)).
The layer's attention output is then that product (float32, cast to the model's dtype), and the
call's second output, where eager attention returns its weights, is the dict of statistics the
recorder reads through nnsight. Other modules' calls (a vision tower's, a decode step's) go to
SDPA unchanged. On a GPU with Triton the statistics come from attnflow.probes.fused instead, which
leaves the output to the model's own SDPA call (faster there than one fp32 pass over the probabilities).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnflow import compat
from attnflow.probes.stats import Layout, attention_stats


@dataclass
class Pass:
    """What the routed call needs: the batch layout and, per attention module, its layer index."""

    layout: Layout
    layers: dict[nn.Module, int]
    full_layers: set[int] = field(default_factory=set)
    chunk: int = 64
    rank_max_tokens: int = 256
    fused: bool = True  # the Triton kernels where they serve (attnflow.probes.fused)


def _route(state: Pass, sdpa: Any, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
           **kwargs: Any) -> tuple[torch.Tensor, Any]:
    layer = state.layers.get(module)
    if layer is None or query.shape[2] != key.shape[2] or kwargs.get("position_bias") is not None or dropout:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    stats = attention_stats(state.layout, q=query, k=key, v=value, mask=attention_mask, scaling=scaling,
                            softcap=kwargs.get("softcap"), chunk=state.chunk, keep_full=layer in state.full_layers,
                            rank_max_tokens=state.rank_max_tokens, fused=state.fused)
    if "output" not in stats:  # the fused kernels computed statistics only: the model's SDPA gives the output
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0], stats
    output = stats.pop("output").to(query.dtype).transpose(1, 2).contiguous()  # [B, T, H, d], as SDPA returns it
    return output, stats


@contextmanager
def one_pass(state: Pass) -> Iterator[None]:
    """Within the block, the attention of ``state.layers`` computes its output and its statistics at once."""
    with compat.sdpa_routed(lambda sdpa, *args, **kwargs: _route(state, sdpa, *args, **kwargs)):
        yield
