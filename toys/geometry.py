"""Random models with the real geometry of released VLMs, at reduced depth.

Toys of width 64 hide what breaks at scale: bf16 overflow in 4096-wide residuals, memory at 576
visual tokens, head-dim assumptions (128), GQA grouping (28 query heads over 4 KV heads). Each
geometry here copies its checkpoint's config (widths, heads, MLP, RoPE, vision tower, projector,
image size and patching) but keeps ``layers`` decoder and vision layers (default 2) and the toys'
word-level vocabulary (a 32k or 152k unembedding would add 0.3-1.1 G parameters and nothing
to attention). Weights are random; the processors are the families' own.

* ``llava-1.5-7b`` (arXiv 2310.03744): CLIP-L/14 at 336 px -> 576 visual tokens, 2-layer GELU
  projector, Llama-2-7B decoder (d 4096, 32 x 128 heads, MLP 11008).
* ``qwen2.5-vl-7b`` (arXiv 2502.13923): windowed ViT (d 1280, 16 heads, patch 14, window 112 px,
  2x2 merge), dynamic resolution, Qwen2 decoder with M-RoPE (d 3584, 28 query / 4 KV heads of 128,
  MLP 18944).

``python -m attnflow.toys.geometry NAME`` prints the folder of the cached model (written once,
atomically) for ``attnflow run --model``; ``geometry-NAME`` names it everywhere a model is taken.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers import LlavaImageProcessorPil, PreTrainedModel, Qwen2VLImageProcessorPil
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from attnflow.fileio import atomic_dir
from attnflow.probes.inputs import write_examples
from attnflow.processors import Qwen2_5_VLImageOnlyProcessor
from attnflow.toys import scene_task, tiny

PREFIX = "geometry-"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _llava(layers: int) -> tuple[LlavaConfig, LlavaProcessor]:
    tok = tiny._tokenizer(tiny.DECODER_SPECIALS, {"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       **tiny._text_ids(tok))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    images = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return config, LlavaProcessor(images, tok, patch_size=14, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)


def _qwen2_5_vl(layers: int) -> tuple[Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor]:
    names = {"vision_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
             "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"}
    tok = tiny._tokenizer(tiny.DECODER_SPECIALS, names)
    ids = {f"{k}_id": tok.convert_tokens_to_ids(v) for k, v in names.items()}
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, **tiny._text_ids(tok),
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=layers, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[layers - 1], hidden_act="silu")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    images = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return config, Qwen2_5_VLImageOnlyProcessor(images, tok)


GEOMETRIES: dict[str, tuple[type[PreTrainedModel], Callable[[int], tuple[Any, Any]], str, list[tuple[int, int]]]] = {
    # name: (model class, (config, processor) at a depth, image placeholder, image sizes of the sample prompts)
    "llava-1.5-7b": (LlavaForConditionalGeneration, _llava, "<image>", [(336, 336)]),
    # dynamic resolution: 24x24 and 32x24 patch grids -> 144 and 192 merged tokens
    "qwen2.5-vl-7b": (Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl,
                      "<|vision_start|><|image_pad|><|vision_end|>", [(336, 336), (448, 336)]),
}


def _geometry(name: str) -> tuple[type[PreTrainedModel], Callable[[int], tuple[Any, Any]], str, list[tuple[int, int]]]:
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; choose one of {', '.join(GEOMETRIES)}")
    return GEOMETRIES[name]


def build(name: str, *, layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """(random model of geometry ``name`` with ``layers`` layers, in ``dtype``, eval mode; its processor)."""
    model_class, make, _, _ = _geometry(name)
    config, processor = make(layers)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval(), processor


QUESTIONS = ("what color is the square ?", "what shape is red ?", "how many objects are there ?",
             "is there a blue circle ?", "which object is on the left ?", "describe the picture .")


def sample_prompts(name: str, n: int = 8) -> list[dict]:
    """``n`` inputs ``{"prompt", "images"}``: the family's placeholder, then a question in the toys'
    vocabulary, over scene-task images resized to the geometry's sample sizes in turn."""
    _, _, slot, sizes = _geometry(name)
    scenes = scene_task.heldout_examples(n, family="llava")
    return [{"prompt": f"{slot} {QUESTIONS[i % len(QUESTIONS)]}",
             "images": [Image.fromarray(e.image).resize(sizes[i % len(sizes)])]} for i, e in enumerate(scenes)]


def cached(name: str, *, layers: int = 2) -> Path:
    """The folder of geometry ``name`` (bf16 safetensors, processor, and ``inputs/inputs.jsonl``),
    written the first time into ``tiny.cache_root()/geometry``."""
    target = tiny.cache_root() / "geometry" / f"{name}-L{layers}"
    if not (target / "config.json").is_file():
        with atomic_dir(target) as tmp:
            model, processor = build(name, layers=layers)
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            write_examples(tmp / "inputs", sample_prompts(name))
    return target


def main(argv: list[str] | None = None) -> None:
    """CLI: print the cached folder of a geometry (building it once)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=list(GEOMETRIES))
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    print(cached(args.name, layers=args.layers))


if __name__ == "__main__":
    main()
