"""LLaVA-shaped models with random weights, and one prompt of an exact token count.

A real ``LlavaForConditionalGeneration`` (not its bare Llama decoder), so every method runs
the same code a user's LLaVA runs: the processor expands ``<image>`` into the visual
placeholders, the projector writes visual features over them, and attnflow's spans label
them. The vision tower is kept minimal (one CLIP layer, width 64) in every shape, so the
timings are those of the decoder, where the probes and reducers act. The tokenizer is the
toy LLaVA's word-level one (about 120 words), so the unembedding is tiny too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from attnflow.probes.inputs import Example
from attnflow.toys import tiny


@dataclass(frozen=True)
class Shape:
    """Decoder sizes of a LLaVA-shaped model."""

    name: str
    hidden: int
    heads: int
    layers: int
    mlp: int
    patch: int = 14
    vision_hidden: int = 64


# 6 layers of width 512 keep a 2,400-token forward around a second on one CPU core; the MLP
# keeps LLaVA-1.5's ratio m/d = 11008/4096.
CPU_SHAPE = Shape("llava-d512-L6", hidden=512, heads=8, layers=6, mlp=1376)
LLAVA_7B_SHAPE = Shape("llava-1.5-7b", hidden=4096, heads=32, layers=32, mlp=11008)
# For smoke tests of the benchmark code itself.
SMOKE_SHAPE = Shape("llava-d64-L2", hidden=64, heads=4, layers=2, mlp=172)
SHAPES: dict[str, Shape] = {s.name: s for s in (CPU_SHAPE, LLAVA_7B_SHAPE, SMOKE_SHAPE)}


def grid_side(tokens: int) -> int:
    """Side of the square patch grid that leaves about 4% of ``tokens`` for BOS and text."""
    side = math.isqrt(int(tokens * 0.96))
    if side < 1 or tokens - side * side < 2:
        raise ValueError(f"--tokens {tokens} is too few for BOS + an image + text (at least 3)")
    return side


def build(shape: Shape, tokens: int, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
          seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, Example]:
    """(model under SDPA in eval mode, its processor, one example of exactly ``tokens`` tokens).

    The layout is BOS, then ``side²`` visual placeholders of one square image, then text.
    """
    side = grid_side(tokens)
    tok = tiny.build("llava")[1].tokenizer
    size = side * shape.patch
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=2 * shape.vision_hidden,
                              num_hidden_layers=1, num_attention_heads=2, image_size=size, patch_size=shape.patch)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.mlp,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, max_position_embeddings=max(4096, 2 * tokens),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    images = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(images, tok, patch_size=shape.patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    n_words = tokens - 1 - side * side
    words = " ".join(tiny.WORDS[i % len(tiny.WORDS)] for i in range(n_words))
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    example = Example(f"{processor.image_token} {words}", [Image.fromarray(pixels)])
    n = encode(processor, example)["input_ids"].shape[1]
    if n != tokens:
        raise RuntimeError(f"the prompt encodes to {n} tokens, not {tokens}")
    return model.eval(), processor, example


def encode(processor: LlavaProcessor, example: Example, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The processor's tensors for one example, on ``device``."""
    batch = processor(text=[example.prompt], images=[example.images], return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}
