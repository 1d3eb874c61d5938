"""How many tokens of each modality each decoder layer processes under a schedule, for the
trace's prompts: the cost model's per-layer counts (reducers.cost.layer_counts, the same
numbers the FLOPs prediction sums) split by modality and averaged over samples.

Only visual tokens are ever removed, so a layer processes every non-visual prompt token
unless the whole layer is skipped. Answer tokens appended for teacher forcing are not part
of the prompt a schedule reduces and are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from attnflow.reducers.cost import layer_counts
from attnflow.reducers.schedule import Schedule

PROMPT_MODALITIES = ("bos", "system", "text", "visual")


def tokens_per_layer(trace: xr.Dataset, schedule: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per prompt modality present in the trace, the mean number of tokens per sample that
    each decoder layer processes under ``schedule``."""
    plan = Schedule.from_dict(schedule)
    modality = trace["modality"].transpose("sample", "pos").values
    present = [m for m in PROMPT_MODALITIES if (modality == m).any()]
    out = {m: np.zeros(plan.num_layers) for m in present}
    for row in modality:
        n = {m: int((row == m).sum()) for m in present}
        counts = layer_counts(plan, sum(n.values()), n.get("visual", 0))
        for layer, c in enumerate(counts):
            for m in present:
                out[m][layer] += c.visual if m == "visual" else (0 if c.bypassed else n[m])
    return {m: v / len(modality) for m, v in out.items()}
