"""Inputs: JSONL examples, validated, and encoded with the model's own processor.

A line is ``{"image": "a.png" | "images": [...], "prompt": "...", "answer": "...", "type": "..."}``;
image paths are relative to the JSONL file. The prompt goes through the processor as is, so it
carries the model's own image placeholder; every check here fails loudly before any model runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from attnflow.errors import UserError


class InputError(UserError, ValueError):
    """The inputs cannot be used: the message names the file, line and problem."""


@dataclass
class Example:
    """One prompt with its images (PIL images or paths), and optional answer and type."""

    prompt: str
    images: list[Any] = field(default_factory=list)
    answer: str | None = None
    qtype: str | None = None


def _open_image(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: cannot read image {str(path)!r}: {exc}") from exc


def load_examples(path: str | Path) -> list[Example]:
    """Read and validate a JSONL file of examples; images are opened eagerly."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"inputs file {str(path)!r} does not exist")
    examples: list[Example] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise InputError(f"{where}: each line needs a non-empty string 'prompt'")
        names = row.get("images", [row["image"]] if "image" in row else [])
        if isinstance(names, str):
            names = [names]
        images = [_open_image(path.parent / name, where) for name in names]
        answer = row.get("answer")
        examples.append(Example(row["prompt"], images, None if answer is None else str(answer),
                                row.get("type")))
    if not examples:
        raise InputError(f"inputs file {str(path)!r} holds no examples")
    return examples


def as_examples(inputs: str | Path | Iterable[Example | dict]) -> list[Example]:
    """Accept a JSONL path, Examples, or dicts with the same keys as a JSONL line."""
    if isinstance(inputs, (str, Path)):
        return load_examples(inputs)
    out = []
    for item in inputs:
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, dict):
            images = item.get("images", [item["image"]] if "image" in item else [])
            out.append(Example(item["prompt"], list(images), item.get("answer"), item.get("type")))
        else:
            raise InputError(f"cannot use {type(item).__name__} as an example")
    if not out:
        raise InputError("no examples given")
    return out


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, for provenance."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def placeholder(processor: Any) -> str | None:
    """The string a prompt uses for one image with this processor (None: text-only); every
    family's processor keeps it as ``image_token`` (Gemma3's is its ``boi_token``)."""
    token = getattr(processor, "image_token", None)
    return token if isinstance(token, str) and token else None


def check_images(examples: list[Example], token: str | None) -> None:
    """Every image needs one placeholder and every placeholder an image."""
    for i, ex in enumerate(examples):
        n_ph = 0 if token is None else ex.prompt.count(token)
        if token is None and ex.images:
            raise InputError(f"example {i}: images were given but the model takes text only")
        if ex.images and n_ph == 0:
            raise InputError(f"example {i}: an image was given but the prompt has no image "
                             f"placeholder {token!r}: {ex.prompt!r}")
        if n_ph != len(ex.images):
            raise InputError(f"example {i}: {len(ex.images)} image(s) but {n_ph} placeholder(s) "
                             f"{token!r} in the prompt")


def encode(processor: Any, examples: list[Example], *, with_answer: bool = False):
    """Tokenise a batch with the model's processor (padding on), after validating images.

    With ``with_answer`` the answer is appended to the prompt (teacher forcing) so the answer
    tokens appear in the trace with modality ``answer``.
    """
    token = placeholder(processor)
    check_images(examples, token)
    texts = [f"{ex.prompt} {ex.answer}" if with_answer and ex.answer else ex.prompt for ex in examples]
    kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
    if any(ex.images for ex in examples):
        kwargs["images"] = [list(ex.images) for ex in examples]
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor(text=texts, **kwargs)


def write_examples(folder: Path, examples: list[dict]) -> Path:
    """``examples`` (``{"prompt", "images": [PIL images]}``) as ``folder``/inputs.jsonl, each image a PNG
    beside it, in the form ``load_examples`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples):
        names = []
        for j, image in enumerate(ex["images"]):
            names.append(f"{i}-{j}.png")
            image.save(folder / names[-1])
        lines.append(json.dumps({"prompt": ex["prompt"], "images": names}))
    (folder / "inputs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "inputs.jsonl"
