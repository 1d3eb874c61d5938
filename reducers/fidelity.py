"""What a reduced model's outputs are worth against the unreduced one's: greedy generations,
next-token KL and top-1 agreement, and task accuracy (probes.answers' one matching rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnflow import parallel
from attnflow.probes.answers import accuracy_by_type, answer_matches
from attnflow.probes.inputs import Example, encode


def encode_batches(processor: Any, examples: list[Example], batch_size: int, device: torch.device) -> list[dict]:
    """``examples`` encoded in left-padded batches (what reducers need) on ``device``; the
    tokenizer's padding side is restored afterwards."""
    tok = getattr(processor, "tokenizer", processor)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return [encode(processor, examples[i:i + batch_size]).to(device) for i in range(0, len(examples), batch_size)]
    finally:
        tok.padding_side = side


@dataclass
class Generated:
    """Greedy generations of a list of prompts."""

    first_logits: torch.Tensor  # [n, V] logits of the first generated token
    tokens: torch.Tensor  # [n, new_tokens] generated ids (pad after EOS)
    texts: list[str]


def generate_greedy(model: nn.Module, batches: list[dict], tok: Any, new_tokens: int) -> Generated:
    """Greedy ``generate`` of ``new_tokens`` tokens for every batch (under whatever schedule
    is applied), with the first token's logits and the decoded texts. Under a launcher each rank
    generates its block of the batches and every rank gets all of them (attnflow.parallel)."""
    parts = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in parallel.world().share(len(batches)):
        batch = batches[i]
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=pad)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        new = torch.nn.functional.pad(new, (0, new_tokens - new.shape[1]), value=pad)
        parts.append((out.logits[0].float().cpu(), new.cpu(), tok.batch_decode(new, skip_special_tokens=True)))
    logits, tokens, texts = zip(*parallel.concat(parts))
    return Generated(torch.cat(logits), torch.cat(tokens), [t for batch in texts for t in batch])


def per_prompt_fidelity(full: torch.Tensor, reduced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, KL(full || reduced) (nats, float64) and top-1 agreement (bool) of next-token logits [n, V]."""
    log_full, log_red = full.double().log_softmax(-1), reduced.double().log_softmax(-1)
    kl = (log_full.exp() * (log_full - log_red)).sum(-1).clamp_min(0)
    return kl, full.argmax(-1) == reduced.argmax(-1)


def next_token_fidelity(full: torch.Tensor, reduced: torch.Tensor) -> dict[str, float]:
    """Mean KL(full || reduced) (nats) and top-1 agreement of next-token logits [n, V]."""
    kl, agree = per_prompt_fidelity(full, reduced)
    return {"kl": float(kl.mean()), "agreement": float(agree.double().mean())}


def answers_right(run: Generated, examples: list[Example]) -> list[bool | None]:
    """Per example, whether its generation matches its answer (None: it has none)."""
    return [None if ex.answer is None else answer_matches(text, ex.answer) for ex, text in zip(examples, run.texts)]


def answer_accuracy(run: Generated, examples: list[Example]) -> tuple[float | None, dict[str, float]]:
    """Share of the examples with answers whose generation matches the answer
    (``probes.answers.answer_matches``), overall and per question type; None without answers."""
    overall, per_type, _ = accuracy_by_type((ex.qtype, answer_matches(text, ex.answer))
                                            for ex, text in zip(examples, run.texts) if ex.answer is not None)
    return overall, per_type
