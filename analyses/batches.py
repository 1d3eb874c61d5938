"""Re-encode a trace's inputs for the analyses that run the model, aligned with the trace.

Knockout and the attention maps for rollout/flow run the model again on the trace's inputs.
Each batch is encoded with the model's processor exactly as ``record`` does (without
appended answers: the interventions read the next-token distribution at the last prompt
position), and its token ids are checked against the trace's, so that inputs other than
the recorded ones are an error rather than silently wrong numbers. The trace's modality
labels are carried into batch coordinates (the trace is left-aligned, batches are padded
by the processor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import xarray as xr

from attnflow import parallel
from attnflow.analyses.validate import TraceMismatchError
from attnflow.probes.inputs import Example, as_examples, encode, file_sha256


@dataclass
class Batch:
    """One encoded batch with, per position, what the trace says it is."""

    samples: np.ndarray  # trace sample indices [B]
    inputs: dict[str, Any]  # processor output, ready for model(**inputs)
    real: torch.Tensor  # [B, T] bool, non-pad
    visual: torch.Tensor  # [B, T] bool, visual tokens
    last: torch.Tensor  # [B] index of the last real position
    positions: list[np.ndarray]  # per sample, batch indices of its real positions (trace pos order)


def trace_examples(trace: xr.Dataset, inputs: str | Path | Iterable[Example | dict]) -> list[Example]:
    """The examples of ``inputs``, checked to be as many as the trace's samples and, for a
    file, to be the file the trace was recorded from."""
    recorded = trace.attrs.get("inputs_sha256", "")
    if isinstance(inputs, (str, Path)) and recorded and file_sha256(inputs) != recorded:
        raise TraceMismatchError(f"inputs file {str(inputs)!r} is not the one the trace was recorded "
                                 f"from ({trace.attrs.get('inputs_path', '?')!r}, {recorded})")
    examples = as_examples(inputs)
    if len(examples) != trace.sizes["sample"]:
        raise TraceMismatchError(f"{len(examples)} inputs but the trace has {trace.sizes['sample']} "
                                 "samples: pass the inputs the trace was recorded from")
    return examples


def aligned_batches(trace: xr.Dataset, processor: Any, examples: list[Example],
                    batch_size: int) -> Iterator[Batch]:
    """Encoded batches of ``examples`` whose tokens are checked against the trace's; under a
    launcher only this rank's block of them (attnflow.parallel)."""
    modality = trace["modality"].transpose("sample", "pos").values
    token_id = trace["token_id"].transpose("sample", "pos").values
    starts = range(0, len(examples), batch_size)
    for start in (starts[i] for i in parallel.world().share(len(starts))):
        samples = np.arange(start, min(start + batch_size, len(examples)))
        inputs = encode(processor, [examples[s] for s in samples], with_answer=False)
        ids = inputs["input_ids"]
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(ids)
        real = inputs["attention_mask"].bool()
        visual = torch.zeros_like(real)
        positions = []
        for b, s in enumerate(samples):
            where = np.flatnonzero(real[b].numpy())
            prompt = np.flatnonzero(~np.isin(modality[s], ("pad", "answer")))
            if len(where) != len(prompt) or not np.array_equal(ids[b, where].numpy(), token_id[s, prompt]):
                raise TraceMismatchError(f"input {s} does not encode to the tokens the trace recorded for "
                                         f"sample {s}: pass the inputs and processor of the trace")
            visual[b, where] = torch.as_tensor(modality[s, prompt] == "visual")
            positions.append(where)
        last = torch.tensor([int(p[-1]) for p in positions])
        yield Batch(samples, dict(inputs), real, visual, last, positions)
