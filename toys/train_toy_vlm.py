"""Train the toy VLM (a tiny LLaVA) on the procedural task of ``attnflow.toys.vqa_task``, on the CPU.

``python -m attnflow.toys.train_toy_vlm --out data/toy-vlm [--seed 0]`` builds the processor
(a word-level tokenizer and a CLIP image processor, both made here, no hub) and an
``LlavaForConditionalGeneration`` (CLIP vision tower -> GELU projector -> Llama decoder), trains it
with one thread so that a seed gives the same weights, and replaces ``--out`` atomically with the
``save_pretrained`` model and processor plus ``training.json`` (recipe, wall time, held-out
accuracy with real and with blank images, the training log).

The answer loss falls on the answer word, plus a small weight on ``<eos>`` so that greedy
generation stops after it. Training is staged (see ``Recipe``):

1. one object per image, answer loss plus a per-patch captioning loss: through the LM head, the
   last layer's state at an object's visual token must name its colour, shape and quadrant (the
   vision tower and projector learn readable features before the decoder has learnt to look);
2. one or two objects, mostly two (only two objects teach binding a question word to an
   object), both losses;
3. the answer loss alone for the last steps, so the final model is a plain VQA model.
Measured on the way (seed 0): with prompts ending in "?" and no captioning loss, 42% after 500
steps of 64 images, near the answer prior; captioning colour and shape but not the quadrant left
"where" at chance; with one or two objects equally often, 2,000 steps gave 89% overall but 62% on
``exists_color``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from attnflow.fileio import atomic_dir, write_json
from attnflow.toys import vqa_task
from attnflow.toys.evaluate import evaluate


@dataclass(frozen=True)
class Recipe:
    """Model size and optimisation settings; the defaults are the shipped model's."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_mlp: int = 512
    steps: int = 2400
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eos_weight: float = 0.1
    patch_weight: float = 1.0  # per-patch captioning loss: an object's visual tokens name its colour, shape, quadrant
    patch_steps: int = 2000  # the per-patch loss is on for these first steps (stages 1-2)
    patch_layer: int | None = None  # caption from this decoder layer's output (None: the last layer's; 0: the input)
    caption_input: bool = False  # caption the LLM's input (the projector's output) too
    tie_embeddings: bool = False  # LM head = input embeddings: a captioned visual token then looks like its words
    single_object_steps: int = 200  # stage 1: one object per image for the first steps
    two_object_share: float = 0.7  # then two objects this often: only they teach binding a word to an object
    refer_layer: int | None = None  # referent loss from this decoder layer's output (None: off; needs TaskSpec.refer)
    refer_weight: float = 1.0

    def n_objects(self, step: int, rng: np.random.Generator) -> int:
        """Objects in a training image: one during the curriculum's first stage, then two at ``two_object_share``."""
        if step < self.single_object_steps:
            return 1
        return 2 if rng.random() < self.two_object_share else 1


@dataclass(frozen=True)
class TaskSpec:
    """What the trainer needs to know about a task and a model family's visual tokens.

    ``sample(rng, n_objects)`` draws a training example; the per-patch captioning loss asks the
    visual token ``token_of(obj)`` (of ``n_visual`` per image, row-major) to name ``caption(obj)``.
    ``positions``: pass explicit position ids (LLaVA); Qwen2-VL computes its own M-RoPE ids.
    ``refer(example)``: (k, words) pairs for the referent loss: the k-th last prompt token names an
    object, whose words (or ``("no",)`` when the scene has none) a middle layer must name.
    """

    sample: Callable[[np.random.Generator, int], Any]
    n_visual: int
    token_of: Callable[[Any], int]
    caption: Callable[[Any], tuple[str, ...]]
    positions: bool = True
    refer: Callable[[Any], list[tuple[int, tuple[str, ...]]]] | None = None


VQA_SPEC = TaskSpec(sample=lambda rng, n: vqa_task.sample_example(rng, n_objects=n), n_visual=vqa_task.GRID ** 2,
                    token_of=lambda o: o.patch, caption=lambda o: (o.color, o.shape, o.quadrant))


def word_tokenizer(vocab: list[str], extra_special: dict[str, str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab`` (specials first) that prepends ``<bos>`` and pads on the left."""
    ids = {w: i for i, w in enumerate(vocab)}
    core = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", ids["<bos>"])])
    core.add_special_tokens([*vqa_task.SPECIAL_TOKENS, *extra_special.values()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens=extra_special)


def build_processor(task: ModuleType = vqa_task) -> LlavaProcessor:
    """A LlavaProcessor over the task's words: ``<image>`` expands to one token per patch, BOS is prepended."""
    tokenizer = word_tokenizer(task.vocabulary(), {"image_token": vqa_task.IMAGE_TOKEN})
    size = task.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=task.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=vqa_task.IMAGE_TOKEN)


def build_model(processor: LlavaProcessor, recipe: Recipe, seed: int,
                task: ModuleType = vqa_task) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA whose sizes come from the recipe and whose ids match the processor."""
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_hidden, intermediate_size=4 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
        image_size=task.IMAGE_SIZE, patch_size=task.PATCH)
    n_visual = (task.IMAGE_SIZE // task.PATCH) ** 2
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.text_hidden, intermediate_size=recipe.text_mlp,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_heads, max_position_embeddings=max(128, 2 * n_visual),
        tie_word_embeddings=recipe.tie_embeddings, **text_ids(tok))
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=n_visual, tie_word_embeddings=recipe.tie_embeddings)
    torch.manual_seed(seed)
    return set_generation(LlavaForConditionalGeneration(config), tok)


def text_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special token ids a text config needs."""
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def set_generation(model: Any, tok: PreTrainedTokenizerFast) -> Any:
    """Greedy generation of ``answer <eos>`` by default; returns the model."""
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.max_new_tokens, gen.do_sample = 2, False
    return model


def training_batch(processor: Any, examples: list[vqa_task.VQAExample],
                   spec: TaskSpec = VQA_SPEC) -> dict[str, torch.Tensor]:
    """Processor inputs for the prompts, left-padded, with ``answer <eos>`` appended (and position ids)."""
    batch = dict(processor(text=[e.prompt for e in examples], images=[e.image for e in examples],
                           padding=True, return_tensors="pt"))
    tok = processor.tokenizer
    answers = torch.tensor(tok.convert_tokens_to_ids([e.answer for e in examples]))
    tail = torch.stack([answers, torch.full_like(answers, tok.eos_token_id)], dim=1)
    fill = {"input_ids": tail, "attention_mask": torch.ones_like(tail)}  # other per-token rows get zeros
    width = batch["input_ids"].shape
    for key, value in list(batch.items()):
        if torch.is_tensor(value) and value.shape == width:
            batch[key] = torch.cat([value, fill.get(key, torch.zeros_like(tail))], dim=1)
    if spec.positions:
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate does
    out = {**batch, "targets": tail, "patch_targets": _patch_targets(tok, examples, spec)}
    if spec.refer is not None:
        out["refer_targets"] = _refer_targets(tok, examples, spec.refer, width[1])
    return out


def _refer_targets(tok: PreTrainedTokenizerFast, examples: list[vqa_task.VQAExample],
                   refer: Callable[[Any], list[tuple[int, tuple[str, ...]]]], prompt_len: int) -> torch.Tensor:
    """[B, prompt tokens, words] word ids the referent loss asks for at each referring token; -100 elsewhere."""
    pairs = [refer(e) for e in examples]
    targets = torch.full((len(examples), prompt_len, max((len(w) for p in pairs for _, w in p), default=1)), -100)
    for i, pair in enumerate(pairs):
        for k, words in pair:
            targets[i, prompt_len - k, :len(words)] = torch.tensor(tok.convert_tokens_to_ids(list(words)))
    return targets


def _patch_targets(tok: PreTrainedTokenizerFast, examples: list[vqa_task.VQAExample], spec: TaskSpec) -> torch.Tensor:
    """[B, visual tokens, k] word ids of each object's caption at its visual token; -100 where none is."""
    width = len(spec.caption(examples[0].objects[0]))
    targets = torch.full((len(examples), spec.n_visual, width), -100)
    for i, e in enumerate(examples):
        for o in e.objects:
            targets[i, spec.token_of(o)] = torch.tensor(tok.convert_tokens_to_ids(list(spec.caption(o))))
    return targets


def _lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _lens(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A middle layer's states -> logits through the final norm and the LM head."""
    text_model = getattr(model.model, "language_model", None) or model.model.text_model  # Idefics3
    return lambda h: model.lm_head(text_model.norm(h))


def _multi_word_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of [N, V] logits against each of [N, k] target words (-100: none)."""
    k = targets.shape[-1]
    return torch.nn.functional.cross_entropy(logits.unsqueeze(1).expand(-1, k, -1).reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))


def train(model: Any, processor: Any, recipe: Recipe, seed: int, log_every: int = 50,
          spec: TaskSpec = VQA_SPEC, device: str = "cpu") -> list[dict[str, float]]:
    """Train in place on freshly sampled examples (on ``device``; the model ends on the CPU); return the
    logged (step, loss, answer accuracy) rows."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, recipe))
    weights = torch.tensor([1.0, recipe.eos_weight], device=device)
    log, losses, hits, t0 = [], [], defaultdict(list), time.perf_counter()
    model.to(device).train()
    for step in range(recipe.steps):
        examples = [spec.sample(rng, recipe.n_objects(step, rng)) for _ in range(recipe.batch_size)]
        batch = {k: v.to(device) for k, v in training_batch(processor, examples, spec).items()}
        targets, patch_targets = batch.pop("targets"), batch.pop("patch_targets")
        refer_targets = batch.pop("refer_targets", None)
        patch_on = step < recipe.patch_steps and recipe.patch_weight > 0
        refer_on = patch_on and refer_targets is not None and recipe.refer_layer is not None
        middle = patch_on and (recipe.patch_layer is not None or recipe.caption_input)
        out = model(**batch, logits_to_keep=0 if patch_on else 3, output_hidden_states=middle or refer_on)
        all_logits = out.logits
        logits = all_logits[:, -3:-1]  # predictions of answer and <eos>
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (ce.mean(0) * weights).sum()
        if patch_on:
            is_visual = batch["input_ids"] == model.config.image_token_id
            words = patch_targets.reshape(-1, patch_targets.shape[-1])
            if recipe.patch_layer is not None:  # caption from a middle layer's state, through the final norm and LM head
                visual = _lens(model)(out.hidden_states[recipe.patch_layer][is_visual])
            else:
                visual = all_logits[is_visual]  # [B * patches, V], row-major
            loss = loss + recipe.patch_weight * _multi_word_ce(visual, words)
            if recipe.caption_input:
                loss = loss + recipe.patch_weight * _multi_word_ce(_lens(model)(out.hidden_states[0][is_visual]), words)
        if refer_on:
            hidden = out.hidden_states[recipe.refer_layer][:, :refer_targets.shape[1]]
            rows = (refer_targets[..., 0] != -100)
            words = _lens(model)(hidden[rows])
            loss = loss + recipe.refer_weight * _multi_word_ce(words, refer_targets[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        for e, ok in zip(examples, (logits[:, 0].argmax(-1) == targets[:, 0]).tolist()):
            hits[e.qtype].append(ok)
        if (step + 1) % log_every == 0:
            row = {"step": step + 1, "loss": float(np.mean(losses)),
                   "train_acc": float(np.mean([h for v in hits.values() for h in v])),
                   **{f"acc_{t}": float(np.mean(v)) for t, v in sorted(hits.items())},
                   "seconds": time.perf_counter() - t0}
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
            log.append(row)
            losses, hits = [], defaultdict(list)
    model.to("cpu").eval()
    return log


def train_and_save(out: Path, model: Any, processor: Any, recipe: Recipe, seed: int, heldout: list[Any],
                   heldout_info: dict[str, Any], spec: TaskSpec = VQA_SPEC, device: str = "cpu") -> dict[str, Any]:
    """Train with one thread (on ``device``: the make targets train on the CPU), score ``heldout`` (real and blank images), and replace ``out`` atomically with
    the ``save_pretrained`` model and processor plus ``training.json``; return that json's content."""
    torch.set_num_threads(1)  # a seed fixes the weights only at a fixed thread count
    t0 = time.perf_counter()
    log = train(model, processor, recipe, seed, spec=spec, device=device)
    wall = time.perf_counter() - t0
    result = evaluate(model, processor, heldout)
    blank = evaluate(model, processor, heldout, blank=True)
    print(json.dumps({"heldout": result, "blank": blank}), flush=True)
    info = {"recipe": asdict(recipe), "seed": seed, "threads": 1, "device": device, "wall_seconds": round(wall, 1),
            "seconds_per_step": round(wall / recipe.steps, 3),
            "parameters": sum(p.numel() for p in model.parameters()),
            "heldout": {**heldout_info, **result},
            "heldout_blank_images": blank,
            "log": log}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / "training.json", info)
    print(f"wrote {out}", flush=True)
    return info


def training_args(ap: argparse.ArgumentParser, argv: list[str] | None, out: str, steps: int | None,
                  heldout_seed: int) -> argparse.Namespace:
    """Add --out, --seed and --steps to ``ap``, parse, refuse the held-out seed, and go to one thread."""
    ap.add_argument("--out", type=Path, required=True, help=f"output folder, e.g. {out}")
    ap.add_argument("--seed", type=int, default=0, help="seed for initialisation and training data")
    ap.add_argument("--steps", type=int, default=steps, help="optimiser steps (default: the recipe's)")
    ap.add_argument("--device", default="cpu", help="where to train (the shipped models: cpu)")
    args = ap.parse_args(argv)
    if args.seed == heldout_seed:
        raise ValueError(f"seed {args.seed} is the held-out seed; pick another")
    torch.set_num_threads(1)
    return args


def main(argv: list[str] | None = None) -> None:
    """CLI: train the toy VLM and write it to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = training_args(ap, argv, "data/toy-vlm", Recipe.steps, vqa_task.HELDOUT_SEED)
    recipe = Recipe(steps=args.steps)
    processor = build_processor()
    model = build_model(processor, recipe, args.seed)
    heldout = [e.as_input() for e in vqa_task.heldout_examples()]
    train_and_save(args.out, model, processor, recipe, args.seed, heldout,
                   {"seed": vqa_task.HELDOUT_SEED, "size": vqa_task.HELDOUT_SIZE}, device=args.device)


if __name__ == "__main__":
    main()
