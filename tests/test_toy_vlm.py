"""The shipped toy VLM: loads offline with the plain Auto classes, reads its prompts, looks at the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from attnflow.probes.inputs import load_examples
from attnflow.toys import vqa_task
from attnflow.toys.evaluate import evaluate
from attnflow.toys.toy_vlm import heldout_path, model_dir, toy_vlm


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return toy_vlm()


@pytest.fixture(scope="module")
def heldout():
    return load_examples(heldout_path())


def test_plain_auto_classes_load_the_shipped_dir():
    model = AutoModelForImageTextToText.from_pretrained(model_dir(), local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir(), local_files_only=True)
    assert model.config.model_type == "llava"
    assert model.config.text_config.num_hidden_layers >= 6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert processor.tokenizer.convert_tokens_to_ids(vqa_task.IMAGE_TOKEN) == model.config.image_token_id
    size = sum(f.stat().st_size for f in model_dir().iterdir())
    assert size <= 20 * 2**20
    info = json.loads((model_dir() / "training.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_attn_implementation_can_be_chosen():
    model, _ = toy_vlm(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_heldout_prompt_goes_through_the_processor_with_bos_system_visual_question(loaded, heldout):
    model, processor = loaded
    ex = heldout[0]
    ids = processor(text=[ex.prompt], images=ex.images, return_tensors="pt")["input_ids"][0].tolist()
    image_id = model.config.image_token_id
    tok = processor.tokenizer
    system = tok(vqa_task.SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]
    question = tok(ex.prompt.split(vqa_task.IMAGE_TOKEN)[1], add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id, *system, *[image_id] * vqa_task.GRID ** 2, *question]
    assert tok.unk_token_id not in ids


def test_shipped_heldout_set_is_the_generator_output(heldout):
    regenerated = vqa_task.heldout_examples()
    assert len(heldout) == len(regenerated)
    for shipped, fresh in zip(heldout, regenerated):
        assert (shipped.prompt, shipped.answer, shipped.qtype) == (fresh.prompt, fresh.answer, fresh.qtype)
        assert np.array_equal(np.asarray(shipped.images[0]), fresh.image)
    assert {e.qtype for e in heldout} == set(vqa_task.QUESTION_TYPES)


def test_model_answers_from_the_image(loaded, heldout):
    model, processor = loaded
    subset = heldout[:42]  # question types in turn: 7 of each
    seen = evaluate(model, processor, subset)
    blank = evaluate(model, processor, subset, blank=True)
    assert seen["n_per_type"] == blank["n_per_type"]
    assert seen["accuracy"] >= 0.8
    assert seen["accuracy"] - blank["accuracy"] >= 0.3


def test_no_question_gives_its_answer_away(heldout):
    """Each prompt text meets several answers: the question alone does not fix what to say."""
    by_prompt: dict[str, list[str]] = {}
    for e in heldout:
        by_prompt.setdefault(e.prompt, []).append(e.answer)
    repeated = {p: a for p, a in by_prompt.items() if len(a) >= 4}
    assert {p.split(vqa_task.IMAGE_TOKEN)[1].split()[0] for p in repeated} >= {"what", "is", "where", "how"}
    for prompt, answers in repeated.items():
        assert max(answers.count(a) for a in answers) / len(answers) < 0.9, prompt


def test_objects_lie_in_the_patch_their_caption_names():
    rng = np.random.default_rng(3)
    for _ in range(20):
        ex = vqa_task.sample_example(rng, n_objects=2)
        for o in ex.objects:
            r, c = divmod(o.patch, vqa_task.GRID)
            cell = ex.image[r * vqa_task.PATCH:(r + 1) * vqa_task.PATCH, c * vqa_task.PATCH:(c + 1) * vqa_task.PATCH]
            assert np.abs(cell.astype(int) - vqa_task.COLORS[o.color]).max(-1).min() <= 60
            assert vqa_task.object_mask(o).sum() == vqa_task.object_mask(o)[
                r * vqa_task.PATCH:(r + 1) * vqa_task.PATCH, c * vqa_task.PATCH:(c + 1) * vqa_task.PATCH].sum()


def test_training_batch_ends_with_answer_and_eos():
    from attnflow.toys.train_toy_vlm import build_processor, training_batch

    processor = build_processor()
    examples = [vqa_task.sample_example(np.random.default_rng(i)) for i in range(4)]
    batch = training_batch(processor, examples)
    tok = processor.tokenizer
    assert batch["input_ids"][:, -2].tolist() == tok.convert_tokens_to_ids([e.answer for e in examples])
    assert set(batch["input_ids"][:, -1].tolist()) == {tok.eos_token_id}
    assert (batch["position_ids"][:, -1] == batch["attention_mask"].sum(1) - 1).all()
    captioned = batch["patch_targets"][..., 0] != -100
    assert captioned.sum(1).tolist() == [len(e.objects) for e in examples]


def test_dataset_writer_round_trips(tmp_path):
    examples = vqa_task.heldout_examples(n=6, seed=5)
    loaded = load_examples(vqa_task.write_dataset(examples, tmp_path / "set"))
    assert [(e.prompt, e.answer, e.qtype) for e in loaded] == [(e.prompt, e.answer, e.qtype) for e in examples]
    assert all(np.array_equal(np.asarray(a.images[0]), b.image) for a, b in zip(loaded, examples))


def test_evaluate_refuses_unanswered_examples(loaded, heldout):
    from dataclasses import replace

    from attnflow.probes.inputs import InputError

    model, processor = loaded
    with pytest.raises(InputError, match="no answer"):
        evaluate(model, processor, [replace(heldout[0], answer=None)])
