"""Planted toy transformers: tiny HF models whose weights make a chosen ground truth hold
by construction, so that the analyses can be tested for recovering exactly that truth.

All three start from the tiny toys' configs and processors (``attnflow.toys.tiny``) with
sizes given as arguments, and reserve residual dimensions that only the planted mechanism
reads or writes: every other weight that would read a reserved dimension (q/k/v, MLP
inputs) or write one (o_proj, down_proj) is zeroed, so a reserved coordinate keeps its
embedding value through every layer. RoPE gets a very large base so that the lowest-
frequency rotary pair, which carries the planted q/k component, does not rotate.

- ``sink_model``: a Llama in which chosen layers send (nearly) all attention of every later
  query to chosen positions: the sink token's embedding carries a large value in
  ``sink_dim`` (also a massive activation there), the keys of those layers read only that
  dimension and the queries read only a constant one, so the score is a key bias that only
  sink tokens have. Other layers cannot see either dimension.
- ``identity_model``: a Llama whose chosen layers are exact identities (zero o_proj and
  down_proj); every other layer's MLP is scaled so that its update is as large as its input.
- ``exit_vlm``: a LLaVA whose visual tokens carry a dimension that no text token has (the
  projector's bias); text queries read a constant dimension, so their score for visual keys
  is a bias: strongly positive before ``exit_layer`` (text reads the image, into a read-out
  dimension the unembedding sees) and strongly negative from it on (text stops reading
  visual tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from attnflow.probes.adapters import decoder_layers
from attnflow.probes.inputs import Example
from attnflow.toys import tiny

ROPE_THETA = 1e12  # the slowest rotary pair turns by ~1e-10 rad per position
SCORE = 30.0  # planted attention logit: exp(-30) ~ 1e-13 of a row is what a cut key keeps


@dataclass
class Planted:
    """A planted model, its processor/tokenizer, inputs that exercise it, and the truth."""

    model: nn.Module
    processor: Any
    examples: list[Example]
    truth: dict[str, Any] = field(default_factory=dict)


def _text_config(base: LlamaConfig, num_layers: int, hidden_size: int, num_heads: int) -> dict:
    """A Llama text config dict of the given size (two KV heads when the heads divide)."""
    kv = 2 if num_heads % 2 == 0 else 1
    return {**base.to_dict(), "num_hidden_layers": num_layers, "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size, "num_attention_heads": num_heads,
            "num_key_value_heads": kv, "head_dim": hidden_size // num_heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}}


def _slow_pair(head_dim: int) -> int:
    """The q/k component whose rotary frequency is the lowest (HF's rotate_half layout)."""
    return head_dim // 2 - 1


def _isolate(layer: nn.Module, reserved: list[int]) -> None:
    """Zero every weight of a Llama decoder layer that reads or writes a reserved dimension."""
    attn, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            lin.weight[:, reserved] = 0
        for lin in (attn.o_proj, mlp.down_proj):
            lin.weight[reserved, :] = 0


def _plant_bias(layer: nn.Module, query_dim: int, key_dim: int, logit: float, key_scale: float) -> None:
    """Make the layer's score a key bias: q = c·(normed x)[query_dim] and
    k = c'·(normed x)[key_dim] on the slow rotary component of every head, others zero,
    with c·c'·scaling·key_scale = ``logit`` (key_scale: the key's normed value)."""
    attn = layer.self_attn
    dh = attn.head_dim
    a = _slow_pair(dh)
    c = float(np.sqrt(abs(logit) / (attn.scaling * key_scale)))
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        for h in range(attn.q_proj.out_features // dh):
            attn.q_proj.weight[h * dh + a, query_dim] = c
        for g in range(attn.k_proj.out_features // dh):
            attn.k_proj.weight[g * dh + a, key_dim] = np.sign(logit) * c


def _words(rng: np.random.Generator, n: int, avoid: set[str]) -> list[str]:
    pool = [w for w in tiny.WORDS if w.isalpha() and w not in avoid]
    return list(rng.choice(pool, size=n))


def sink_model(positions: list[int], layers: list[int], *, num_layers: int = 4, hidden_size: int = 64,
               num_heads: int = 4, sink_dim: int = 0, length: int = 16, samples: int = 4,
               seed: int = 0) -> Planted:
    """A Llama whose ``layers`` make the tokens at ``positions`` attention sinks in every sample.

    Position 0 is BOS; other planted positions hold the word ``"sun"``, which no other
    position holds. The sink tokens also carry a massive activation in ``sink_dim``.
    """
    if not positions or max(positions) >= length - 1 or min(positions) < 0:
        raise ValueError(f"sink positions must lie in 0..{length - 2} (the last query needs a key before it)")
    base, tok = tiny.build("llama", seed=seed)
    cfg = LlamaConfig(**_text_config(base.config, num_layers, hidden_size, num_heads))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    one_dim = (sink_dim + 1) % hidden_size
    reserved = [sink_dim, one_dim]
    sink_ids = [tok.convert_tokens_to_ids("sun")] + ([tok.bos_token_id] if 0 in positions else [])
    big = 2e4  # >> 1000 x the median |x| (~0.7) of a token's state: a massive activation
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0.0, 1.0)
        emb[:, reserved] = 0
        emb[:, one_dim] = 1.0
        emb[sink_ids, sink_dim] = big
    for i, layer in enumerate(decoder_layers(model)):
        _isolate(layer, reserved)
        if i in layers:  # a normed sink token has ~sqrt(d) in sink_dim; a query ~1 in one_dim
            _plant_bias(layer, one_dim, sink_dim, SCORE, key_scale=float(np.sqrt(hidden_size)))
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(samples):
        words = _words(rng, length - 1, {"sun"})
        for p in positions:
            if p > 0:
                words[p - 1] = "sun"
        examples.append(Example(" ".join(words)))
    return Planted(model, tok, examples,
                   {"positions": sorted(positions), "layers": sorted(layers), "sink_dim": sink_dim})


def _calibrate_updates(model: nn.Module, tok: Any, examples: list[Example], scaled: list[int]) -> None:
    """Scale each ``scaled`` layer's down_proj (in order) so that its MLP's mean output norm
    equals the layer's mean input norm: every such layer then turns the stream by tens of
    degrees (a random MLP at init would barely move it)."""
    ids = tok([ex.prompt for ex in examples], return_tensors="pt", padding=True)
    stack = decoder_layers(model)
    for i in scaled:
        seen: dict[str, torch.Tensor] = {}
        hooks = [stack[i].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0])),
                 stack[i].mlp.register_forward_hook(lambda mod, args, out: seen.update(u=out))]
        with torch.no_grad():
            model(**ids)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            stack[i].mlp.down_proj.weight.mul_(seen["x"].norm(dim=-1).mean() / seen["u"].norm(dim=-1).mean())


def identity_model(layers: list[int], *, num_layers: int = 6, hidden_size: int = 64, num_heads: int = 4,
                   length: int = 16, samples: int = 4, seed: int = 0) -> Planted:
    """A Llama whose ``layers`` are exact identities and whose other layers change the stream."""
    base, tok = tiny.build("llama", seed=seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_text_config(base.config, num_layers, hidden_size, num_heads))).eval()
    stack = decoder_layers(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        for i in layers:
            stack[i].self_attn.o_proj.weight.zero_()
            stack[i].mlp.down_proj.weight.zero_()
    rng = np.random.default_rng(seed)
    examples = [Example(" ".join(_words(rng, length - 1, set()))) for _ in range(samples)]
    _calibrate_updates(model, tok, examples, [i for i in range(num_layers) if i not in layers])
    return Planted(model, tok, examples, {"identity_layers": sorted(layers)})


def _image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


def _plant_reader(layer: nn.Module, flag_dim: int, read_dim: int, gain: float) -> None:
    """Head 0 of the layer adds ``gain`` x (its attention share on tokens carrying
    ``flag_dim``) x (their normed flag) to ``read_dim`` of each query's stream."""
    attn = layer.self_attn
    with torch.no_grad():
        attn.v_proj.weight[0, :] = 0
        attn.v_proj.weight[0, flag_dim] = gain
        attn.o_proj.weight[read_dim, :] = 0
        attn.o_proj.weight[read_dim, 0] = 1.0


def exit_vlm(exit_layer: int, *, num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4,
             samples: int = 4, seed: int = 0) -> Planted:
    """A LLaVA whose text tokens read visual tokens in layers < ``exit_layer`` and not at all
    (attention weight ~exp(-30)) from ``exit_layer`` on; ``exit_layer`` may be
    ``num_layers`` (text reads the image in every layer).

    Every layer l < ``exit_layer`` adds ~1 to its own read-out dimension of each text token
    (what it read from visual tokens) and the unembedding reads each of those dimensions with
    O(1) random weights, so cutting text->visual attention from any layer before the exit
    moves the next-token logits by O(1) (one dimension per layer: a shared one would grow
    until the softmax saturates), and from the exit on by ~exp(-30).
    """
    if not 0 <= exit_layer <= num_layers:
        raise ValueError(f"exit_layer must lie in 0..{num_layers}, got {exit_layer}")
    if hidden_size < 2 * (num_layers + 2):
        raise ValueError(f"hidden_size {hidden_size} is too small for {num_layers} read-out dimensions")
    base, proc = tiny.build("llava", seed=seed)
    text = _text_config(base.config.text_config, num_layers, hidden_size, num_heads)
    cfg = LlavaConfig(**{**base.config.to_dict(), "text_config": text})
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    vis_dim, one_dim = 0, 1
    read_dims = [2 + i for i in range(num_layers)]
    reserved = [vis_dim, one_dim, *read_dims]
    d = hidden_size
    proj = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0.0, 1.0)
        emb[:, reserved] = 0
        emb[:, one_dim] = 1.0
        # visual tokens: image content plus vis_dim = sqrt(d), which dominates their norm
        proj.weight.normal_(0.0, 0.5 / np.sqrt(proj.in_features))
        proj.weight[reserved, :] = 0
        proj.bias.zero_()
        proj.bias[vis_dim] = float(np.sqrt(d))
        model.lm_head.weight.normal_(0.0, 1.0 / np.sqrt(d))
        model.lm_head.weight[:, read_dims] = torch.randn(cfg.text_config.vocab_size, num_layers)
    flag = float(np.sqrt(d))  # a visual token's normed vis_dim, near sqrt(d)
    for i, layer in enumerate(decoder_layers(model)):
        _isolate(layer, reserved)
        _plant_bias(layer, one_dim, vis_dim, SCORE if i < exit_layer else -SCORE, key_scale=flag)
        _plant_reader(layer, vis_dim, read_dims[i], gain=1.0 / flag)
    rng = np.random.default_rng(seed)
    examples = [Example(f"<image> {' '.join(_words(rng, 6, set()))} ?", [_image(rng)]) for _ in range(samples)]
    return Planted(model, proc, examples, {"exit_layer": exit_layer, "num_layers": num_layers})
