"""Run a Hugging Face model under a Schedule: ``with apply(model, schedule): model.generate(...)``.

The model object itself runs the schedule (plain ``forward``, ``generate`` with its KV cache,
padded batches, pixel_values and every other input passed as usual): a pre-hook on the model
labels each prompt's tokens, hooks on the decoder layers shorten them (reducers.shorten), and
every hook is removed on exit, also when the body raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

from attnflow import compat
from attnflow.probes import adapters
from attnflow.reducers.inputcut import InputCut, attach_input_cut
from attnflow.reducers.plan import Planner
from attnflow.reducers.rank import attach_rankers
from attnflow.reducers.schedule import Schedule, ScheduleError, load_schedule
from attnflow.reducers.shorten import Shortener

BACKENDS: tuple[str, ...] = ("eager", "sdpa")


def cannot_shorten(model: nn.Module) -> str | None:
    """Why the reducers cannot shorten ``model``'s family (None when they can)."""
    adapter = adapters.adapter_for(model)
    if not adapter.causal:
        return (f"{adapter.family} is not a causal decoder (an encoder or a prefix-LM): reducers shorten "
                "causal decoders only")
    if adapter.unshortenable:
        return f"reducers cannot shorten {adapter.family}: {adapter.unshortenable}"
    return None


class _LayerHooks:
    """The decoder-layer hooks of one ``apply``: the shortener's, and the rankers' (attached after it:
    they must see cut inputs), each attached only while a forward needs it: a hook's mere presence
    sends every call of its module down PyTorch's slower path."""

    def __init__(self, shortener: Shortener, rankers: Callable[[], list[RemovableHandle]]) -> None:
        self.shortener, self.rankers = shortener, rankers
        self.handles: list[RemovableHandle] = []
        self.cutting = self.ranking = False

    def on(self, cutting: bool, ranking: bool) -> None:
        """Attach or remove the shortener's (``cutting``) and the rankers' (``ranking``) hooks."""
        ranking = ranking and cutting
        if ranking != self.ranking or (cutting and not self.cutting):
            for h in self.handles:
                h.remove()
            self.handles, self.ranking = [], False
        if cutting != self.cutting:
            (self.shortener.attach if cutting else self.shortener.detach)()
            self.cutting = cutting
        if ranking and not self.ranking:
            self.handles, self.ranking = self.rankers(), True


@contextmanager
def apply(model: nn.Module, schedule: "Schedule | dict[str, Any] | str | Path", *,
          prompt_length: int | None = None) -> Iterator[Planner]:
    """Run ``model`` under ``schedule`` inside the block; yields the Planner, which tells
    after each forward which positions every layer processed.

    ``prompt_length`` pins the ranking query to position ``prompt_length - 1`` when forwards
    include generated tokens (a generation loop that recomputes the whole prefix each step);
    by default it is the last position of each prefill.
    """
    sched = load_schedule(schedule)
    sched.check_model(model)
    why = cannot_shorten(model)
    if why:
        raise ScheduleError(why)
    adapter = adapters.adapter_for(model)
    backend = adapters.attn_implementation(model)
    if backend not in BACKENDS:
        raise ScheduleError(f"reducers run under attention backends {list(BACKENDS)}, not {backend!r}: "
                            "load the model with attn_implementation='sdpa' or 'eager'")
    layers = adapters.decoder_layers(model)
    planner = Planner(sched, model, prompt_length=prompt_length)
    first = next((s for s in sched.steps_of("prune_visual") if s["layer"] == 0), None)
    cut = None if first is None else InputCut(first, planner, bool_mask=backend != "eager")

    shortener = Shortener(layers, planner, bool_mask=backend != "eager", first=planner.first_cut)
    layer_hooks = _LayerHooks(shortener, lambda: attach_rankers(layers, planner, adapter))

    def begin(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ScheduleError("reducers.apply needs input_ids (not only inputs_embeds) to find the visual tokens")
        decoding = compat.is_decode_step(kwargs)
        # decode steps rank nothing, and those that change nothing need no layer hooks at all: a hooked
        # module takes PyTorch's slower call path, which cost more than a shorter cache saves on small models
        layer_hooks.on(not (decoding and planner.decodes_unchanged), not decoding)
        if cut is not None:  # the language model's own pre-hook begins the planner on the shortened prompt
            cut.seen(input_ids, kwargs.get(compat.ATTENTION_MASK))
        elif decoding:
            planner.decode_step(input_ids.shape[1])
        else:
            planner.begin(input_ids, kwargs.get(compat.ATTENTION_MASK))

    handles = [model.register_forward_pre_hook(begin, with_kwargs=True)]
    try:
        if cut is not None:
            handles += attach_input_cut(model, cut)
        layer_hooks.on(True, True)
        yield planner
    finally:
        layer_hooks.on(False, False)
        for h in handles:
            h.remove()
