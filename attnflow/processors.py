"""Processors for families whose stock processor cannot be built on a CPU-only torch, or
returns what a plain forward cannot take.

transformers builds the Qwen-VL, LLaVA-OneVision, InternVL, SmolVLM and Gemma4 processors with
a video processor on torchvision (SmolVLM's also wants num2words), which attnflow does not
depend on (and whose PyPI wheels do not load against the CPU torch wheel), so the stock
processors cannot even be constructed there; Pixtral's (Mistral3) module imports torchvision
outright. The classes here are the stock ones minus the video half: images go through the stock
code (the family's image processor, placeholder expansion, ``mm_token_type_ids``).
PaliGemma's stock processor also returns ``labels`` (all ignored without a suffix), which
``generate`` would pass on to every step. An adapter entry names its class in
``Adapter.processor``; ``attnflow.models.load_model`` builds it from the checkpoint's tokenizer
and image processor.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    Gemma4Config,
    Gemma4Processor,
    InternVLConfig,
    InternVLProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    Mistral3Config,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3_5Config,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    SmolVLMConfig,
    SmolVLMProcessor,
)


class _ImageOnly:
    """__init__ of a Qwen-VL processor without its video processor (the same token defaults)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor minus its video processor (the stock __init__ otherwise)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, num_image_tokens: int | None = None,
                 vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
                 image_token: str = "<image>", video_token: str = "<video>",
                 vision_aspect_ratio: str = "anyres_max_9", **kwargs: Any) -> None:
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class Qwen2VLImageOnlyProcessor(_ImageOnly, Qwen2VLProcessor):
    """Qwen2-VL's processor minus its video processor."""


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor minus its video processor."""


class Qwen3VLImageOnlyProcessor(_ImageOnly, Qwen3VLProcessor):
    """Qwen3-VL's (and Qwen3.5's) processor minus its video processor."""


class InternVLImageOnlyProcessor(InternVLProcessor):
    """InternVL's processor minus its video processor (the stock __init__ otherwise)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        # ProcessorMixin pairs positional sub-processors with this signature's, so the None is dropped
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template=chat_template, **kwargs)


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """SmolVLM's processor minus its video processor (and the num2words its video prompts need)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_len: int = 169,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class Gemma4ImageOnlyProcessor(Gemma4Processor):
    """Gemma4's processor minus its video and audio halves (the stock __init__'s image attributes)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 image_seq_length: int = 280, **kwargs: Any) -> None:
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.image_token_id
        self.image_token, self.boi_token, self.eoi_token = (tokenizer.image_token, tokenizer.boi_token,
                                                            tokenizer.eoi_token)
        self.video_token = self.video_token_id = None
        self.audio_seq_length = self.audio_ms_per_token = None
        self.audio_token = self.audio_token_id = None
        # Gemma4's validate_inputs refuses any input, audio or not, when these are None
        self.boa_token = self.eoa_token = ""
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class PaliGemmaNoLabelsProcessor(PaliGemmaProcessor):
    """PaliGemma's processor without the ``labels`` it derives from ``token_type_ids`` (all
    ignored unless a suffix is given), which a forward would turn into a loss and ``generate``
    would pass on to every step; ``token_type_ids`` (the bidirectional prefix) stay."""

    def __call__(self, *args: Any, **kwargs: Any) -> BatchFeature:
        out = super().__call__(*args, **kwargs)
        out.pop("labels", None)
        return out

    @property
    def model_input_names(self) -> list[str]:
        return [n for n in super().model_input_names if n != "labels"]


class PixtralPilProcessor(ProcessorMixin):
    """Pixtral's processor (Mistral3) over the PIL image processor: transformers' own module
    imports its torchvision image processor, so it cannot be imported without torchvision. The
    same expansion: each row of merged patches is ``image_token``s then ``image_break_token``,
    the last break replaced by ``image_end_token``."""

    text_kwargs = {"return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, patch_size: int = 16,
                 spatial_merge_size: int = 1, chat_template: str | None = None, image_token: str = "[IMG]",
                 image_break_token: str = "[IMG_BREAK]", image_end_token: str = "[IMG_END]", **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def _process_images(self, images: Any, **images_kwargs: Any) -> Any:
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        side = self.patch_size * self.spatial_merge_size
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        row = self.image_token * (width // side)
        return self.image_break_token.join([row] * (height // side)) + self.image_end_token

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]


# AutoProcessor.from_pretrained finds the class a saved processor_config.json names among the
# registered ones, so a checkpoint saved with one of these loads once this module is imported.
AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(LlavaOnevisionConfig, LlavaOnevisionImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen3VLConfig, Qwen3VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen3_5Config, Qwen3VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(InternVLConfig, InternVLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(SmolVLMConfig, SmolVLMImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Gemma4Config, Gemma4ImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(PaliGemmaConfig, PaliGemmaNoLabelsProcessor, exist_ok=True)
AutoProcessor.register(Mistral3Config, PixtralPilProcessor, exist_ok=True)


def load(name: str, path: str | Path, **kwargs: Any) -> ProcessorMixin:
    """The processor class ``name`` (defined here) built from ``path``'s tokenizer, image
    processor and the processor settings its processor_config.json saves; ``kwargs`` go to both
    ``from_pretrained`` calls."""
    cls = globals()[name]
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    images = AutoImageProcessor.from_pretrained(path, **kwargs)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer"}
    saved = Path(path) / "processor_config.json"
    settings = json.loads(saved.read_text()) if saved.is_file() else {}
    settings = {k: v for k, v in settings.items() if k in accepted}
    return cls(images, tokenizer, **{"chat_template": getattr(tokenizer, "chat_template", None), **settings})
