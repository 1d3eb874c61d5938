"""Load a model and its processor from a local folder, a Hugging Face repo id, or a bundled name.

The trained models shipped in data/ are listed in ``BUNDLED`` (``attnflow models``);
``toy-<family>`` is a tiny random model of that family, saved once to a cache folder. A repo id (``org/name``, optionally at a
revision) is found the way ``from_pretrained`` finds it: the local HF cache first, then the
network unless ``HF_HUB_OFFLINE=1``. All of them then go through the same ``from_pretrained``
code, on the device and in the dtype asked for, or spread over devices by accelerate
(``device_map="auto"``).
"""

from __future__ import annotations

import importlib
import json
import re
import tempfile
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

from attnflow import parallel
from attnflow.errors import UserError
from attnflow.probes.adapters import adapter_of_type


class ModelSpecError(UserError, ValueError):
    """The model spec names nothing attnflow can load."""


# The trained models shipped in attnflow.data: name -> (model folder, held-out JSONL), relative to it;
# each is rebuilt by the make target of its name.
BUNDLED: dict[str, tuple[str, str]] = {
    "toy-vlm": ("toy-vlm", "toy-vqa/heldout.jsonl"),
    "toy-llava-scenes": ("toy-llava-scenes", "toy-scenes/heldout-llava.jsonl"),
    "toy-idefics3-scenes": ("toy-idefics3-scenes", "toy-scenes/heldout-idefics3.jsonl"),
}


def bundled_path(name: str, index: int) -> Path:
    """Where bundled model ``name`` keeps its model folder (``index`` 0) or held-out JSONL (1)."""
    from importlib.resources import files
    return Path(str(files("attnflow.data"))) / BUNDLED[name][index]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES: dict[str, torch.dtype | str] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                                       "float16": torch.float16}
# what a snapshot needs for from_pretrained (not every weight format a repo may also hold)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of ``repo_id``: from the HF cache, else downloaded unless offline."""
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        if is_offline_mode():
            raise ModelSpecError(f"{at!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                                 "downloading it") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise ModelSpecError(f"{at!r} is neither a local folder nor in the HF cache, and the Hub has no such "
                             "repository (or it needs a token)") from None
    except (HfHubHTTPError, OSError, LocalEntryNotFoundError) as exc:
        raise ModelSpecError(f"{at!r} is neither a local folder nor in the HF cache, and the Hub cannot be "
                             f"reached: {type(exc).__name__}") from None


# random models built (and cached) on first use: name prefix -> (module with ``cached(name)``, its names)
_GENERATED: dict[str, tuple[str, str]] = {"toy-": ("attnflow.toys.tiny", "FAMILIES"),
                                          "geometry-": ("attnflow.toys.geometry", "GEOMETRIES")}


def resolve(spec: str, revision: str | None = None) -> Path:
    """The local folder a model spec stands for (a bundled name, a folder, or a hub id)."""
    if spec in BUNDLED:
        path = bundled_path(spec, 0)
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"the bundled model {spec} is missing from {path}; rebuild it with `make {spec}`")
        return path
    for prefix, (module_name, names_attr) in _GENERATED.items():
        if spec.startswith(prefix):
            module = importlib.import_module(module_name)
            names = list(getattr(module, names_attr))
            if spec[len(prefix):] not in names:
                raise ModelSpecError(f"unknown model {spec!r}; bundled: {', '.join(BUNDLED)}; generated: "
                                     + ", ".join(prefix + n for n in names))
            return module.cached(spec[len(prefix):])
    path = Path(spec)
    if not path.exists() and HUB_ID.match(spec):
        path = _hub_snapshot(spec, revision)
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{spec!r} is neither a toy name ({', '.join(BUNDLED)}, toy-<family>), a model folder with a "
                             "config.json, nor a Hugging Face repo id (org/name)")
    return path


def default_device() -> str:
    """cuda when a GPU is there, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str | Path, *, attn_implementation: str | None = None,
               dtype: "torch.dtype | str | None" = None, device: str | None = None,
               device_map: str | dict | None = None, revision: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, processor or tokenizer) for a bundled name, a local folder or a hub id.

    ``dtype``: a torch dtype or one of DTYPES' names (default: the checkpoint's float32 on the
    CPU). ``device``: where the whole model goes (default: cuda when available); ``device_map``
    ("auto" or an explicit map) spreads its layers over devices with accelerate instead."""
    path = resolve(str(spec), revision)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    adapter = adapter_of_type(config.model_type, str(path))
    kwargs: dict[str, Any] = {"local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelSpecError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:  # layers a map sends to "disk" are offloaded to a temporary folder
        kwargs.update(device_map=device_map, offload_folder=tempfile.mkdtemp(prefix="attnflow-offload-"))
        if device_map == "auto" and (memory := parallel.rank_max_memory()):  # data parallel: this rank's GPUs
            kwargs["max_memory"] = memory
    if adapter.multimodal:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = _vlm_processor(path, adapter)
    else:
        arch = (config.architectures or [None])[0]
        auto = getattr(transformers, arch, None) if arch else None
        auto = auto or (AutoModelForCausalLM if adapter.causal else AutoModel)
        model = auto.from_pretrained(path, **kwargs)
        processor = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.config._name_or_path = str(spec)
    if device_map is None:
        try:
            model = model.to(parallel.rank_device(device or default_device()))
        except (RuntimeError, AssertionError) as exc:  # e.g. "cuda" on a machine without one
            raise ModelSpecError(f"cannot put the model on device {device!r}: {exc}") from None
    return model.eval(), processor


def _vlm_processor(path: Path, adapter: Any) -> Any:
    """A VLM's processor: the adapter's own class (attnflow.processors) when it names one."""
    if adapter.processor:
        from attnflow import processors
        return processors.load(adapter.processor, path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def default_inputs(spec: str) -> Path:
    """The inputs that go with a bundled model: a trained model's held-out set, or a toy's samples."""
    if spec in BUNDLED:
        path = bundled_path(spec, 1)
        if not path.is_file():
            raise ModelSpecError(f"the bundled held-out set is missing from {path}")
        return path
    if spec.startswith("toy-"):
        return _toy_inputs(resolve(spec))
    if spec.startswith("geometry-"):
        return resolve(spec) / "inputs" / "inputs.jsonl"
    raise ModelSpecError(f"--inputs is required for {spec!r} (only bundled models have default inputs)")


def bundled_models() -> list[dict[str, Any]]:
    """One row per shipped trained model: name, path, model_type, visual tokens per image, parameters,
    held-out file, and the held-out accuracy (overall, by question type, with blank images) its
    training.json records."""
    rows = []
    for name in BUNDLED:
        path, heldout = bundled_path(name, 0), bundled_path(name, 1)
        row: dict[str, Any] = {"name": name, "path": str(path), "model_type": None, "visual_tokens": None,
                               "parameters": None, "size_mb": None, "heldout": str(heldout),
                               "accuracy": None, "blank_accuracy": None, "accuracy_by_type": None}
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
    weights = path / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        parameters = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    row: dict[str, Any] = {"model_type": config.model_type, "parameters": parameters,
                           "size_mb": round(sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20, 1)}
    if heldout.is_file():
        processor = _vlm_processor(path, adapter_of_type(config.model_type, str(path)))
        ids = encode(processor, load_examples(heldout)[:1])["input_ids"][0]
        row["visual_tokens"] = int((ids == config.image_token_id).sum())
    info_path = path / "training.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        row["accuracy"] = info.get("heldout", {}).get("accuracy")
        row["blank_accuracy"] = info.get("heldout_blank_images", {}).get("accuracy")
        row["accuracy_by_type"] = info.get("heldout", {}).get("per_type")
    return row


def _toy_inputs(folder: Path) -> Path:
    """Write a tiny toy's sample prompts (and their images as PNG) as JSONL beside it, once."""
    from attnflow.fileio import atomic_dir
    from attnflow.probes.inputs import write_examples
    from attnflow.toys import tiny

    family = folder.name.rsplit("-seed", 1)[0]
    target = folder / "inputs"
    if not (target / "inputs.jsonl").is_file():
        with atomic_dir(target) as tmp:
            write_examples(tmp, tiny.sample_prompts(family))
    return target / "inputs.jsonl"
