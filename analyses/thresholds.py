"""Every threshold the analyses use, with its default and the reason for it.

One frozen dataclass so that a Findings file records exactly which numbers produced it
(``Findings.thresholds``) and ``analyze(**thresholds)`` can override any of them by name.
All thresholds are relative (ratios to a baseline, fractions of a peak, cosine-based) so
that they mean the same thing in a 1 M-parameter toy and in a 7 B model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

KNOCKOUT_METRICS = ("kl", "answer_prob")


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds of the analyses (see the module docstring of each analysis)."""

    # Sinks: a (layer, pos) is a sink in a sample when some head gives the key at least
    # `sink_ratio` times what uniform attention would (`received / uniform`; causal
    # masking makes early keys' raw share large by construction) AND a material raw share
    # `sink_share` (Gu et al. use 0.3 for the first token; 0.2 keeps a moderate sink head
    # such as the trained toy VLM's), and at least `sink_min_queries` queries see it (a
    # key seen by one or two queries gets a large mean from any local head). Listed when a
    # sink in at least `sink_frequency` of all samples: sinks take attention whatever the
    # content (Xiao et al.), so a key that does so only for some prompts is ordinary
    # content-driven attention, and random models (Gemma-style q/k norms give O(1) logits)
    # produce such chance concentrations in a minority of samples.
    sink_ratio: float = 2.0
    sink_share: float = 0.2
    sink_min_queries: int = 4
    sink_frequency: float = 0.75
    # Massive activations (Sun et al. 2024: |x| > 100 and ~1000x the state's median):
    # max_abs >= massive_ratio x median_abs of the same hidden state, and >=
    # massive_layer_ratio x that layer's typical median_abs (the relative form of the
    # absolute "> 100": large against the layer's scale, not just within its own vector).
    massive_ratio: float = 1000.0
    massive_layer_ratio: float = 100.0
    # VAR (Kang et al. 2025): phi = max_{d in sink dims} |x_d| / rms(x) >= tau. phi can
    # never exceed sqrt(hidden size), so tau is taken relative to it: VAR's tau = 20 at
    # LLaMA-2's d = 4096 is 20 / 64 of the largest possible phi.
    var_tau_fraction: float = 20.0 / 64.0
    # Redundancy: a layer is a candidate when its Block Influence (1 - mean cos between
    # its input and output, scale-free) is at most `redundant_bi` (cos >= 0.9).
    redundant_bi: float = 0.1
    # Exit, observational: the first layer after which text->visual attention stays
    # below `exit_share_tol` x its peak over layers.
    exit_share_tol: float = 0.1
    # Exit, knockout: the smallest layer from which on cutting text->visual attention in
    # every later layer changes the output by less than `knockout_tol`, measured by
    # `knockout_metric`: "kl" (mean KL(full || cut) of the next-token distribution,
    # nats) or "answer_prob" (mean |relative change| of the answer token's probability).
    knockout_metric: str = "kl"
    knockout_tol: float = 0.01
    # Exit, logit lens: the first depth from which the model's final token is the lens'
    # top-1 in at least 1 - lens_tol of the samples at every later depth.
    lens_tol: float = 0.1
    # Flow: visual tokens are pooled into flow_block x flow_block patch blocks for max-flow;
    # 0 = the smallest block that leaves at most 8 x 8 blocks per image (a 24 x 24 grid:
    # block 3, ~0.15 s per sample at 600 tokens and 6 layers; block 1 is token-level, ~40 s).
    flow_block: int = 0

    def __post_init__(self) -> None:
        if self.knockout_metric not in KNOCKOUT_METRICS:
            raise ValueError(f"knockout_metric must be one of {KNOCKOUT_METRICS}, "
                             f"got {self.knockout_metric!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"threshold {f.name} must be >= 0, got {value}")

    @classmethod
    def from_kwargs(cls, **overrides: Any) -> "Thresholds":
        """Defaults with ``overrides`` applied; an unknown name is an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown threshold(s) {unknown}; known: {sorted(known)}")
        return cls(**overrides)

    @classmethod
    def parse(cls, items: list[str]) -> "Thresholds":
        """Defaults with ``NAME=VALUE`` overrides (command-line form), each value read as the
        type of its field."""
        types = {f.name: type(f.default) for f in fields(cls)}
        overrides: dict[str, Any] = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"threshold override {item!r} is not NAME=VALUE")
            kind = types.get(name.strip(), str)
            try:
                overrides[name.strip()] = kind(value.strip())
            except ValueError:
                raise ValueError(f"threshold {name.strip()} takes a {kind.__name__}, not {value!r}") from None
        return cls.from_kwargs(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
