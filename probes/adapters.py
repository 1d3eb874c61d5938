"""Declarative model adapters: where each supported family keeps what attnflow needs.

One ``Adapter`` entry per family, keyed by ``config.model_type``; dispatch never looks at
class names. Paths are dotted attribute paths from the loaded model object; several
candidates cover the bare model and its ``*ForCausalLM``/``*ForConditionalGeneration``
wrapper. Attention is read at one place for every family: the call of the attention
interface inside the attention module's forward, located by attnflow.compat.
"""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from dataclasses import dataclass
from functools import reduce

import torch
from torch import nn
from transformers import PretrainedConfig

from attnflow.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    """The model's family has no adapter entry."""


@dataclass(frozen=True)
class Adapter:
    """Everything attnflow knows about one model family; nothing family-specific lives elsewhere.

    Paths are dotted attribute paths from the loaded model (several candidates cover the bare
    model and its wrapper); ``*_field`` names are config attributes.
    """

    family: str
    layers: tuple[str, ...]
    attention: str = "self_attn"
    final_norm: tuple[str, ...] = ()
    unembed: tuple[str, ...] = ("lm_head",)
    image_token_field: str | None = None
    causal: bool = True
    multimodal: bool = False
    text_config: str | None = "text_config"
    # encoders always start with their CLS token, which plays BOS's part; decoders start with
    # BOS only when the first token is the config's bos_token_id
    leading_cls: bool = False
    # the processor output giving each image's (t, h, w) patch grid (Qwen-VL), or its (h, w) in
    # pixels with ``grid_in_pixels`` (Pixtral's image_sizes), and the vision (or top) config field
    # saying how many patches per side merge into one token; without a grid input the patch grid
    # is the vision tower's image_size / patch_size
    grid_input: str | None = None
    grid_in_pixels: bool = False
    merge_size_field: str | None = None
    # the attention module's projections and norms, to recompute one attention row for ranking
    projections: tuple[str, str] = ("q_proj", "k_proj")
    qk_norms: tuple[str, str] | None = None
    softcap_field: str | None = None  # text-config field with the attention-logit soft cap
    sliding_window: bool = False  # some layers attend within a window (module attr sliding_window)
    # a processor class of attnflow.processors to load instead of the stock one (whose video
    # half needs torchvision)
    processor: str | None = None
    # why attnflow.reducers cannot shorten this family's sequence (None: they can)
    unshortenable: str | None = None
    # why prune steps before the first decoder layer (which rebuild the language model's causal mask
    # over the kept tokens) cannot serve this family (None: they can)
    no_input_cut: str | None = None
    # the vision tower's encoder layers when their attention has a [CLS] query at position 0 and
    # every image's visual tokens are its patches in order (VisionZip's score); None: no [CLS]
    vision_cls_layers: tuple[str, ...] = ()


_VLM_LM = dict(
    layers=("model.language_model.layers",),
    final_norm=("model.language_model.norm",),
    image_token_field="image_token_id",
    multimodal=True,
)
_QWEN_VL = dict(_VLM_LM, grid_input="image_grid_thw", merge_size_field="spatial_merge_size", sliding_window=True)
_IDEFICS = dict(layers=("model.text_model.layers",), final_norm=("model.text_model.norm",),
                image_token_field="image_token_id", multimodal=True)
_DECODER = dict(layers=("model.layers", "layers"), final_norm=("model.norm", "norm"), text_config=None)

ADAPTERS: dict[str, Adapter] = {
    "llava": Adapter("llava", **_VLM_LM, vision_cls_layers=("model.vision_tower.encoder.layers",
                                                            "model.vision_tower.vision_model.encoder.layers")),
    "llava_next": Adapter("llava_next", **_VLM_LM),
    "llava_onevision": Adapter("llava_onevision", **_VLM_LM, sliding_window=True,  # Qwen2 LM
                               processor="LlavaOnevisionImageOnlyProcessor"),
    "qwen2_vl": Adapter("qwen2_vl", **_QWEN_VL, processor="Qwen2VLImageOnlyProcessor"),
    "qwen2_5_vl": Adapter("qwen2_5_vl", **_QWEN_VL, processor="Qwen2_5_VLImageOnlyProcessor"),
    "qwen3_vl": Adapter("qwen3_vl", **_QWEN_VL, qk_norms=("q_norm", "k_norm"), processor="Qwen3VLImageOnlyProcessor"),
    # hybrid: Gated DeltaNet layers (linear_attn, no softmax map) between gated softmax-attention ones
    "qwen3_5": Adapter("qwen3_5", **_QWEN_VL, qk_norms=("q_norm", "k_norm"), processor="Qwen3VLImageOnlyProcessor",
                       unshortenable="its Gated DeltaNet (linear-attention) layers have no attention to shorten"),
    # image tokens attend bidirectionally within an image; local layers use a sliding window
    "gemma3": Adapter("gemma3", **_VLM_LM, qk_norms=("q_norm", "k_norm"),
                      softcap_field="attn_logit_softcapping", sliding_window=True,
                      no_input_cut="its language model takes one mask per layer type, with an image's tokens "
                                   "attending each other both ways, which a causal mask over the kept tokens "
                                   "would replace"),
    # like Gemma3 (image tokens bidirectional in the sliding layers); q/k/v norms, scaling 1, no soft cap
    "gemma4": Adapter("gemma4", **_VLM_LM, qk_norms=("q_norm", "k_norm"), sliding_window=True,
                      processor="Gemma4ImageOnlyProcessor",
                      unshortenable="its per-layer input embeddings are not shortened with the hidden states"),
    # prefix-LM: the whole prompt (image tokens, the BOS after them, text) attends bidirectionally
    "paligemma": Adapter("paligemma", **_VLM_LM, causal=False, processor="PaliGemmaNoLabelsProcessor"),
    "idefics3": Adapter("idefics3", **_IDEFICS),
    "smolvlm": Adapter("smolvlm", **_IDEFICS, processor="SmolVLMImageOnlyProcessor"),
    "internvl": Adapter("internvl", **_VLM_LM, sliding_window=True,  # Qwen2 LM
                        processor="InternVLImageOnlyProcessor"),
    # Pixtral: rows of [IMG] tokens split by [IMG_BREAK]; image_sizes (pixels) give each grid
    "mistral3": Adapter("mistral3", **_VLM_LM, grid_input="image_sizes", grid_in_pixels=True,
                        merge_size_field="spatial_merge_size", sliding_window=True, processor="PixtralPilProcessor"),
    "llama": Adapter("llama", **_DECODER),
    "qwen2": Adapter("qwen2", **_DECODER, sliding_window=True),
    "mistral": Adapter("mistral", **_DECODER, sliding_window=True),
    "gemma": Adapter("gemma", **_DECODER),
    # Llama4's text model (its image processor needs torchvision): chunked attention on the RoPE layers
    "llama4_text": Adapter("llama4_text", **_DECODER),
    "bert": Adapter("bert", layers=("bert.encoder.layer", "encoder.layer"), attention="attention.self",
                    unembed=(), causal=False, text_config=None, leading_cls=True),
}

HOW_TO_ADD = (
    "To add a family, add an Adapter entry to attnflow.probes.adapters.ADAPTERS keyed by its "
    "config.model_type (decoder-layer path, attention submodule, final norm, unembedding, "
    "image-token config field)."
)


def adapter_of_type(model_type: str | None, where: str = "") -> Adapter:
    """The adapter of a ``config.model_type``, or a clear error (naming ``where`` the model
    came from, when given) that lists the supported ones."""
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"{where + ': ' if where else ''}attnflow does not support model_type {model_type!r}. "
            f"Supported: {', '.join(sorted(ADAPTERS))}. {HOW_TO_ADD}"
        )
    return ADAPTERS[model_type]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family, or a clear error naming the supported ones."""
    return adapter_of_type(getattr(getattr(model, "config", None), "model_type", None))


def _resolve(root: nn.Module, candidates: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for path in candidates:
        try:
            return path, reduce(getattr, path.split("."), root)
        except AttributeError:
            continue
    return None


def vision_cls_attention(model: nn.Module) -> tuple[nn.Module, bool] | None:
    """The vision tower's attention module whose [CLS] row ranks the patches (the layer the model
    takes its image features from, as VisionZip does) and whether the [CLS] token is left out of the
    visual tokens; None when the family's tower has no [CLS] or the features come from several layers."""
    adapter = adapter_for(model)
    found = _resolve(model, adapter.vision_cls_layers) if adapter.vision_cls_layers else None
    layer = getattr(model.config, "vision_feature_layer", None)
    if found is None or not isinstance(layer, int):
        return None
    attention = getattr(found[1][layer if layer < 0 else layer - 1], "self_attn")
    return attention, getattr(model.config, "vision_feature_select_strategy", "default") == "default"


def layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer list (a ``ModuleList``) inside ``model``."""
    adapter = adapter_for(model)
    found = _resolve(model, adapter.layers)
    if found is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({adapter.family}) has none of the layer paths "
            f"{adapter.layers}; is it a headless or unusual wrapper?")
    return found[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder (or encoder) layers, in execution order."""
    return reduce(getattr, layers_path(model).split("."), model)


def attention_modules(model: nn.Module) -> list[nn.Module | None]:
    """Per decoder layer: its softmax-attention module, or None (a hybrid model's linear-attention
    layers, such as Qwen3.5's Gated DeltaNet, have none and no attention map)."""
    attention = (adapter_for(model).attention,)
    return [None if (found := _resolve(layer, attention)) is None else found[1] for layer in decoder_layers(model)]


def attention_layers(model: nn.Module) -> list[bool]:
    """Per decoder layer: whether it has the family's softmax-attention module."""
    return [m is not None for m in attention_modules(model)]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last layer (None for post-norm encoders)."""
    found = _resolve(model, adapter_for(model).final_norm)
    return None if found is None else found[1]


def unembedding(model: nn.Module) -> nn.Module | None:
    """The output projection to the vocabulary, when the model has one."""
    found = _resolve(model, adapter_for(model).unembed)
    return None if found is None else found[1]


def text_config(model: nn.Module):
    """The config of the language model (the top config for text-only models)."""
    cfg = model.config
    name = adapter_for(model).text_config
    return getattr(cfg, name, cfg) if name else cfg


def image_token_id(model: nn.Module) -> int | None:
    """The id of the image placeholder token, None for text-only families."""
    field_name = adapter_for(model).image_token_field
    return None if field_name is None else int(getattr(model.config, field_name))


def bos_ids(model: nn.Module) -> set[int] | None:
    """Token ids that make a prompt's first real token its BOS (from the model's configs);
    None when the first token always plays that part (an encoder's CLS)."""
    if adapter_for(model).leading_cls:
        return None
    configs = (model.config, text_config(model))
    return {int(c.bos_token_id) for c in configs if getattr(c, "bos_token_id", None) is not None}


def patch_geometry(model: nn.Module) -> dict[str, int | None]:
    """The vision tower's patch grid side (``base_side``: image_size / patch_size, None when the
    config does not say) and how many patches per side merge into one token (``merge_size``)."""
    adapter = adapter_for(model)
    vc = getattr(model.config, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    field_name = adapter.merge_size_field
    merge = (getattr(vc, field_name, None) or getattr(model.config, field_name, 1)) if field_name else 1
    return {"base_side": int(size) // int(patch) if isinstance(size, int) and isinstance(patch, int) else None,
            "merge_size": int(merge or 1)}


def image_grids(model: nn.Module, batch: dict) -> torch.Tensor | None:
    """The per-image (t, h, w) patch grids a processor returned with ``batch`` (None when the
    family has none); pixel sizes are divided by the vision tower's patch size."""
    adapter = adapter_for(model)
    grids = batch.get(adapter.grid_input) if adapter.grid_input else None
    if grids is None or not adapter.grid_in_pixels:
        return grids
    sizes = torch.as_tensor(grids).reshape(-1, 2) // int(model.config.vision_config.patch_size)
    return torch.cat([torch.ones_like(sizes[:, :1]), sizes], 1)


def window_layer_types(model: nn.Module) -> list[str]:
    """The kinds of windowed (not full) attention the language model's layers use."""
    layer_types = getattr(text_config(model), "layer_types", None) or []
    return sorted({t for t in layer_types if t != "full_attention"})


def dims(model: nn.Module) -> dict[str, int]:
    """Layer, head and width counts of the language model."""
    tc = text_config(model)
    heads = int(tc.num_attention_heads)
    return {
        "num_layers": len(decoder_layers(model)),
        "num_heads": heads,
        "num_kv_heads": int(getattr(tc, "num_key_value_heads", None) or heads),
        "hidden_size": int(tc.hidden_size),
        "intermediate_size": int(getattr(tc, "intermediate_size", 4 * tc.hidden_size)),
    }


_VOLATILE = ("_name_or_path", "transformers_version", "_attn_implementation_autoset",
             "_attn_implementation", "attn_implementation", "torch_dtype", "dtype",
             "_commit_hash", "architectures")


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE}
    return obj


def _snapshot(config: PretrainedConfig) -> dict:
    """The config's attributes (nested configs as their own snapshots, containers copied): cheap to
    take and compare, and different whenever the config's JSON is."""
    return {k: _snapshot(v) if isinstance(v, PretrainedConfig) else copy.copy(v) if isinstance(v, (list, dict, set))
            else v for k, v in vars(config).items()}


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[dict, str]]" = weakref.WeakKeyDictionary()


def fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config JSON (backend and dtype excluded): what a Trace or
    Schedule was made for. Kept per model while its config is unchanged: the JSON costs
    ~0.5 ms, a few percent of a small model's forward, and ``reducers.apply`` checks it on entry."""
    snapshot = _snapshot(model.config)
    known = _FINGERPRINTS.get(model)
    try:
        if known is not None and known[0] == snapshot:
            return known[1]
    except (TypeError, ValueError, RuntimeError):  # an attribute (an array, a tensor) that == cannot settle
        pass
    blob = json.dumps(_stable(model.config.to_dict()), sort_keys=True, default=str).encode()
    _FINGERPRINTS[model] = (snapshot, "sha256:" + hashlib.sha256(blob).hexdigest())
    return _FINGERPRINTS[model][1]


def attn_implementation(model: nn.Module) -> str:
    """The attention backend the language model runs (eager, sdpa, flash_attention_2...)."""
    return str(getattr(text_config(model), "_attn_implementation", None)
               or getattr(model.config, "_attn_implementation", "eager"))
