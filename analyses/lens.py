"""Logit lens on the trace's last-position residual stream (nostalgebraist 2020).

p^d = softmax(W_U · FinalNorm(x^d_last)) at every depth d (d = 0: embeddings, d = L: the
last layer's output before the final norm, so that p^L is the model's own next-token
distribution). The final norm is applied explicitly: HF's last hidden state is already
normed and the others are not (transformers 5.x's ``output_hidden_states``). Tracked token: the answer's first token
when the trace has answers, else the model's greedy token; the exit depth is the first one
from which the greedy token is the lens' top-1 in at least 1 - ``lens_tol`` of the samples
at every later depth (the answer can be read out there, so later layers need no image).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from attnflow import parallel
from attnflow.analyses.exits import first_stable
from attnflow.analyses.knockout import answer_token_ids
from attnflow.analyses.thresholds import Thresholds
from attnflow.probes import adapters


def lens_logprobs(model: nn.Module, resid: np.ndarray) -> torch.Tensor:
    """log p^d for residual states ``resid`` [S, D, hidden]: [S, D, V]."""
    norm, unembed = adapters.final_norm(model), adapters.unembedding(model)
    if unembed is None:
        raise ValueError(f"{model.config.model_type} has no unembedding: the logit lens does not apply")
    weight = next(unembed.parameters())
    x = torch.as_tensor(resid).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        logits = unembed(norm(x) if norm is not None else x)
    return torch.log_softmax(logits.float(), -1).cpu()


def logit_lens(model: nn.Module, trace: xr.Dataset, processor: Any, th: Thresholds,
               chunk: int = 16) -> dict[str, Any]:
    """Lens curves (per layer l: the output of layer l) and the exit depth; samples go
    through the unembedding ``chunk`` at a time (an [S, L+1, vocab] array can be GBs), read
    from the trace one chunk at a time too (it may be dask-backed), and under a launcher each
    rank takes its block of the chunks."""
    resid = trace["resid_last"].transpose("sample", "depth", "hidden")
    answers = answer_token_ids(processor, trace["answer"].values) if processor is not None else None
    prob, top1, hit = [], [], []
    starts = range(0, resid.shape[0], chunk)
    for start in (starts[i] for i in parallel.world().share(len(starts))):
        logp = lens_logprobs(model, resid[start:start + chunk].values)
        greedy = logp[:, -1].argmax(-1)
        target = greedy if answers is None else torch.as_tensor(np.maximum(answers[start:start + chunk], 0))
        prob.append(logp[torch.arange(logp.shape[0]), :, target].exp().numpy())  # [s, L + 1]
        top1.append((logp.argmax(-1) == greedy[:, None]).numpy())
        hit.append((logp.argmax(-1) == target[:, None]).numpy())
    prob, top1, hit = (np.concatenate(parallel.concat(a)).astype(float) for a in (prob, top1, hit))
    curves = {"prob": prob.mean(0)[1:], "top1": top1.mean(0)[1:]}
    if answers is not None:
        curves["answer_rank1"] = hit.mean(0)[1:]
    return {"curves": curves, "tracked": "answer" if answers is not None else "greedy",
            "exit_layer": first_stable(top1.mean(0) >= 1.0 - th.lens_tol)}
