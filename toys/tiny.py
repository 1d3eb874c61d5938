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
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Llama4ForCausalLM,
    Llama4TextConfig,
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
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextAttention
from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

from attnflow.fileio import atomic_dir
from attnflow.processors import (
    Gemma4ImageOnlyProcessor,
    InternVLImageOnlyProcessor,
    LlavaOnevisionImageOnlyProcessor,
    PaliGemmaNoLabelsProcessor,
    PixtralPilProcessor,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
    SmolVLMImageOnlyProcessor,
)

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5",
                             "idefics3", "smolvlm", "gemma3", "gemma4", "paligemma", "internvl", "mistral3",
                             "llama", "qwen2", "mistral", "gemma", "llama4_text", "bert")

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
    retune: Callable[[PreTrainedModel], None] | None = None  # adjusts the random init in place


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


def _byte_level_tokenizer(specials: dict[str, str], image_tokens: dict[str, str]) -> PreTrainedTokenizerFast:
    """WORDS as Qwen3.5's byte-level BPE tokenizer, which AutoTokenizer loads for any qwen3_5
    checkpoint whatever class it was saved with (so a word-level one would not survive a reload):
    every word takes the leading-space marker Ġ (add_prefix_space) and is built by its own chain
    of merges, each extending a Ġ-prefix by one letter (no merge can split another word's chain)."""
    vocab = {tok: i for i, tok in enumerate([*specials.values(), *image_tokens.values(),
                                             *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    merges = []
    for piece in ("Ġ" + word for word in WORDS):
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                vocab[piece[:end]] = len(vocab)
                merges.append((piece[:end - 1], piece[end - 1]))
    return Qwen3_5Tokenizer(vocab=vocab, merges=merges, add_prefix_space=True, add_bos_token=True,
                            extra_special_tokens=image_tokens, padding_side="left", **specials)


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


def _qwen_vl(config_class: type, processor_class: type, vision_extra: dict, text_extra: dict | None = None,
             tokenizer: Callable[..., PreTrainedTokenizerFast] = _tokenizer) -> tuple[object, object]:
    """A Qwen-VL model: images resized to >= 64x64 pixels, 8-pixel patches merged 2x2 (16+ image
    tokens), M-RoPE; ``vision_extra`` and ``text_extra`` add the version's own config fields."""
    names = {"vision_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
             "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"}
    tok = tokenizer(DECODER_SPECIALS, names)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}
    text = {**TEXT, **_text_ids(tok),
            # M-RoPE: temporal/height/width sections sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3]}, **(text_extra or {})}
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


def _qwen3_vl() -> tuple[object, object]:
    """Qwen3-VL: learned vision position embeddings (an 8x8 table), DeepStack (the first vision
    block's features added to the first LM layer's visual positions), q/k-normed Qwen3 text."""
    return _qwen_vl(Qwen3VLConfig, Qwen3VLImageOnlyProcessor,
                    dict(out_hidden_size=TEXT["hidden_size"], intermediate_size=64, num_position_embeddings=64,
                         deepstack_visual_indexes=[0]), dict(head_dim=16))


def _qwen3_5() -> tuple[object, object]:
    """Qwen3.5: a hybrid LM whose first and last layers are Gated DeltaNet (linear attention, no
    softmax map) around one gated softmax-attention layer (rotary on half of each head), under
    Qwen3-VL's vision tower without DeepStack; its own byte-level tokenizer class."""
    linear = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                  layer_types=["linear_attention", "full_attention", "linear_attention"])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    return _qwen_vl(Qwen3_5Config, Qwen3VLImageOnlyProcessor,
                    dict(out_hidden_size=TEXT["hidden_size"], intermediate_size=64, num_position_embeddings=64),
                    dict(head_dim=16, partial_rotary_factor=0.5, rope_parameters=rope, **linear),
                    _byte_level_tokenizer)


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


def _mistral3() -> tuple[object, object]:
    """Mistral3: Pixtral (4-pixel patches, 2x2 patch merger) + Mistral; each row of merged patches
    is [IMG] tokens then [IMG_BREAK] ([IMG_END] after the last): 16 image tokens for 32x32."""
    tok = _tokenizer(DECODER_SPECIALS, {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
                                        "image_end_token": "[IMG_END]"})
    cfg = Mistral3Config(vision_config=PixtralVisionConfig(**{**VISION, "patch_size": 4}, image_size=64),
                         text_config=MistralConfig(**TEXT, **_text_ids(tok), head_dim=16),
                         image_token_index=tok.image_token_id, spatial_merge_size=2, vision_feature_layer=-1)
    images = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8)
    return cfg, PixtralPilProcessor(images, tok, patch_size=4, spatial_merge_size=2)


def _internvl() -> tuple[object, object]:
    """InternVL: InternViT (32 px tiles, 4-pixel patches, CLS dropped) pixel-shuffled 2x2 to 16
    tokens per tile + Qwen2; images tile into up to 2 crops plus a thumbnail."""
    tok = _tokenizer(DECODER_SPECIALS, {"start_image_token": "<img>", "end_image_token": "</img>",
                                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    vision = InternVLVisionConfig(**{**VISION, "patch_size": 4}, image_size=32)
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**TEXT, **_text_ids(tok)),
                         image_token_id=tok.context_image_token_id, image_seq_length=16, downsample_ratio=0.5)
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=2)
    return cfg, InternVLImageOnlyProcessor(images, tok, image_seq_length=16)


def _text_decoder(config_class: type, **extra: object) -> Callable[[], tuple[object, object]]:
    """A text-only decoder family: the shared sizes and tokenizer, plus ``extra`` config fields."""
    def make() -> tuple[object, object]:
        tok = _tokenizer(DECODER_SPECIALS)
        return config_class(**TEXT, **_text_ids(tok), **extra), tok
    return make


def _idefics(config_class: type, vision_class: type, images_class: type, processor_class: type,
             ) -> tuple[object, object]:
    """Idefics3 or SmolVLM: its vision tower (64 px, patch 8) + pixel shuffle 2 + Llama: 16
    image tokens between <fake_token_around_image><global-img> and <fake_token_around_image>."""
    tok = _tokenizer(DECODER_SPECIALS, {
        "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    cfg = config_class(vision_config=vision_class(**VISION, image_size=64), text_config=_llama_text(tok),
                       scale_factor=2, image_token_id=tok.image_token_id)
    images = images_class(size={"longest_edge": 64}, max_image_size={"longest_edge": 64}, do_image_splitting=False)
    return cfg, processor_class(images, tok, image_seq_len=16)


def _idefics3() -> tuple[object, object]:
    """Idefics3."""
    return _idefics(Idefics3Config, Idefics3VisionConfig, Idefics3ImageProcessorPil, Idefics3Processor)


def _smolvlm() -> tuple[object, object]:
    """SmolVLM: Idefics3's architecture under its own classes (image-only processor)."""
    return _idefics(SmolVLMConfig, SmolVLMVisionConfig, SmolVLMImageProcessorPil, SmolVLMImageOnlyProcessor)


_GEMMA_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def _gemma3() -> tuple[Gemma3Config, Gemma3Processor]:
    """Gemma3: SigLIP (64 px, patch 8) pooled to 16 tokens + Gemma3 text with a 16-token
    sliding window on the first two of three layers."""
    names = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
             "eoi_token": "<end_of_image>"}
    tok = _tokenizer(_GEMMA_SPECIALS, names)
    text = Gemma3TextConfig(**TEXT, **_text_ids(tok), head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=16,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    cfg = Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**VISION, image_size=64),
                       mm_tokens_per_image=16, boi_token_index=tok.boi_token_id,
                       eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)
    images = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    return cfg, Gemma3Processor(images, tok, image_seq_length=16)


def _gemma4() -> tuple[object, object]:
    """Gemma4: its vision tower (4-pixel patches pooled 2x2, at most 70 soft tokens: 64 for a
    square image, bidirectional among an image's tokens in the sliding layers) + Gemma4 text with
    per-layer input embeddings, q/k/v norms and a 16-token window on the first two of three layers."""
    names = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>"}
    tok = _tokenizer(_GEMMA_SPECIALS, names)
    text = Gemma4TextConfig(**TEXT, **_text_ids(tok), head_dim=16, global_head_dim=16, sliding_window=16,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            use_bidirectional_attention="vision", hidden_size_per_layer_input=8,
                            vocab_size_per_layer_input=len(tok))
    vision = Gemma4VisionConfig(**{**VISION, "patch_size": 4}, num_key_value_heads=2, head_dim=16,
                                pooling_kernel_size=2, position_embedding_size=64)
    cfg = Gemma4Config(text_config=text, vision_config=vision, boi_token_id=tok.boi_token_id,
                       eoi_token_id=tok.eoi_token_id, image_token_id=tok.image_token_id)
    images = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
    return cfg, Gemma4ImageOnlyProcessor(images, tok, image_seq_length=70)


def _scaled_query_norms(model: PreTrainedModel) -> None:
    """Gemma4 scores RMS-normed queries and keys unscaled (scaling 1): at the norms' init of 1
    a random model's logits have std sqrt(head_dim), so peaked that chance preferences pass for
    sinks. Its query norms start at 1 / head_dim instead (logit std 1/4): attention close to
    uniform, as in the other families' random inits."""
    for module in model.modules():
        if isinstance(module, Gemma4TextAttention):
            module.q_norm.weight.fill_(1 / module.head_dim)


def _paligemma() -> tuple[object, object]:
    """PaliGemma: SigLIP (32 px, patch 8: 16 tokens) + Gemma; the processor writes the image
    tokens, then BOS after the last of them, and marks the prompt as the bidirectional prefix."""
    tok = _tokenizer(DECODER_SPECIALS, {"image_token": "<image>"})
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=16)
    processor = PaliGemmaNoLabelsProcessor(images, tok)  # adds PaliGemma's <locNNNN>/<segNNN> tokens
    text = GemmaConfig(**TEXT, **_text_ids(tok), head_dim=16)
    cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(**VISION, image_size=32), text_config=text,
                          image_token_index=tok.image_token_id, projection_dim=TEXT["hidden_size"],
                          hidden_size=TEXT["hidden_size"], vocab_size=len(tok))
    return cfg, processor


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
    "smolvlm": _Family(SmolVLMForConditionalGeneration, _smolvlm, "<image>"),
    "gemma3": _Family(Gemma3ForConditionalGeneration, _gemma3, "<start_of_image>"),
    "qwen2_5_vl": _Family(Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl,
                          "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen3_vl": _Family(Qwen3VLForConditionalGeneration, _qwen3_vl,
                        "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen3_5": _Family(Qwen3_5ForConditionalGeneration, _qwen3_5, "<|vision_start|><|image_pad|><|vision_end|>"),
    "gemma4": _Family(Gemma4ForConditionalGeneration, _gemma4, "<|image|>", _scaled_query_norms),
    "paligemma": _Family(PaliGemmaForConditionalGeneration, _paligemma, "<image>"),
    "internvl": _Family(InternVLForConditionalGeneration, _internvl, "<IMG_CONTEXT>"),
    "mistral3": _Family(Mistral3ForConditionalGeneration, _mistral3, "[IMG]"),
    "llama": _Family(LlamaForCausalLM, _llama, None),
    "qwen2": _Family(Qwen2ForCausalLM, _text_decoder(Qwen2Config), None),
    "mistral": _Family(MistralForCausalLM, _text_decoder(MistralConfig, head_dim=16), None),
    "gemma": _Family(GemmaForCausalLM, _text_decoder(GemmaConfig, head_dim=16), None),
    # Llama4's text model: chunked attention (16-token chunks) with RoPE and L2-normed q/k on the first two
    # layers, NoPE on the last, a 2-expert MoE in the middle; the NoPE layer's attention-temperature tuning
    # starts at the default position 8192 (it counts padding too, so a padded batch would differ below it)
    "llama4_text": _Family(Llama4ForCausalLM, _text_decoder(
        Llama4TextConfig, head_dim=16, intermediate_size_mlp=128, no_rope_layer_interval=3, attention_chunk_size=16,
        num_local_experts=2, interleave_moe_layer_step=2), None),
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
    if spec.retune:
        with torch.no_grad():
            spec.retune(model)
    return model.eval(), processor


def save(family: str, path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the model and its processor/tokenizer to ``path`` with ``save_pretrained``, so
    ``AutoModel*``/``AutoProcessor``/``AutoTokenizer.from_pretrained(path)`` load it offline."""
    model, processor = build(family, seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def cache_root() -> Path:
    """Where generated models are kept: ``$ATTNFLOW_CACHE`` or ``~/.cache/attnflow``."""
    return Path(os.environ.get("ATTNFLOW_CACHE") or Path.home() / ".cache" / "attnflow")


def cache_dir(family: str, *, seed: int = 0) -> Path:
    """Where ``cached`` keeps a toy: ``cache_root()/toys/<family>-seed<seed>``."""
    return cache_root() / "toys" / f"{family}-seed{seed}"


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
