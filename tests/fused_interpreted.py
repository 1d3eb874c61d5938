"""Run by tests/test_fused.py in a subprocess with TRITON_INTERPRET=1 (Triton reads it when the
kernels are defined, at import): the fused kernels, run by Triton's interpreter on the CPU,
against the torch path and the HF eager oracle. Not collected on its own (no test_ prefix)."""

import os

import numpy as np
import pytest
import torch

from attnflow.probes import fused
from attnflow.probes.record import record
from attnflow.toys import tiny

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_fused.py"
FIELDS = ("received", "uniform", "n_seen", "last_row", "flow", "resid_last", "update_cos", "rms")
# families whose masks at these lengths are plain causal/bidirectional ones (the kernels must serve them)
PLAIN = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "internvl", "llama", "qwen2", "mistral", "bert")


def _counted(monkeypatch) -> list[int]:
    calls = []
    real = fused.group_columns

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "group_columns", counting)
    return calls


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_fused_statistics_equal_the_torch_path(family, monkeypatch):
    model, processor = tiny.build(family, attn_implementation="sdpa")
    examples = tiny.sample_prompts(family)  # several lengths: one padded batch
    # rank_max_tokens=0: no ARank, whose full maps the kernels do not make; chunk=7: many torch chunks
    torch_path = record(model, examples, processor=processor, batch_size=len(examples), chunk=7, rank_max_tokens=0,
                        fused=False, progress=False)
    calls = _counted(monkeypatch)
    kernels = record(model, examples, processor=processor, batch_size=len(examples), chunk=7, rank_max_tokens=0,
                     progress=False)
    if family in PLAIN:
        assert len(calls) == sum(torch_path.has_attention.values), "the kernels did not serve every layer"
    for name in FIELDS:
        np.testing.assert_allclose(kernels[name].values, torch_path[name].values, atol=1e-5, err_msg=name)


# float16 stands for the 16-bit branch: Triton's interpreter computes bfloat16 loads wrongly (on an
# H200 the bfloat16 kernels agree with the torch path to 6e-9 at layer 0, benchmarks/results/gpu-h200.md)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [((64, 128, 4, 3), (64, 64, 4, 2)), ((32, 64, 4, 2), (64, 32, 4, 2))])
def test_group_columns_by_hand(dtype, tiles, monkeypatch):
    """Column sums and log-sum-exp of a padded GQA batch with a head size that is no power of two,
    with query and key tiles of equal and of different sizes (the causal loop bounds)."""
    monkeypatch.setattr(fused, "ROWS", tiles[0])
    monkeypatch.setattr(fused, "COLUMNS", tiles[1])
    torch.manual_seed(0)
    B, H, Hkv, T, D, G = 2, 4, 2, 70, 24, 5
    q, k = torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=1e-2)  # bf16 probabilities
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :9] = False
    gid = torch.randint(0, G, (B, T)).masked_fill(~valid, -1)
    for causal in (True, False):
        got, lse = fused.group_columns(q, k, gid, G, D ** -0.5, causal)
        s = q.float() @ k.float().repeat_interleave(H // Hkv, 1).transpose(-1, -2) * D ** -0.5
        vis = valid[:, None, None, :] & valid[:, None, :, None]
        if causal:
            vis = vis & torch.ones(T, T, dtype=torch.bool).tril()
        s = s.masked_fill(~vis, float("-inf"))
        onehot = torch.nn.functional.one_hot(gid.clamp(min=0), G).float() * valid[..., None]
        want = onehot[:, None].transpose(-1, -2) @ torch.nan_to_num(s.softmax(-1))
        torch.testing.assert_close(got, want, **tol)
        real = valid[:, None].expand_as(lse)
        torch.testing.assert_close(lse[real], torch.logsumexp(s, -1)[real], atol=1e-5, rtol=1e-5)
