"""Load a model and its processor from a local path, or one of the bundled toys by name.

``toy-vlm`` is the trained toy VLM shipped in data/; ``toy-<family>`` is a tiny random model
of that family, saved once to a cache folder. Both then go through the same real
``from_pretrained(path)`` code a user's checkpoint goes through. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
from attnflow.probes.adapters import adapter_of_type


class ModelSpecError(UserError, ValueError):
    """The model spec names nothing attnflow can load."""


def resolve(spec: str) -> Path:
    """The local folder a model spec stands for."""
    if spec == "toy-vlm":
        from attnflow.toys.toy_vlm import model_dir
        path = model_dir()
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"the bundled toy VLM is missing from {path}; rebuild it with `make toy-vlm`")
        return path
    if spec.startswith("toy-"):
        from attnflow.toys import tiny
        family = spec[len("toy-"):]
        if family not in tiny.FAMILIES:
            raise ModelSpecError(f"unknown toy {spec!r}; toys: toy-vlm, "
                                 + ", ".join(f"toy-{f}" for f in tiny.FAMILIES))
        return tiny.cached(family)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{spec!r} is neither a toy name (toy-vlm, toy-<family>) nor a local "
                             "model folder with a config.json (nothing is downloaded)")
    return path


def load_model(spec: str | Path, *, attn_implementation: str | None = None,
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, processor or tokenizer) for a local folder or a toy name."""
    path = resolve(str(spec))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    adapter = adapter_of_type(config.model_type, str(path))
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    if adapter.multimodal:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        if adapter.processor:
            from attnflow import processors
            processor = processors.load(adapter.processor, path, local_files_only=True)
        else:
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
    """The inputs that go with a bundled model: the toy VLM's held-out set, or a toy's samples."""
    if spec == "toy-vlm":
        from attnflow.toys.toy_vlm import heldout_path
        path = heldout_path()
        if not path.is_file():
            raise ModelSpecError(f"the bundled held-out set is missing from {path}")
        return path
    if spec.startswith("toy-"):
        return _toy_inputs(resolve(spec))
    raise ModelSpecError(f"--inputs is required for {spec!r} (only bundled models have default inputs)")


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
