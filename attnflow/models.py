"""Load a model and its processor from a local path, or one of the bundled toys by name.

``toy-vlm``, ``toy-llava-scenes`` and ``toy-qwen-scenes`` are trained VLMs shipped in data/
(``BUNDLED``); ``toy-<family>`` is a tiny random model of that family, saved once to a cache folder. Both then go through the same real
``from_pretrained(path)`` code a user's checkpoint goes through. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from attnflow.errors import UserError
from attnflow.probes.adapters import ADAPTERS, HOW_TO_ADD, UnsupportedModelError


class ModelSpecError(UserError, ValueError):
    """The model spec names nothing attnflow can load."""


# The trained models shipped in attnflow.data: name -> (model folder, held-out JSONL), relative to it;
# each is rebuilt by the make target of its name.
BUNDLED: dict[str, tuple[str, str]] = {
    "toy-vlm": ("toy-vlm", "toy-vqa/heldout.jsonl"),
    "toy-llava-scenes": ("toy-llava-scenes", "toy-scenes/heldout-llava.jsonl"),
    "toy-qwen-scenes": ("toy-qwen-scenes", "toy-scenes/heldout-qwen2_vl.jsonl"),
    "toy-idefics3-scenes": ("toy-idefics3-scenes", "toy-scenes/heldout-idefics3.jsonl"),
}


def _bundled(name: str, index: int) -> Path:
    from importlib.resources import files
    return Path(str(files("attnflow.data"))) / BUNDLED[name][index]


def resolve(spec: str) -> Path:
    """The local folder a model spec stands for."""
    if spec in BUNDLED:
        path = _bundled(spec, 0)
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"the bundled model {spec} is missing from {path}; rebuild it with `make {spec}`")
        return path
    if spec.startswith("toy-"):
        from attnflow.toys import tiny
        family = spec[len("toy-"):]
        if family not in tiny.FAMILIES:
            raise ModelSpecError(f"unknown toy {spec!r}; toys: {', '.join(BUNDLED)}, "
                                 + ", ".join(f"toy-{f}" for f in tiny.FAMILIES))
        return tiny.cached(family)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{spec!r} is neither a toy name ({', '.join(BUNDLED)}, toy-<family>) nor a local "
                             "model folder with a config.json (nothing is downloaded)")
    return path


def load_model(spec: str | Path, *, attn_implementation: str | None = None,
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, processor or tokenizer) for a local folder or a toy name."""
    path = resolve(str(spec))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in ADAPTERS:
        raise UnsupportedModelError(f"{path}: model_type {config.model_type!r} is not supported. "
                                    f"Supported: {', '.join(sorted(ADAPTERS))}. {HOW_TO_ADD}")
    adapter = ADAPTERS[config.model_type]
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    if config.model_type == "qwen2_vl":
        # registers an image-only Qwen2-VL processor: the stock one builds a video processor
        # that needs torchvision, which the CPU torch wheel cannot import
        import attnflow.toys.tiny  # noqa: F401
    if adapter.multimodal:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    else:
        arch = (config.architectures or [None])[0]
        auto = getattr(transformers, arch, None) if arch else None
        auto = auto or (AutoModelForCausalLM if adapter.causal else AutoModel)
        model = auto.from_pretrained(path, **kwargs)
        processor = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.config._name_or_path = str(spec)
    return model.eval(), processor


def default_inputs(spec: str) -> Path:
    """The inputs that go with a bundled model: a trained model's held-out set, or a toy's samples."""
    if spec in BUNDLED:
        path = _bundled(spec, 1)
        if not path.is_file():
            raise ModelSpecError(f"the bundled held-out set is missing from {path}")
        return path
    if spec.startswith("toy-"):
        return _toy_inputs(resolve(spec))
    raise ModelSpecError(f"--inputs is required for {spec!r} (only bundled models have default inputs)")


def bundled_models() -> list[dict[str, Any]]:
    """One row per shipped trained model: name, path, model_type, visual tokens per image, parameters,
    held-out file, and the held-out accuracy with real and blank images its training.json records."""
    rows = []
    for name in BUNDLED:
        path, heldout = _bundled(name, 0), _bundled(name, 1)
        row: dict[str, Any] = {"name": name, "path": str(path), "model_type": None, "visual_tokens": None,
                               "parameters": None, "size_mb": None, "heldout": str(heldout),
                               "accuracy": None, "blank_accuracy": None}
        if (path / "config.json").is_file():
            row.update(_describe(path, heldout))
        rows.append(row)
    return rows


def _describe(path: Path, heldout: Path) -> dict[str, Any]:
    """What ``bundled_models`` reads from a saved model without building it: config, weights' shapes,
    the processor's expansion of the first held-out prompt, and training.json."""
    from safetensors import safe_open

    from attnflow.probes.inputs import encode, load_examples

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type == "qwen2_vl":
        import attnflow.toys.tiny  # noqa: F401  (the image-only Qwen2-VL processor)
    weights = path / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        parameters = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    row: dict[str, Any] = {"model_type": config.model_type, "parameters": parameters,
                           "size_mb": round(sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20, 1)}
    if heldout.is_file():
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        ids = encode(processor, load_examples(heldout)[:1])["input_ids"][0]
        row["visual_tokens"] = int((ids == config.image_token_id).sum())
    info_path = path / "training.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        row["accuracy"] = info.get("heldout", {}).get("accuracy")
        row["blank_accuracy"] = info.get("heldout_blank_images", {}).get("accuracy")
    return row


def _toy_inputs(folder: Path) -> Path:
    """Write a tiny toy's sample prompts (and their images as PNG) as JSONL beside it, once."""
    from attnflow.fileio import atomic_dir
    from attnflow.toys import tiny

    family = folder.name.rsplit("-seed", 1)[0]
    target = folder / "inputs"
    if not (target / "inputs.jsonl").is_file():
        with atomic_dir(target) as tmp:
            lines = []
            for i, ex in enumerate(tiny.sample_prompts(family)):
                names = []
                for j, image in enumerate(ex["images"]):
                    names.append(f"{i}-{j}.png")
                    image.save(tmp / names[-1])
                lines.append(json.dumps({"prompt": ex["prompt"], "images": names}))
            (tmp / "inputs.jsonl").write_text("\n".join(lines) + "\n")
    return target / "inputs.jsonl"
