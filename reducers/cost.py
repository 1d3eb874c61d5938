"""The cost model: FLOPs, visual-token equivalent and KV-cache bytes of a schedule.

FLOPs of one decoder layer over n tokens (FastV's multiply-accumulate convention, SwiGLU
MLP; FastV, arXiv 2403.06764) with the GQA correction: the q and o projections cost n·d·d_q each,
k and v n·d·d_kv each (d_q = H·d_h, d_kv = H_kv·d_h; with d_q = d_kv = d this is the usual
4nd²), attention 2n²·d_q, the MLP 3ndm. A schedule's predicted ratio is
Σ_l F(n_l) / (L·F(n)) summed over prompts; T_eq = Σ_l n_visual(l) / L (visual tokens a layer
processes); KV bytes = 2·Σ_l n_l·H_kv·d_h·bytes per prompt. Decode cost per new token at
context c: 2d·d_q + 2d·d_kv + 2c·d_q + 3dm per layer. The counts n_l follow the schedule's
semantics exactly (``layer_counts``); the apply tests check them against what really ran.
A ``visual_exit_dynamic`` step's counts depend on each prompt's realised exit layer, known only
after its prefill (``Planner.exit_layers``): ``predict`` takes those layers (``exits``) and is
then the realised cost of the run, by the same formula.

The ratio above counts the decoder layers only (the field's convention). A VLM's forward also runs
its vision tower and projector, which no schedule shortens: ``fixed_share`` counts their share of a
forward (torch.utils.flop_counter, attention included), and ``forward_ratio`` turns a decoder
ratio, with the schedule's own scoring added (``scoring_flops``: DivPrune's pairwise distances, which
the field's formula leaves out), into the whole forward's, the speedup a forward's FLOPs predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from attnflow.probes import adapters
from attnflow.reducers.plan import kept_count
from attnflow.reducers.scores import recycle_counts
from attnflow.reducers.schedule import Schedule, ScheduleError

PREDICTED = ("flops_ratio", "visual_tokens_equivalent", "kv_bytes_ratio", "decode_flops_ratio")


@dataclass(frozen=True)
class Shape:
    """The widths the cost model needs, read from the model's config."""

    num_layers: int
    hidden: int
    q_width: int
    kv_width: int
    mlp: int
    bytes_per_value: int

    @classmethod
    def of(cls, model: nn.Module) -> "Shape":
        d = adapters.dims(model)
        head_dim = getattr(adapters.text_config(model), "head_dim", None) or d["hidden_size"] // d["num_heads"]
        itemsize = next(model.parameters()).element_size()
        return cls(d["num_layers"], d["hidden_size"], d["num_heads"] * head_dim, d["num_kv_heads"] * head_dim,
                   d["intermediate_size"], itemsize)

    def layer_flops(self, n: float) -> float:
        """F(n): multiply-accumulates of one decoder layer over n tokens."""
        d = self.hidden
        return 2 * n * d * self.q_width + 2 * n * d * self.kv_width + 2 * n * n * self.q_width + 3 * n * d * self.mlp

    def decode_flops(self, context: float) -> float:
        """Multiply-accumulates of one decoder layer for one new token attending ``context`` keys."""
        return self.layer_flops(1) - 2 * self.q_width + 2 * context * self.q_width


@dataclass(frozen=True)
class LayerCount:
    """Tokens one layer processes for one prompt (all, and visual among them); ``bypassed``
    when the whole layer is skipped (decode steps bypass it too)."""

    tokens: int
    visual: int
    bypassed: bool = False


def _removable(schedule: Schedule, n_visual: int) -> tuple[int, int]:
    """(protected sinks, removable visual tokens) of a prompt with ``n_visual`` visual tokens."""
    sinks = sum(1 for i in schedule.protect["visual_sinks"] if i < n_visual)
    return sinks, n_visual - sinks


def _stages(schedule: Schedule, removable: int) -> list[tuple[dict[str, Any], int]]:
    """The prune steps in layer order, each with the removable tokens it keeps (of ``removable``, as the
    planner counts them: reducers.plan.kept_count)."""
    steps = sorted(schedule.steps_of("prune_visual"), key=lambda s: s["layer"])
    return [(s, int(kept_count(s["keep"], torch.tensor(removable)))) for s in steps]


def layer_counts(schedule: Schedule, n_tokens: int, n_visual: int, exit_layer: int | None = None) -> list[LayerCount]:
    """Per layer, how many of a prompt's ``n_tokens`` real tokens (``n_visual`` visual) the
    schedule lets the layer process; ``exit_layer``: the prompt's realised exit layer under a
    ``visual_exit_dynamic`` step (required for one, refused otherwise)."""
    sinks, removable = _removable(schedule, n_visual)
    dynamic = schedule.steps_of("visual_exit_dynamic")
    if dynamic:
        start, stop = dynamic[0]["from"], dynamic[0]["to"] or schedule.num_layers
        if exit_layer is None or not start <= exit_layer <= stop:
            raise ScheduleError(f"a visual_exit_dynamic step's cost depends on each prompt: give its realised exit "
                                f"layer in [{start}, {stop}] (Planner.exit_layers after its prefill, "
                                f"reducers.dynamic), got {exit_layer!r}")
    elif exit_layer is not None:
        raise ScheduleError("exit_layer is the realised layer of a visual_exit_dynamic step; this schedule has none")
    else:
        exit_layer = next((s["layer"] for s in schedule.steps_of("visual_exit")), None)
    stages = _stages(schedule, removable)
    skips = {layer: s["tokens"] for s in schedule.steps_of("skip_layers") for layer in s["layers"]}
    out = []
    for layer in range(schedule.num_layers):
        left = removable
        for step, kept in stages:
            if step["layer"] <= layer:
                left = kept
        if exit_layer is not None and layer >= exit_layer:
            left = 0
        tokens, visual = n_tokens - (removable - left), sinks + left
        if skips.get(layer) == "all":
            out.append(LayerCount(0, 0, bypassed=True))
            continue
        if skips.get(layer) == "visual":
            tokens, visual = tokens - left, sinks
        out.append(LayerCount(tokens, visual))
    return out


def scoring_flops(schedule: Schedule, shape: Shape, n_tokens: int, n_visual: int,
                  exit_layer: int | None = None) -> float:
    """Multiply-accumulates a schedule's own scoring adds to one prompt's forward, its terms quadratic in
    the tokens: DivPrune's pairwise cosine distances R²·d among a step's R candidates (arXiv 2503.02175),
    recycling's density-peaks distances P²·d among its P pooled tokens (arXiv 2410.04417), proportional
    attention's similarities n·k·d of a layer-0 step's n tokens to its k kept visual ones (arXiv
    2210.09461). Scores linear in the tokens (attention rows, DART's pivots, [CLS] attention, pooling,
    random) cost less than one layer's projections and are not counted. The field's FLOPs ratios leave
    scoring out (FastV's formula); a forward's prediction (``forward_ratio``) includes it."""
    sinks, removable = _removable(schedule, n_visual)
    if exit_layer is None:
        exit_layer = next((s["layer"] for s in schedule.steps_of("visual_exit")), None)
    left, macs = removable, 0.0
    for step, kept in _stages(schedule, removable):
        if exit_layer is not None and step["layer"] >= exit_layer:
            break
        if step.get("by") == "divprune":
            macs += left * left * shape.hidden
        if step.get("recycle"):
            pooled = recycle_counts(left, kept)[1]
            macs += pooled * pooled * shape.hidden
        if step.get("proportional"):
            macs += (n_tokens - (removable - left)) * (sinks + kept) * shape.hidden
        left = kept
    return macs


def predict(schedule: Schedule, shape: Shape, prompts: list[tuple[int, int]],
            exits: list[int] | None = None) -> dict[str, float]:
    """Predicted cost of ``schedule`` over ``prompts`` [(n_tokens, n_visual)], relative to the
    unreduced model: FLOPs ratio, T_eq, KV-cache bytes (mean per prompt) and their ratio, and
    the per-token decode FLOPs ratio of the first generated token, and the schedule's own scoring
    (``scoring_flops``) relative to the unreduced decoder layers. A schedule with a
    ``visual_exit_dynamic`` step needs ``exits``, each prompt's realised exit layer: the
    result is then the realised cost of that run."""
    if exits is not None and len(exits) != len(prompts):
        raise ValueError(f"{len(exits)} exit layers for {len(prompts)} prompts")
    L = shape.num_layers
    flops = full = kv = kv_full = dec = dec_full = t_eq = scoring = 0.0
    for i, (n, v) in enumerate(prompts):
        exit_layer = None if exits is None else exits[i]
        counts = layer_counts(schedule, n, v, exit_layer)
        flops += sum(shape.layer_flops(c.tokens) for c in counts)
        scoring += scoring_flops(schedule, shape, n, v, exit_layer)
        full += L * shape.layer_flops(n)
        kv += sum(c.tokens for c in counts)
        kv_full += L * n
        dec += sum(shape.decode_flops(c.tokens + 1) for c in counts if not c.bypassed)
        dec_full += L * shape.decode_flops(n + 1)
        t_eq += sum(c.visual for c in counts) / L
    per_token = 2 * shape.kv_width * shape.bytes_per_value
    m = len(prompts)
    return {"flops_ratio": flops / full, "visual_tokens_equivalent": t_eq / m,
            "visual_tokens": sum(v for _, v in prompts) / m,
            "kv_bytes": kv * per_token / m, "kv_bytes_full": kv_full * per_token / m,
            "kv_bytes_ratio": kv / kv_full, "decode_flops_ratio": dec / dec_full, "scoring_flops_ratio": scoring / full}


def prediction(schedule: Schedule, shape: Shape, layouts: list[tuple[int, int]]) -> dict[str, float]:
    """The ``predicted`` section of a Schedule: its cost-model ratios on ``layouts``."""
    cost = predict(schedule, shape, layouts)
    return {k: cost[k] for k in PREDICTED}


def _cpu_sdpa_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args: object, out_shape: object = None,
                    **kwargs: object) -> int:
    """FLOPs of PyTorch's CPU flash attention, which torch.utils.flop_counter does not count itself."""
    return sdpa_flop_count(query, key, value)


def fixed_share(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The share of one unreduced forward of ``batch`` that lies outside the decoder layers (vision
    tower, projector, unembedding), counted by torch.utils.flop_counter with attention included. A
    schedule shortens the decoder layers only; the unembedding is counted as fixed although a forward
    that returns every position's logits runs it on the shortened sequence (generate's prefill asks
    for the last position's only)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**batch)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    path = adapters.layers_path(model)
    layers = sum(v for name, v in counts.items() if name.rsplit(".", 1)[0].endswith(path))
    total = counts.get("Global", 0)
    return (total - layers) / total if total else 0.0


def forward_ratio(cost: dict[str, float], fixed: float) -> float:
    """The whole forward's FLOPs ratio of a schedule of ``predict``'s ``cost`` (its decoder layers' ratio
    and its scoring's), when a ``fixed`` share of the unreduced forward (``fixed_share``) lies outside
    the decoder layers."""
    return fixed + (1 - fixed) * (cost["flops_ratio"] + cost["scoring_flops_ratio"])
