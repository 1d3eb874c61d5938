"""Every assumption attnflow makes about transformers' and nnsight's internals, in one place.

probes/, analyses/ and reducers/ hook into the middle of Hugging Face models: they read the
keyword arguments a decoder layer is called with, recognise a decode step by its KV cache,
and read the attention call inside ``self_attn.forward`` through nnsight's ``.source``. The
names of those things belong to transformers, not to attnflow, and change between releases
(5.24 renamed the forward's ``past_key_values=`` to ``cache=``). This module is the only one
that names them; everything else asks it. When an internal is missing, the error names the
installed versions and the range attnflow is tested with instead of failing deep inside.

This module imports nothing of attnflow, so every layer may use it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as metadata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import transformers
from torch import Tensor

# Forward keyword arguments that carry the KV cache: "cache" from transformers 5.24 on,
# "past_key_values" before (5.24 still accepts it from callers, renaming it on the way in).
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values")

# Keyword arguments of a decoder layer's forward (and of its attention module's).
HIDDEN_STATES = "hidden_states"
ATTENTION_MASK = "attention_mask"
POSITION_EMBEDDINGS = "position_embeddings"  # (cos, sin), sequence dim -2
POSITION_IDS = "position_ids"

# The op inside every family's attention forward whose inputs are (module, q, k, v, mask) with
# keys already rotated and ``scaling`` as a keyword: the first (and only) call of the
# attention interface, as nnsight's ``.source`` names it.
ATTENTION_CALL = "attention_interface_1"

_STACK = ("transformers", "nnsight", "torch")


class InternalsError(RuntimeError):
    """An internal of transformers or nnsight that attnflow relies on is not there."""


@cache
def tested_ranges() -> dict[str, str]:
    """The version range of each stack package that attnflow declares (and was tested with),
    read from the installed package's own metadata (pyproject.toml)."""
    try:
        requires = metadata.requires("attnflow") or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, str] = {}
    for req in requires:
        if ";" in req:  # an extra's requirement
            continue
        name = req.split("[")[0].split(">")[0].split("<")[0].split("=")[0].split("!")[0].strip()
        if name in _STACK:
            out[name] = req[len(name):].strip()
    return out


def versions() -> dict[str, str]:
    """Installed versions of the stack packages attnflow reaches into."""
    out = {}
    for name in _STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def internals_error(what: str) -> InternalsError:
    """An error saying ``what`` is missing, with the installed and the tested versions."""
    ranges = tested_ranges()
    installed = ", ".join(f"{k} {v}" for k, v in versions().items())
    tested = ", ".join(f"{k}{ranges[k]}" for k in _STACK if k in ranges) or "see pyproject.toml"
    return InternalsError(f"{what}; installed: {installed}; attnflow is tested with {tested} "
                          "(install from requirements/lock.txt, or see the README's 'Moving the lock')")


def forward_cache(kwargs: dict[str, Any]) -> Any | None:
    """The KV cache a model's forward was called with, under whichever name the caller used."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def is_decode_step(kwargs: dict[str, Any]) -> bool:
    """True when a model forward continues from a non-empty KV cache (a decode step of
    ``generate``), False for a prefill or a plain forward."""
    past = forward_cache(kwargs)
    if past is None:
        return False
    length = getattr(past, "get_seq_length", None)
    if length is None:
        raise internals_error(f"the KV cache passed to forward ({type(past).__name__}) has no get_seq_length()")
    return length() > 0


def output_cache(output: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned."""
    for name in CACHE_KWARGS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise internals_error(f"{type(output).__name__} carries no KV cache under {list(CACHE_KWARGS)}")


def cache_kwargs(past: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``past`` to a model's forward in the installed version."""
    return {cache_kwarg(): past}


@cache
def cache_kwarg() -> str:
    """The name the installed transformers' forwards take the KV cache under."""
    fields = getattr(transformers.modeling_outputs.CausalLMOutputWithPast, "__dataclass_fields__", {})
    for name in CACHE_KWARGS:
        if name in fields:
            return name
    raise internals_error("transformers' CausalLMOutputWithPast has no KV-cache field")


def layer_hidden(output: Any) -> Tensor:
    """The hidden states a decoder layer returned (a plain tensor in 5.x, a tuple before)."""
    return output[0] if isinstance(output, tuple) else output


def rope_function(attention: Any) -> Any:
    """The ``apply_rotary_pos_emb`` that ``attention``'s forward calls: the function of that
    name in the module that defines its class (each family's modeling file has its own)."""
    module = importlib.import_module(type(attention).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise internals_error(f"{module.__name__} has no apply_rotary_pos_emb beside {type(attention).__name__}")
    return fn


def attention_call(attention: Any) -> Any:
    """nnsight's handle on the attention-interface call inside ``attention`` (an Envoy of a
    family's attention module); its ``.inputs`` are ((module, q, k, v, mask), kwargs) and its
    ``.output`` is (attn_output, weights-or-None)."""
    source = attention.source
    try:
        return getattr(source, ATTENTION_CALL)
    except AttributeError as exc:
        raise internals_error(f"the attention forward of {type(attention._module).__name__} has no "
                              f"{ATTENTION_CALL!r} op for nnsight to hook") from exc


@contextmanager
def sdpa_routed(route: Callable[..., Any]) -> Iterator[None]:
    """Within the block, every call of transformers' attention function registered as "sdpa" goes
    to ``route(sdpa, module, query, key, value, attention_mask, **kwargs)``, where ``sdpa`` is
    transformers' own function (for the calls ``route`` passes on). Masks are still built for
    SDPA, so the model runs its SDPA code path unchanged but for that one call. The table is
    process-wide: two threads recording at once in one process would share the route."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as table

    local = getattr(table, "_local_mapping", None)
    if local is None or "sdpa" not in table:
        raise internals_error("transformers' attention-function table has no local 'sdpa' override to route")
    had, before, sdpa = "sdpa" in local, local.get("sdpa"), table["sdpa"]
    table["sdpa"] = functools.partial(route, sdpa)
    try:
        yield
    finally:
        if had:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)
