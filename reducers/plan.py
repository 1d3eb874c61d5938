"""The ops of a Schedule, as decisions on which positions survive at each decoder layer.

``Planner`` turns a Schedule into one ``Cut`` per decoder-layer call for the shortening
mechanism (reducers.shorten): ``visual_exit`` and ``skip_layers`` are fixed per prompt,
``prune_visual`` at layer K is settled when layer K-1 has run and its scores are known
(``ranked``; reducers.rank computes them), and ``visual_exit_dynamic`` is settled layer by layer
from the last-row attention of each layer it reads (``exited``). Everything is per sample, so a
padded batch is cut sample by sample (samples may exit at different layers): pads
are dropped with the first cut, and when samples keep different counts the shorter ones carry
filler (their pads first, then tokens they dropped) that the mask hides from every query.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnflow.probes import adapters
from attnflow.probes.spans import token_spans
from attnflow.reducers import scores as score_fns
from attnflow.reducers.schedule import Schedule, ScheduleError, exit_checks
from attnflow.reducers.shorten import Cut


def kept_count(keep: float, n: Tensor) -> Tensor:
    """How many of ``n`` candidates a prune step with share ``keep`` keeps (rounded half up)."""
    return torch.floor(keep * n.to(torch.float64) + 0.5).to(torch.long)


def dropped(scores: Tensor, candidate: Tensor, n_keep: Tensor) -> Tensor:
    """[B, R]: the candidates outside each sample's top ``n_keep`` [B] by ``scores`` (ties: earlier slot kept)."""
    order = scores.masked_fill(~candidate, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
    return candidate & (rank >= n_keep[:, None])


def removable_visual(visual: Tensor, index: Tensor, sinks: list[int]) -> Tensor:
    """[B, R]: visual tokens whose visual-token ``index`` is not a protected sink."""
    return visual & ~torch.isin(index, torch.tensor(sinks, dtype=torch.long, device=visual.device))


def rectangular(want: Tensor, pad: Tensor, min_width: int = 0) -> tuple[Tensor, Tensor]:
    """Per sample, the slots where ``want`` holds, plus filler up to the batch's largest count
    (at least ``min_width``; pads first, then the earliest other slots), in slot order.
    Returns (slots, is_filler)."""
    b, n = want.shape
    fewest, most = (int(v) for v in want.sum(1).aminmax()) if b else (0, 0)
    width = max(min_width, most)
    if fewest == width:  # every sample wants as many slots as the batch is wide: no filler
        return want.nonzero()[:, 1].view(b, width), torch.zeros(b, width, dtype=torch.bool, device=want.device)
    slot = torch.arange(n, device=want.device).expand(b, n)
    priority = torch.where(want, 0, torch.where(pad, 1, 2)) * (n + 1) + slot
    chosen = priority.topk(width, dim=1, largest=False).indices.sort(dim=1).values
    return chosen, ~want.gather(1, chosen)


class Planner:
    """Which tokens each decoder layer processes under a schedule, for the current batch.

    After a prefill, ``layer_tokens[l]`` is (positions [B, R], real [B, R]) of the tokens layer
    ``l`` processed (original positions; ``real`` is False for pads and filler), ``positions``
    and ``real`` describe the rows of the model's output, and ``scores[K]`` holds the
    last-row attention used to rank visual tokens for the prune step at layer K (over the
    positions ``layer_tokens[K - 1]``). ``exit_layers`` [B] is, per sample, the layer from which
    its unprotected visual tokens are gone by an exit step (``num_layers``: never; a dynamic exit's
    realised layer, which reducers.cost turns into FLOPs), and ``shares[l]`` [B] the last-row
    share of its remaining unprotected visual tokens after layer ``l`` that a dynamic exit read.
    """

    def __init__(self, schedule: Schedule, model: nn.Module, *, prompt_length: int | None = None) -> None:
        self.num_layers = schedule.num_layers
        self.image_token_id = adapters.image_token_id(model)
        self.bos_ids = adapters.bos_ids(model)
        self.requested_length = self.prompt_length = prompt_length
        self.sinks = schedule.protect["visual_sinks"]
        dynamic = next(iter(schedule.steps_of("visual_exit_dynamic")), None)
        # a dynamic exit's checks and threshold; its bound ``to`` acts as a static exit
        self.checks = range(0) if dynamic is None else exit_checks(dynamic, self.num_layers)
        self.threshold = None if dynamic is None else dynamic["threshold"]
        self.exit = dynamic["to"] if dynamic else next((s["layer"] for s in schedule.steps_of("visual_exit")), None)
        inside = [s for s in schedule.steps_of("prune_visual") if s["layer"] > 0]  # layer 0: reducers.inputcut
        self.prunes = {s["layer"]: s["keep"] for s in inside}
        self.rank_by = {s["layer"]: (s["by"], s.get("seed", 0)) for s in inside}
        self.recycles = {s["layer"] for s in inside if s.get("recycle")}
        self.skips = {layer: s["tokens"] for s in schedule.steps_of("skip_layers") for layer in s["layers"]}
        # the layers where tokens may leave, known on the host: deciding a cut needs no device sync
        self.leave_layers = {*self.prunes, *(() if self.exit is None else (self.exit,))}
        # layers before the first that may cut process every token as the model does: no hook runs there
        self.first_cut = min({*self.leave_layers, *self.skips, *(c + 1 for c in self.checks)},
                             default=self.num_layers)
        self.sliding = adapters.window_layer_types(model)
        self.decoding = False
        self.layer_tokens: dict[int, tuple[Tensor, Tensor]] = {}
        self.scores: dict[int, Tensor] = {}
        self.shares: dict[int, Tensor] = {}
        self.exit_layers = torch.empty(0, dtype=torch.long)
        self.leaving: set[int] = set()  # per prompt: leave_layers plus the layers a dynamic exit settled
        self.checking = False  # per prompt: some sample has not exited yet, so the dynamic exit still reads
        # per prompt (set by a prefill): labels, when each position leaves, the current rows
        self.removed_at: Tensor | None = None
        self.pad = self.removable = self.pos = self.filler = torch.empty(0)
        # per prompt position: index among the sample's visual tokens (-1 if none), patch cell, text
        self.visual_index = self.patch_row = self.patch_col = self.text = torch.empty(0)
        self.origin: Tensor | None = None  # [B, n] each position's index in the unshortened prompt (layer-0 cut)
        self.raters = torch.empty(0, dtype=torch.bool)  # [B, n] SparseVLM's rater text tokens (reducers.rank)
        self.n_keep: dict[int, Tensor] = {}
        # per prompt, a recycling step's scores and candidates [B, n] by position, until its layer's states arrive
        self.recycling: dict[int, tuple[Tensor, Tensor]] = {}
        self.touched, self.steady, self.steady_entry = False, None, None
        self.cached: dict[int, tuple[Tensor, Tensor] | None] = {}
        self.decode_cuts: dict[tuple[int, bool], Cut] = {}  # this decode step's
        self.appended_cuts: dict[int, Cut] = {}  # this generation's, by cache layout (Cut.appended)
        self.plain_decode: dict[int, bool] = {}
        self.prompt_tokens = self.seen = 0
        # per prompt: decode steps run, and whether every hooked layer ran each of them unmasked and uncut
        self.decode_steps, self.unchanged_decode = 0, True

    # ---- prompt bookkeeping -------------------------------------------------------------
    def begin(self, input_ids: Tensor, attention_mask: Tensor | None,
              labels: dict[str, Tensor] | None = None, shortened: int = 0) -> None:
        """Start a prefill: label the prompt's tokens (a decode step starts with ``decode_step``).
        ``labels`` gives the per-position ``modality`` (read from the ids otherwise), ``visual_index``,
        ``patch_row``, ``patch_col`` and ``origin`` of a prompt shortened by ``shortened`` tokens before
        the first layer (it keeps its tokens' original ones, and spares a second reading of the ids)."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ScheduleError("reducers.apply needs a 2-D attention_mask (or none)")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ScheduleError("the batch is right-padded; reducers need left padding "
                                "(tokenizer.padding_side = 'left') so every prompt ends at the last position")
        b, n = input_ids.shape
        self.prompt_length = None if self.requested_length is None else self.requested_length - shortened
        if self.prompt_length is not None and not 0 < self.prompt_length <= n:
            raise ScheduleError(f"prompt_length {self.prompt_length} does not fit a sequence of {n} tokens")
        dev = input_ids.device
        labels = dict(labels or {})
        modality = labels.pop("modality", None)
        if modality is None:
            spans = token_spans(input_ids, attention_mask, image_token_id=self.image_token_id, bos_ids=self.bos_ids)
            modality = spans.modality
            labels = {"patch_row": torch.as_tensor(spans.patch_row, device=dev),
                      "patch_col": torch.as_tensor(spans.patch_col, device=dev), **labels}
        self.pad = torch.as_tensor(modality == "pad", device=dev)
        visual = torch.as_tensor(modality == "visual", device=dev)
        self.visual_index = torch.where(visual, visual.long().cumsum(1) - 1, -1)  # among the sample's visual tokens
        self.origin = None
        for name, value in labels.items():
            setattr(self, name, value)
        index = self.visual_index
        self.text = torch.as_tensor(modality == "text", device=dev)
        self.removable = removable_visual(visual, index, self.sinks)
        self.removed_at = torch.full((b, n), self.num_layers, dtype=torch.long, device=dev)
        if self.exit is not None:
            self.removed_at[self.removable] = self.exit
        self.exit_layers = torch.full((b,), self.num_layers if self.exit is None else self.exit, device=dev)
        self.leaving, self.checking, self.shares = set(self.leave_layers), bool(self.checks), {}
        n_removable = self.removable.sum(1)
        self.n_keep = {k: kept_count(keep, n_removable) for k, keep in self.prunes.items()}
        self.pos = torch.arange(n, device=dev).expand(b, n)
        self.filler = torch.zeros(b, n, dtype=torch.bool, device=dev)
        self.touched, self.steady, self.steady_entry = False, None, None
        self.cached, self.layer_tokens, self.scores, self.plain_decode, self.recycling = {}, {}, {}, {}, {}
        for layer in range(self.first_cut):
            self.cached[layer], self.layer_tokens[layer] = None, (self.pos, ~self.pad)
        self.prompt_tokens = self.seen = n
        self.decoding, self.decode_steps, self.unchanged_decode = False, 0, True
        self.appended_cuts = {}

    def decode_step(self, new_tokens: int) -> None:
        """Start a decode step of ``new_tokens`` tokens after the prefill (and the steps before)."""
        if self.removed_at is None:
            raise ScheduleError("a decode step arrived without a prefill under this schedule: "
                                "run the whole generation inside `with reducers.apply(...)`")
        if self.sliding and self.touched:
            raise ScheduleError(f"decoding with a KV cache under a schedule is not supported for models with "
                                f"{'/'.join(self.sliding)} layers: their cache keeps a window of entries, not "
                                "of positions. Run full forwards (use_cache=False) instead")
        self.decoding = True
        self.decode_steps += 1
        self.seen += new_tokens
        self.decode_cuts = {}

    @property
    def query_position(self) -> int:
        """The position whose attention row ranks tokens: the last prompt position."""
        return (self.prompt_length or self.pad.shape[1]) - 1

    @property
    def positions(self) -> Tensor:
        return self.pos

    def original(self, positions: Tensor) -> Tensor:
        """``positions`` [B, R] of the (possibly shortened) prompt as indices into the prompt given to the model."""
        return positions if self.origin is None else self.origin.gather(1, positions)

    @property
    def real(self) -> Tensor:
        return ~self.filler & ~self.pad.gather(1, self.pos)

    # ---- cuts ---------------------------------------------------------------------------
    def __call__(self, layer: int, hidden: Tensor, masked: bool) -> Cut | None:
        """The cut of this call of ``layer``; ``masked``: the model passed the layer a mask tensor."""
        if not self.decoding:
            return self._prefill_cut(layer, hidden)
        if not masked and self._plain_decode(layer):
            return None
        self.unchanged_decode = False
        return self._decode_cut(layer, hidden, masked)

    @property
    def decodes_unchanged(self) -> bool:
        """Whether this prompt's decode steps so far (at least one) ran every layer as the unreduced
        model does, unmasked: the layer hooks can be left out of its further decode steps (a
        generation keeps its mask's presence, and a new prefill brings them back)."""
        return self.decoding and self.decode_steps > 0 and self.unchanged_decode

    def _plain_decode(self, layer: int) -> bool:
        """Whether, without a mask, a decode step runs ``layer`` as the unreduced model does: its cache
        holds no filler or pad and it is not skipped (its cache is merely shorter). Decided once
        per prompt, for every layer at once with one device sync, so decode steps pay neither a cut
        nor a sync (one per layer made a GPU wait 30 times in the first decode step)."""
        if layer not in self.plain_decode:
            fills = {i: e[1] for i, e in self.cached.items() if e is not None}
            any_fill = dict(zip(fills, torch.stack([f.any() for f in fills.values()]).tolist())) if fills else {}
            for i in set(self.cached) | {layer}:
                self.plain_decode[i] = i not in fills or (self.skips.get(i) != "all" and not any_fill[i])
        return self.plain_decode[layer]

    def _prefill_cut(self, layer: int, hidden: Tensor) -> Cut | None:
        pos_in = self.pos
        states = self._recycle(layer, hidden) if layer in self.recycling else None
        pad_in = self.pad.gather(1, pos_in)
        skip = self.skips.get(layer)
        changes = skip is not None or layer in self.leaving
        if not self.touched and not changes:
            self.cached[layer] = None
            self.layer_tokens[layer] = (pos_in, ~pad_in)
            return None
        if not changes:  # as the previous layer: the same Cut object, so slices are reused
            if self.steady is None:
                blocked = pad_in | self.filler
                self.steady = Cut(take=None, rows=pos_in, row_keys=pos_in, cols=pos_in, blocked=blocked)
                # after a cut that every kept token ran, the cache layout is that cut's own: share its
                # entry, so decode steps build one cut (and slice the mask once) for all those layers
                self.steady_entry = self.steady_entry or (pos_in, blocked)
            self.cached[layer] = self.steady_entry
            self.layer_tokens[layer] = (pos_in, ~self.steady.blocked)
            return self.steady
        self.touched, self.steady = True, None
        gone = (self.removed_at.gather(1, pos_in) <= layer) & ~pad_in & ~self.filler  # leave here
        keep, keep_filler = rectangular(~pad_in & ~self.filler & ~gone, pad_in)
        kept = pos_in.gather(1, keep)
        kept_pad = self.pad.gather(1, kept)
        if skip == "all":
            run_want = torch.zeros_like(keep_filler)
        elif skip == "visual":
            run_want = ~keep_filler & ~self.removable.gather(1, kept)
        else:
            run_want = ~keep_filler
        # a layer every token skips still runs one filler token: attention needs a non-empty query
        put, run_filler = rectangular(run_want, kept_pad, min_width=1)
        take = keep.gather(1, put)
        rows = pos_in.gather(1, take)
        self.pos, self.filler = kept, keep_filler & ~kept_pad
        self.cached[layer] = (rows, run_filler)
        self.layer_tokens[layer] = (rows, ~run_filler)
        same = put.shape[1] == keep.shape[1]
        self.steady_entry = self.cached[layer] if same and skip is None else None
        return Cut(take=take, rows=rows, row_keys=rows, cols=rows, blocked=run_filler,
                   keep=None if same else keep, put=put, write=~run_filler, states=states)

    def _recycle(self, layer: int, hidden: Tensor) -> Tensor:
        """Settle the recycling prune step at ``layer`` from its scores and the states entering the
        layer (``hidden`` [B, R, D] over ``pos``): the tokens it drops leave here; returns the states
        with the recycled cluster centres' rows replaced (reducers.scores.recycle)."""
        scores, candidates = (t.gather(1, self.pos) for t in self.recycling.pop(layer))
        drop, states = score_fns.recycle(scores, candidates, self.n_keep[layer], hidden)
        current = self.removed_at.gather(1, self.pos)
        self.removed_at = self.removed_at.scatter(1, self.pos, torch.where(drop, torch.full_like(current, layer), current))
        return states

    def _decode_cut(self, layer: int, hidden: Tensor, masked: bool) -> Cut | None:
        entry = self.cached.get(layer)
        if entry is None:
            return None
        whole_skip = self.skips.get(layer) == "all"
        if masked and not whole_skip:  # one Cut per cache layout for the whole generation
            if id(entry) not in self.appended_cuts:
                self.appended_cuts[id(entry)] = Cut(take=None, rows=None, row_keys=entry[0][:, :0], cols=entry[0],
                                                    blocked=entry[1], appended=self.prompt_tokens)
            return self.appended_cuts[id(entry)]
        memo = (id(entry), whole_skip)
        if memo not in self.decode_cuts:  # layers that share a cache layout share one Cut
            self.decode_cuts[memo] = self._new_decode_cut(entry, whole_skip, hidden)
        return self.decode_cuts[memo]

    def _new_decode_cut(self, entry: tuple[Tensor, Tensor], whole_skip: bool, hidden: Tensor) -> Cut:
        cached_rows, cached_blocked = entry
        b, q = hidden.shape[:2]
        dev = hidden.device
        generated = torch.arange(self.prompt_tokens, self.seen, device=dev).expand(b, -1)
        new_keys = generated[:, generated.shape[1] - q:]
        slots = torch.arange(q, device=dev).expand(b, q)
        cols = torch.cat([cached_rows, generated], 1)
        if whole_skip:  # new tokens bypass it too: they run as filler, unwritten
            return Cut(take=None, rows=None, row_keys=new_keys, cols=cols,
                       blocked=torch.ones_like(cols, dtype=torch.bool),
                       keep=slots, put=slots, write=torch.zeros_like(slots, dtype=torch.bool))
        return Cut(take=None, rows=None, row_keys=new_keys, cols=cols,
                   blocked=torch.cat([cached_blocked, torch.zeros_like(generated, dtype=torch.bool)], 1))

    # ---- ranking ------------------------------------------------------------------------
    def ranks_after(self, layer: int) -> bool:
        """Whether a prune step needs layer ``layer``'s last-row attention in this forward."""
        return not self.decoding and layer + 1 in self.prunes

    def checks_after(self, layer: int) -> bool:
        """Whether the dynamic exit reads layer ``layer``'s last-row attention in this forward
        (not once every sample of the batch has exited)."""
        return self.checking and not self.decoding and layer in self.checks

    def query_slots(self, layer: int) -> Tensor:
        """Per sample, the slot of the ranking query among the tokens layer ``layer`` processes."""
        rows, _ = self.layer_tokens[layer]
        hit = rows == self.query_position
        if not bool(hit.any(1).all()):
            raise ScheduleError(f"the ranking query (position {self.query_position}) is not processed by "
                                f"layer {layer}")
        return hit.float().argmax(1)

    def candidates(self, layer: int) -> Tensor:
        """[B, R] over the tokens layer ``layer`` processed: the unprotected visual tokens the prune
        step at ``layer + 1`` may remove (real, not removed before)."""
        rows, real = self.layer_tokens[layer]
        return real & self.removable.gather(1, rows) & (self.removed_at.gather(1, rows) > layer + 1)

    def ranked(self, layer: int, scores: Tensor) -> None:
        """Settle the prune step at ``layer + 1`` from ``scores`` [B, R] (higher: kept first) over
        the tokens layer ``layer`` processed: keep the top ``n_keep`` unprotected visual tokens per
        sample, remove the rest from ``layer + 1`` on."""
        k = layer + 1
        rows, _ = self.layer_tokens[layer]
        self.scores[k] = scores
        if k in self.recycles:  # recycling clusters the states entering layer k: settled there (``_recycle``)
            by_position = torch.full(self.removed_at.shape, float("-inf"), device=scores.device)
            self.recycling[k] = (by_position.scatter(1, rows, scores.float()),
                                 torch.zeros_like(self.pad).scatter(1, rows, self.candidates(layer)))
            return
        drop = dropped(scores, self.candidates(layer), self.n_keep[k])
        current = self.removed_at.gather(1, rows)
        self.removed_at = self.removed_at.scatter(1, rows, torch.where(drop, torch.full_like(current, k), current))

    def exited(self, layer: int, scores: Tensor) -> None:
        """Settle the dynamic exit after ``layer`` from its last-row attention ``scores`` [B, R]
        over the tokens layer ``layer`` processed: a sample not yet gone whose remaining unprotected
        visual tokens get a share below the threshold has them leave from ``layer + 1`` on. One
        device sync: whether any sample left (layer ``layer + 1`` then cuts) and whether all have."""
        rows, real = self.layer_tokens[layer]
        share = scores.masked_fill(~(real & self.removable.gather(1, rows)), 0.0).sum(1)
        self.shares[layer] = share
        leave = (share < self.threshold) & (self.exit_layers > layer + 1)
        self.exit_layers = torch.where(leave, layer + 1, self.exit_layers)
        self.removed_at = torch.where(leave[:, None] & self.removable, self.removed_at.clamp_max(layer + 1),
                                      self.removed_at)
        left, done = torch.stack([leave.any(), (self.exit_layers <= layer + 1).all()]).tolist()
        if left:
            self.leaving.add(layer + 1)
        self.checking = not done
