"""The trained toy VLM shipped in ``attnflow.data`` (``data/toy-vlm``) and its held-out task set."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin


def _data_dir(name: str) -> Path:
    """A folder of the packaged ``attnflow.data``, with a clear error when it is missing."""
    path = Path(str(files("attnflow.data") / name))
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is missing; rebuild it with `make toy-vlm` (model) or "
            "`python -m attnflow.toys.vqa_task --out data/toy-vqa` (held-out set)")
    return path


def model_dir() -> Path:
    """The folder holding the toy VLM's ``save_pretrained`` files and ``training.json``."""
    return _data_dir("toy-vlm")


def heldout_path() -> Path:
    """The held-out JSONL of the toy task (images relative to it)."""
    return _data_dir("toy-vqa") / "heldout.jsonl"


def toy_vlm(attn_implementation: str | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load the toy VLM (in eval mode) and its processor with the plain Auto classes, offline."""
    path = model_dir()
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)
