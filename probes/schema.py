"""The Trace contract (probes -> analyses): names, dims and version of the xarray.Dataset.

A Trace is one ``xarray.Dataset`` per recording, saved as ``.nc`` (h5netcdf). Positions are
left-aligned per sample (``pos`` 0 is each sample's first real token); positions past a
sample's length have modality ``pad`` and NaN statistics. Layers are numbered 0..L-1 as in
the model's decoder-layer list. A denotes a layer's post-softmax attention (head-resolved).

Variables (summary level, O(L*H*n) memory per sample):

- ``received(sample, layer, head, pos)``: mean of A[q, pos] over the non-pad queries q
  that can see key ``pos`` (causal: q >= pos; bidirectional: all).
- ``n_seen(sample, layer, pos)``: how many queries see key ``pos`` (the uniform-attention
  baseline of ``received`` is ``mean_q 1/|visible(q)|`` and is stored as ``uniform``).
- ``uniform(sample, layer, pos)``: what ``received`` would be under uniform attention.
- ``last_row(sample, layer, head, pos)``: A[last prompt position, pos] (the last non-pad,
  non-answer position: the one that predicts the answer).
- ``flow(sample, layer, head, src, dst)``: mean over queries of modality ``src`` of the
  summed attention they pay to keys of modality ``dst`` (NaN when the sample has no
  query of modality ``src``).
- ``entropy(sample, layer, head, pos)``: entropy (nats) of query ``pos``'s attention row.
- ``arank(sample, layer, head)``: numerical rank of the causal attention map with its
  diagonal zeroed (gamma-MoD ARank); NaN when the sequence exceeds ``rank_max_tokens``.
- ``update_cos(sample, layer, pos)``: cos(layer input, layer output) of the residual stream.
- ``norm``, ``max_abs``, ``argmax_dim``, ``median_abs``, ``rms`` ``(sample, layer, pos)``:
  of each layer's output hidden state (pre final norm).
- ``topk_abs``, ``topk_dim`` ``(sample, layer, rank, pos)``: the 3 largest |x| of each output
  hidden state and their dimensions (a token can carry several massive dimensions).
- ``resid_last(sample, depth, hidden)``: the residual stream at the last prompt position,
  depth 0 = input of layer 0 (embeddings) ... depth L = output of layer L-1 (pre final norm).
- full level adds ``attn(sample, layer_full, head, q, k)`` for the chosen layers.

Coordinates: ``modality(sample, pos)`` in MODALITIES; ``token(sample, pos)`` (string),
``token_id(sample, pos)``; ``image``, ``patch_row``, ``patch_col`` ``(sample, pos)``
(-1 for non-visual); ``length(sample)``; ``answer(sample)`` and ``qtype(sample)``
(empty when the input has none); ``layer``, ``head``, ``src``/``dst`` (= GROUPS).

Attrs: SCHEMA_VERSION under ``attnflow_trace``; ``model_path``, ``model_type``,
``num_layers``, ``num_heads``, ``num_kv_heads``, ``hidden_size``, ``attn_implementation``,
``dtype``, ``fingerprint`` (sha256 of the config JSON), ``attnflow_version``, ``level``,
``causal`` (0/1), ``inputs_path``, ``inputs_sha256``, ``layers_full`` (JSON list).
"""

from __future__ import annotations

SCHEMA_VERSION = 1
MODALITIES: tuple[str, ...] = ("bos", "system", "text", "visual", "answer", "pad")
GROUPS: tuple[str, ...] = ("bos", "system", "text", "visual", "answer")
NO_PATCH = -1
