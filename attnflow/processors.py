"""Processors for families whose stock processor cannot be built on a CPU-only torch.

transformers builds the Qwen-VL processors with a video processor on torchvision, which
attnflow does not depend on (and whose PyPI wheels do not load against the CPU torch wheel), so
the stock ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` cannot even be constructed there. The
classes here are the stock ones minus the video half: images go through the stock code (the
family's image processor, placeholder expansion, ``mm_token_type_ids``). An adapter entry names
its class in ``Adapter.processor``; ``attnflow.models.load_model`` builds it from the
checkpoint's tokenizer and image processor.
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
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
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


# AutoProcessor.from_pretrained finds the class a saved processor_config.json names among the
# registered ones, so a checkpoint saved with one of these loads once this module is imported.
AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(LlavaOnevisionConfig, LlavaOnevisionImageOnlyProcessor, exist_ok=True)


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
