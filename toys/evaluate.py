"""Accuracy of a VLM on answered examples with plain greedy ``generate``, overall and per question type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from attnflow.probes.answers import accuracy_by_type, answer_matches
from attnflow.probes.inputs import Example, InputError, encode


def blank_like(image: Image.Image | str | Path) -> Image.Image:
    """An image of the same size in one colour, the per-channel median (the background, here)."""
    with Image.open(image) if isinstance(image, (str, Path)) else image.copy() as im:
        rgb = np.asarray(im.convert("RGB"))
    fill = np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(fill, rgb.shape).copy())


def evaluate(model: PreTrainedModel, processor: ProcessorMixin, examples: Sequence[Example], *,
             blank: bool = False, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy of greedily generated answers (``probes.answers.answer_matches``, special
    tokens stripped).

    ``blank=True`` replaces every image by a blank one of the same size, to measure how much the
    model relies on the image. Returns ``{"accuracy", "n", "blank", "per_type": {type: accuracy},
    "n_per_type": {type: n}}``; examples without a type count under ``"all"``.
    """
    if not examples:
        raise InputError("evaluate needs at least one example")
    unanswered = [i for i, e in enumerate(examples) if e.answer is None]
    if unanswered:
        raise InputError(f"{len(unanswered)} example(s) have no answer to score, the first is example {unanswered[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    tok = processor.tokenizer
    max_new = 1 + max(len(tok(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
    scored: list[tuple[str | None, bool]] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        if blank:
            chunk = [replace(e, images=[blank_like(im) for im in e.images]) for e in chunk]
        batch = encode(processor, chunk)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        scored += [(e.qtype, answer_matches(a, e.answer)) for e, a in zip(chunk, answers)]
    accuracy, per_type, n_per_type = accuracy_by_type(scored)
    return {"accuracy": accuracy, "n": len(examples), "blank": blank, "per_type": per_type, "n_per_type": n_per_type}
