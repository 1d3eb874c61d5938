"""Tiny random models of every supported family, with processors built locally (no hub).

Each family gets a model built from configs (a few layers, width 64, a tiny vision tower)
and a processor or tokenizer made on the spot: a word-level tokenizer over a small fixed
vocabulary, with the family's own image tokens registered as special tokens, and the
family's own image processor at a tiny image size. A forward takes milliseconds on a CPU,
so tests can run every family through the real transformers code paths (placeholder
expansion, vision towers, masks) without any download.

``build`` makes a model in memory; ``save``/``cached`` write it with ``save_pretrained`` so
that the ``Auto*`` classes load it offline; ``sample_prompts`` gives inputs that carry the
family's own image placeholder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SiglipVisionConfig,
)

from attnflow.fileio import atomic_dir
from attnflow.processors import (
    LlavaOnevisionImageOnlyProcessor,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
)

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "llama",
                             "qwen2", "mistral", "gemma", "bert")

# Every word the sample prompts use, plus enough filler for a vocabulary of ~100.
WORDS: tuple[str, ...] = tuple(
    """the a an is are this that these it of in on at to and or with what which where how many
    color shape image picture photo look tell me describe compare one two three more fewer
    objects object red green blue yellow white black square circle triangle cross left right
    top bottom middle corner there something big small than has have do does you see word
    answer question yes no , . ? : ! ( ) please first second both same different count
    cat dog car tree house sky sun""".split()
)

# Sizes shared by every family's language model: 3 layers, width 64, 4 heads over 2 KV heads.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
# Vision towers: 2 layers, width 32; 8-pixel patches.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              patch_size=8)
DECODER_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                    "unk_token": "<unk>"}


@dataclass(frozen=True)
class _Family:
    """How to make one family: its model class and a function giving (config, processor)."""

    model_class: type[PreTrainedModel]
    make: Callable[[], tuple[object, object]]
    placeholder: str | None  # what a prompt writes where an image goes; None: text-only


def _tokenizer(specials: dict[str, str], image_tokens: dict[str, str] | None = None,
               *, encoder: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS with ``specials`` (bos/eos/pad/unk or BERT's) and the
    family's image tokens as named special tokens (``tok.image_token``, ``tok.image_token_id``);
    it prepends BOS (decoders, padded on the left) or wraps in [CLS] ... [SEP] (encoders)."""
    image_tokens = image_tokens or {}
    vocab = {tok: i for i, tok in enumerate([*specials.values(), *image_tokens.values(), *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        cls, sep = specials["cls_token"], specials["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    else:
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=image_tokens or None,
                                   padding_side="right" if encoder else "left", **specials)


def _text_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """Vocabulary size and special ids for a language-model config."""
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llama_text(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(**TEXT, **_text_ids(tok))


def _llava() -> tuple[LlavaConfig, LlavaProcessor]:
    """CLIP (32 px, patch 8) + Llama; strategy "default" drops CLS: 16 image tokens."""
    tok = _tokenizer(DECODER_SPECIALS, {"image_token": "<image>"})
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION, image_size=32),
                      text_config=_llama_text(tok), image_token_id=tok.image_token_id,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    images = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    return cfg, proc


_PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def _llava_next() -> tuple[LlavaNextConfig, LlavaNextProcessor]:
    """CLIP (32 px tiles) + Llama with anyres tiling over 32x32, 32x64 and 64x32 grids."""
    tok = _tokenizer(DECODER_SPECIALS, {"image_token": "<image>"})
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION, image_size=32),
                          text_config=_llama_text(tok), image_token_id=tok.image_token_id,
                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                          image_grid_pinpoints=_PINPOINTS)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 32},
                                        crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=_PINPOINTS)
    proc = LlavaNextProcessor(images, tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    return cfg, proc


def _qwen_vl(config_class: type, processor_class: type, vision_extra: dict) -> tuple[object, object]:
    """A Qwen-VL model: images resized to >= 64x64 pixels, 8-pixel patches merged 2x2 (16+ image
    tokens), M-RoPE; ``vision_extra`` adds the version's own vision-config fields."""
    names = {"vision_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
             "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"}
    tok = _tokenizer(DECODER_SPECIALS, names)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    text = {**TEXT, **_text_ids(tok),
            # M-RoPE: temporal/height/width sections sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3]}}
    vision = dict(depth=2, num_heads=2, hidden_size=TEXT["hidden_size"], patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, **vision_extra)
    cfg = config_class(text_config=text, vision_config=vision, image_token_id=ids["image_token"],
                       video_token_id=ids["video_token"], vision_start_token_id=ids["vision_start_token"],
                       vision_end_token_id=ids["vision_end_token"])
    pixels = 64 * 64  # at least an 8x8 patch grid: 16 tokens after the 2x2 merge
    images = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": pixels, "longest_edge": 2 * pixels})
    return cfg, processor_class(images, tok)


def _qwen2_vl() -> tuple[object, object]:
    """Qwen2-VL (vision tower of width 32)."""
    return _qwen_vl(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, dict(embed_dim=32, mlp_ratio=2))


def _qwen2_5_vl() -> tuple[object, object]:
    """Qwen2.5-VL: windowed vision attention (window 16 px) with one full-attention block."""
    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor,
                    dict(out_hidden_size=TEXT["hidden_size"], intermediate_size=64, window_size=16,
                         fullatt_block_indexes=[1]))


def _llava_onevision() -> tuple[object, object]:
    """LLaVA-OneVision: SigLIP (32 px, patch 8, all features kept) + Qwen2, AnyRes tiles."""
    tok = _tokenizer(DECODER_SPECIALS, {"image_token": "<image>", "video_token": "<video>"})
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**VISION, image_size=32),
                               text_config=Qwen2Config(**TEXT, **_text_ids(tok)), image_token_index=tok.image_token_id,
                               video_token_index=tok.video_token_id, image_grid_pinpoints=_PINPOINTS,
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS,
                                             crop_size={"height": 32, "width": 32})
    return cfg, LlavaOnevisionImageOnlyProcessor(images, tok, num_image_tokens=16, vision_feature_select_strategy="full")


def _text_decoder(config_class: type, **extra: object) -> Callable[[], tuple[object, object]]:
    """A text-only decoder family: the shared sizes and tokenizer, plus ``extra`` config fields."""
    def make() -> tuple[object, object]:
        tok = _tokenizer(DECODER_SPECIALS)
        return config_class(**TEXT, **_text_ids(tok), **extra), tok
    return make


def _idefics3() -> tuple[Idefics3Config, Idefics3Processor]:
    """SmolVLM-like: Idefics3 vision (64 px, patch 8) + pixel shuffle 2 + Llama: 16 image tokens."""
    tok = _tokenizer(DECODER_SPECIALS, {
        "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    cfg = Idefics3Config(vision_config=Idefics3VisionConfig(**VISION, image_size=64),
                         text_config=_llama_text(tok), scale_factor=2,
                         image_token_id=tok.image_token_id)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64},
                                       max_image_size={"longest_edge": 64},
                                       do_image_splitting=False)
    return cfg, Idefics3Processor(images, tok, image_seq_len=16)


def _gemma3() -> tuple[Gemma3Config, Gemma3Processor]:
    """Gemma3: SigLIP (64 px, patch 8) pooled to 16 tokens + Gemma3 text with a 16-token
    sliding window on the first two of three layers."""
    names = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
             "eoi_token": "<end_of_image>"}
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                "unk_token": "<unk>"}
    tok = _tokenizer(specials, names)
    text = Gemma3TextConfig(**TEXT, **_text_ids(tok), head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=16,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    cfg = Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**VISION, image_size=64),
                       mm_tokens_per_image=16, boi_token_index=tok.boi_token_id,
                       eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)
    images = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    return cfg, Gemma3Processor(images, tok, image_seq_length=16)


def _llama() -> tuple[LlamaConfig, PreTrainedTokenizerFast]:
    tok = _tokenizer(DECODER_SPECIALS)
    return _llama_text(tok), tok


def _bert() -> tuple[BertConfig, PreTrainedTokenizerFast]:
    """A 3-layer BERT encoder with an MLM head (bidirectional attention)."""
    specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "unk_token": "[UNK]", "mask_token": "[MASK]"}
    tok = _tokenizer(specials, encoder=True)
    sizes = {k: TEXT[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads")}
    cfg = BertConfig(**sizes, vocab_size=len(tok), max_position_embeddings=128,
                     pad_token_id=tok.pad_token_id)
    return cfg, tok


_REGISTRY: dict[str, _Family] = {
    "llava": _Family(LlavaForConditionalGeneration, _llava, "<image>"),
    "llava_next": _Family(LlavaNextForConditionalGeneration, _llava_next, "<image>"),
    "llava_onevision": _Family(LlavaOnevisionForConditionalGeneration, _llava_onevision, "<image>"),
    "qwen2_vl": _Family(Qwen2VLForConditionalGeneration, _qwen2_vl,
                        "<|vision_start|><|image_pad|><|vision_end|>"),
    "idefics3": _Family(Idefics3ForConditionalGeneration, _idefics3, "<image>"),
    "gemma3": _Family(Gemma3ForConditionalGeneration, _gemma3, "<start_of_image>"),
    "qwen2_5_vl": _Family(Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl,
                          "<|vision_start|><|image_pad|><|vision_end|>"),
    "llama": _Family(LlamaForCausalLM, _llama, None),
    "qwen2": _Family(Qwen2ForCausalLM, _text_decoder(Qwen2Config), None),
    "mistral": _Family(MistralForCausalLM, _text_decoder(MistralConfig, head_dim=16), None),
    "gemma": _Family(GemmaForCausalLM, _text_decoder(GemmaConfig, head_dim=16), None),
    "bert": _Family(BertForMaskedLM, _bert, None),
}


def _family(family: str) -> _Family:
    if family not in _REGISTRY:
        raise ValueError(f"unknown toy family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _REGISTRY[family]


def placeholder(family: str) -> str | None:
    """What a prompt writes where an image goes, as the family's processor expects it
    (None for text-only families)."""
    return _family(family).placeholder


def build(family: str, *, seed: int = 0, attn_implementation: str = "sdpa",
          ) -> tuple[PreTrainedModel, Any]:
    """A tiny random ``family`` model (float32, eval mode) and its processor (VLMs) or
    tokenizer (text-only). The same seed gives the same weights."""
    spec = _family(family)
    config, processor = spec.make()
    torch.manual_seed(seed)
    model = spec.model_class._from_config(config, attn_implementation=attn_implementation,
                                          dtype=torch.float32)
    return model.eval(), processor


def save(family: str, path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the model and its processor/tokenizer to ``path`` with ``save_pretrained``, so
    ``AutoModel*``/``AutoProcessor``/``AutoTokenizer.from_pretrained(path)`` load it offline."""
    model, processor = build(family, seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def cache_dir(family: str, *, seed: int = 0) -> Path:
    """Where ``cached`` keeps a toy: ``$ATTNFLOW_CACHE`` or ``~/.cache/attnflow``, then
    ``toys/<family>-seed<seed>``."""
    root = Path(os.environ.get("ATTNFLOW_CACHE") or Path.home() / ".cache" / "attnflow")
    return root / "toys" / f"{family}-seed{seed}"


def cached(family: str, *, seed: int = 0) -> Path:
    """The path of a saved toy, writing it the first time (into a temp dir, then renamed, so
    a reader never sees a half-written model)."""
    _family(family)
    target = cache_dir(family, seed=seed)
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            save(family, tmp, seed=seed)
    return target


def _image(shape: str, fill: str, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A dark image with one coloured shape: deterministic and distinct per call."""
    img = Image.new("RGB", size, (20, 20, 30))
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=fill)
    else:
        draw.rectangle(box, fill=fill)
    return img


def sample_prompts(family: str) -> list[dict]:
    """Two or three inputs ``{"prompt": str, "images": [PIL.Image, ...]}`` in the family's own
    placeholder convention: an image first, an image mid-text, and two images (VLMs); plain
    sentences for text-only families."""
    slot = placeholder(family)
    if slot is None:
        return [{"prompt": "what color is the sky ?", "images": []},
                {"prompt": "the cat is on the left of the house and the dog is on the right .",
                 "images": []}]
    return [
        {"prompt": f"{slot} what color is the square ?", "images": [_image("square", "red")]},
        {"prompt": f"look at this {slot} and tell me what shape is blue ?",
         "images": [_image("circle", "blue")]},
        {"prompt": f"compare {slot} with {slot} : which one has more objects ?",
         "images": [_image("triangle", "green", (64, 32)), _image("square", "yellow")]},
    ]
