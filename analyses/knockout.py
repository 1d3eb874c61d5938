"""Causal exit: cut attention from non-visual queries to visual keys from layer l on.

For each l = 0..L-1 the model runs with the edges (non-visual query -> visual key) removed
in every layer >= l (attention knockout, Zhang et al., arXiv 2411.18620, applied to all later
layers as an exit criterion), and the next-token distribution at the last prompt
position is compared with the unmodified run: KL(full || cut), the |relative change| of the
answer token's probability (the greedy token when there are no answers), and accuracy when
answers exist. The cut is an additive mask handed to the attention module through a
forward pre-hook on its ``attention_mask`` keyword (eager and SDPA both take it); the hooks
are removed afterwards, so the user's model is left as it was.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import xarray as xr
from torch import nn

from attnflow import compat, parallel
from attnflow.analyses.batches import aligned_batches
from attnflow.analyses.exits import first_stable
from attnflow.analyses.thresholds import Thresholds
from attnflow.errors import UserError
from attnflow.probes import adapters
from attnflow.probes.inputs import Example


class KnockoutError(UserError, RuntimeError):
    """The model's attention modules do not take the mask the knockout needs."""


def cut_mask(mask: torch.Tensor | None, blocked: torch.Tensor, dtype: torch.dtype,
             causal: bool) -> torch.Tensor:
    """``mask`` (None, bool "may attend", or float additive) with the ``blocked`` [B, 1, T, T]
    edges removed; a new tensor of the same kind (a float additive one for None)."""
    T = blocked.shape[-1]
    if mask is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=blocked.device)
        allowed = allowed.tril() if causal else allowed
        return torch.zeros((), dtype=dtype, device=blocked.device).masked_fill(
            ~(allowed & ~blocked), torch.finfo(dtype).min)
    if mask.shape[-2:] != (T, T):
        raise KnockoutError(f"attention mask of shape {tuple(mask.shape)} does not cover the "
                            f"{T} positions of a plain forward (a cache or packing is in use?)")
    if mask.dtype == torch.bool:
        return mask & ~blocked
    return torch.where(blocked, torch.finfo(mask.dtype).min, mask)


@contextmanager
def cut_visual(model: nn.Module, layers: Iterable[int], queries: torch.Tensor,
               keys: torch.Tensor) -> Iterator[None]:
    """Within the block, layers ``layers`` of ``model`` do not let ``queries`` [B, T] attend
    to ``keys`` [B, T] (both boolean, batch positions); layers without softmax attention (a
    hybrid model's linear attention) are left as they are."""
    blocked = (queries[:, None, :, None] & keys[:, None, None, :])
    causal = adapters.adapter_for(model).causal

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if compat.ATTENTION_MASK not in kwargs:
            raise KnockoutError(f"{type(module).__name__} is called without an attention_mask keyword; "
                                "attnflow cannot cut its attention")
        hidden = kwargs.get(compat.HIDDEN_STATES, args[0] if args else None)
        cut = cut_mask(kwargs[compat.ATTENTION_MASK], blocked.to(hidden.device), hidden.dtype, causal)
        return args, {**kwargs, compat.ATTENTION_MASK: cut}

    attention = adapters.attention_modules(model)
    handles = [attention[l].register_forward_pre_hook(hook, with_kwargs=True)
               for l in layers if attention[l] is not None]  # linear-attention layers have no edges to cut
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _last_logprobs(model: nn.Module, inputs: dict[str, Any], last: torch.Tensor) -> torch.Tensor:
    """log-softmax of the next-token logits at each sample's ``last`` position, [B, V]."""
    T = inputs["input_ids"].shape[1]
    extra = {}
    if bool((last == T - 1).all()) and "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # left padding: the last position is the same for all
    logits = model(**inputs, **extra).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    picked = logits[:, -1] if extra else logits[rows, last.to(logits.device)]
    return torch.log_softmax(picked.float(), -1).cpu()


def answer_token_ids(processor: Any, answers: np.ndarray) -> np.ndarray | None:
    """First token id of each answer (None when the trace has no answers; -1 where empty)."""
    if not any(str(a) for a in answers):
        return None
    tok = getattr(processor, "tokenizer", processor)
    ids = [tok(str(a), add_special_tokens=False)["input_ids"] if str(a) else [] for a in answers]
    return np.array([i[0] if i else -1 for i in ids])


def _exit(per_sample: np.ndarray, scored: np.ndarray, tol: float) -> int | None:
    """Exit layer from a per-sample metric [L, S] over the ``scored`` samples (None if none)."""
    if not scored.any():
        return None
    return first_stable(per_sample[:, scored].mean(1) < tol)


def knockout(model: nn.Module, processor: Any, trace: xr.Dataset, examples: list[Example],
             th: Thresholds, batch_size: int = 8) -> dict[str, Any]:
    """Knockout curves (index l: cut from layer l on) and the exit layer they give; under a
    launcher each rank runs its block of the batches and all get the whole result.

    The answer-probability metric follows Zhang et al.: the relative change of the answer's
    first token, over the samples the unmodified model answers correctly (all samples, with
    the greedy token as the answer, when the trace has no answers).
    """
    L = len(adapters.decoder_layers(model))
    S = trace.sizes["sample"]
    answers = answer_token_ids(processor, trace["answer"].values)
    kl, rel, correct = (np.zeros((L, S)) for _ in range(3))
    base_correct = np.zeros(S, dtype=bool)
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in aligned_batches(trace, processor, examples, batch_size):
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
            base = _last_logprobs(model, inputs, batch.last)
            rows = np.arange(len(batch.samples))
            greedy = base.argmax(-1).numpy()
            target = greedy if answers is None else answers[batch.samples]
            base_correct[batch.samples] = greedy == target
            p_base = base.exp()[rows, np.maximum(target, 0)].numpy()
            queries = (batch.real & ~batch.visual).to(device)
            for l in range(L):
                with cut_visual(model, range(l, L), queries, batch.visual.to(device)):
                    cut = _last_logprobs(model, inputs, batch.last)
                kl[l, batch.samples] = (base.exp() * (base - cut)).sum(-1).numpy()
                p_cut = cut.exp()[rows, np.maximum(target, 0)].numpy()
                rel[l, batch.samples] = np.abs(p_cut - p_base) / np.maximum(p_base, 1e-12)
                correct[l, batch.samples] = cut.argmax(-1).numpy() == target
    kl, rel, correct, base_correct = (parallel.fill(a) for a in (kl, rel, correct, base_correct))
    everyone = np.ones(S, dtype=bool)
    scored = {"kl": everyone, "answer_prob": base_correct}
    per_sample = {"kl": kl, "answer_prob": rel}
    curves = {"kl": kl.mean(1),
              "answer_prob": rel[:, base_correct].mean(1) if base_correct.any() else np.full(L, np.nan)}
    if answers is not None:
        curves["accuracy"] = correct.mean(1)
    metric = th.knockout_metric
    qtypes = trace["qtype"].values.astype(str)
    by_qtype = {str(q): _exit(per_sample[metric], scored[metric] & (qtypes == q), th.knockout_tol)
                for q in sorted(set(qtypes)) if q}
    return {"curves": curves, "exit_layer": _exit(per_sample[metric], scored[metric], th.knockout_tol),
            "exit_by_qtype": by_qtype, "scored_samples": int(scored[metric].sum()),
            "base_accuracy": float(base_correct.mean()) if answers is not None else None}
