"""The trained toy VLM shipped in ``attnflow.data`` (``data/toy-vlm``) and its held-out task set."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin


def _data_path(index: int) -> Path:
    """The toy VLM's entry in the registry of bundled models (0: model folder, 1: held-out JSONL),
    with a clear error when it is missing."""
    from attnflow.models import bundled_path

    path = bundled_path("toy-vlm", index)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; rebuild it with `make toy-vlm` (model) or "
            "`python -m attnflow.toys.vqa_task --out data/toy-vqa` (held-out set)")
    return path


def model_dir() -> Path:
    """The folder holding the toy VLM's ``save_pretrained`` files and ``training.json``."""
    return _data_path(0)


def heldout_path() -> Path:
    """The held-out JSONL of the toy task (images relative to it)."""
    return _data_path(1)


def toy_vlm(attn_implementation: str | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load the toy VLM (in eval mode) and its processor with the plain Auto classes, offline."""
    path = model_dir()
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)
