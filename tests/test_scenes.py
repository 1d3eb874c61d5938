"""The scene task and its two trained VLMs (toy-llava-scenes, toy-idefics3-scenes): task, referent targets,
trainer smoke, loading, answers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from attnflow.models import BUNDLED, bundled_models, default_inputs, load_model, resolve
from attnflow.probes.inputs import encode, load_examples
from attnflow.toys import scene_task
from attnflow.toys.evaluate import evaluate

SCENE_MODELS = {"toy-llava-scenes": ("llava", scene_task.PATCHES ** 2),
                "toy-idefics3-scenes": ("idefics3", scene_task.GRID ** 2)}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_objects_lie_in_their_patch_and_cell():
    rng = np.random.default_rng(3)
    for _ in range(30):
        ex = scene_task.sample_example(rng, n_objects=4)
        assert len({o.cell for o in ex.objects}) == 4
        for o in ex.objects:
            r, c = divmod(o.patch, scene_task.PATCHES)
            assert (r // 2, c // 2) == (o.row, o.col)  # a patch of the object's cell
            p = scene_task.PATCH
            patch = ex.image[r * p:(r + 1) * p, c * p:(c + 1) * p].astype(int)
            assert np.abs(patch - scene_task.COLORS[o.color]).max(-1).min() <= 60
            assert o.y + scene_task._SHAPE_SIZE <= (r + 1) * p and o.x + scene_task._SHAPE_SIZE <= (c + 1) * p


def test_relation_answers_follow_the_cells():
    rng = np.random.default_rng(4)
    for qtype, word, key in (("left_of", "left", "col"), ("above", "above", "row")):
        answers = []
        for _ in range(60):
            ex = scene_task.sample_example(rng, qtype)
            words = ex.prompt.split()
            assert word in words and len(ex.objects) >= 2
            a, b = (next(o for o in ex.objects if o.color == w) for w in (words[-1 - (3 if word == "left" else 2)], words[-1]))
            assert ex.answer == ("yes" if getattr(a, key) < getattr(b, key) else "no")
            answers.append(ex.answer)
        assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_every_question_word_is_in_the_vocabulary_and_prompts_end_on_a_word():
    vocab = set(scene_task.vocabulary())
    rng = np.random.default_rng(5)
    for qtype in scene_task.QUESTION_TYPES:
        ex = scene_task.sample_example(rng, qtype)
        question = ex.prompt.split(scene_task.IMAGE_PLACEHOLDERS["llava"])[1].split()
        assert set(question) <= vocab and ex.answer in vocab and question[-1] != "?"


def test_shipped_heldout_set_is_the_generator_output():
    fresh = scene_task.heldout_examples()
    for name, (family, _) in SCENE_MODELS.items():
        slot = scene_task.IMAGE_PLACEHOLDERS[family]
        shipped = load_examples(default_inputs(name))
        assert len(shipped) == len(fresh) >= 300
        assert {e.qtype for e in shipped} == set(scene_task.QUESTION_TYPES)
        for s, f in zip(shipped[:40], fresh):
            assert (s.prompt, s.answer, s.qtype) == (f.prompt.replace("<image>", slot), f.answer, f.qtype)
            assert np.array_equal(np.asarray(s.images[0]), f.image)


@pytest.mark.parametrize("family,middle", [("llava", False), ("qwen2_vl", False), ("idefics3", False),
                                           ("llava", True), ("idefics3", True)])
def test_training_smoke_loss_goes_down(family, middle):
    """A few steps of a tiny recipe through the real trainer (batching, captioning and referent losses,
    schedule); ``middle``: captioning from a middle layer with tied embeddings."""
    from attnflow.toys.train_scenes import SceneRecipe, build, task_spec
    from attnflow.toys.train_toy_vlm import train

    recipe = SceneRecipe(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2,
                         text_heads=2, text_mlp=64, steps=30, batch_size=4, lr=1e-2, warmup=2,
                         patch_steps=30, single_object_steps=4, patch_layer=1 if middle else None,
                         tie_embeddings=middle, refer_layer=1, caption_input=middle)
    model, processor = build(family, recipe, seed=1)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == middle
    log = train(model, processor, recipe, seed=1, log_every=5, spec=task_spec(family))
    assert len(log) == 6
    assert log[-1]["loss"] < 0.85 * log[0]["loss"]


def test_referents_name_the_object_a_question_word_points_to():
    rng = np.random.default_rng(7)
    for qtype in scene_task.QUESTION_TYPES:
        for _ in range(10):
            ex = scene_task.sample_example(rng, qtype)
            words = ex.prompt.split()
            for k, caption in scene_task.referents(ex):
                word = words[-k]
                assert word in scene_task.COLORS or word in scene_task.SHAPES
                obj = [o for o in ex.objects if word in (o.color, o.shape)]
                assert caption == (obj[0].caption() if obj else ("no",))
            named = [w for w in words[words.index("<image>") + 1:] if w in scene_task.COLORS or w in scene_task.SHAPES]
            assert len(scene_task.referents(ex)) == len(named)
    ex = scene_task.sample_example(np.random.default_rng(1), "exists_shape")
    absent = next(s for s in scene_task.SHAPES if s not in {o.shape for o in ex.objects})
    assert scene_task.referents(replace(ex, prompt=ex.prompt.rsplit(" ", 1)[0] + f" {absent}")) == [(1, ("no",))]


def test_training_batch_captions_the_right_visual_tokens():
    from attnflow.toys.train_scenes import SceneRecipe, build, task_spec
    from attnflow.toys.train_toy_vlm import training_batch

    for family, n_visual in SCENE_MODELS.values():
        model, processor = build(family, SceneRecipe(text_layers=1, vision_layers=1), seed=0)
        spec = task_spec(family)
        examples = [spec.sample(np.random.default_rng(i), 3) for i in range(3)]
        batch = training_batch(processor, examples, spec)
        ids = batch["input_ids"]
        assert ((ids == model.config.image_token_id).sum(1) == n_visual).all()
        assert batch["patch_targets"].shape[1] == n_visual
        assert ((batch["patch_targets"][..., 0] != -100).sum(1) == 3).all()
        refer = batch["refer_targets"]  # one referring word or two (relations), at the prompt's end
        assert refer.shape[:2] == ids[:, :-2].shape
        for i, e in enumerate(examples):
            for k, caption in scene_task.referents(e):
                got = refer[i, refer.shape[1] - k, :len(caption)]
                assert got.tolist() == processor.tokenizer.convert_tokens_to_ids(list(caption))
        assert set(ids[:, -1].tolist()) == {processor.tokenizer.eos_token_id}
        assert ("position_ids" in batch) == (family != "qwen2_vl")


def test_models_lists_the_bundled_models():
    from typer.testing import CliRunner

    from attnflow.cli import app

    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(BUNDLED) == [r["name"] for r in bundled_models()]
    for r in rows:
        assert {"name", "path", "model_type", "visual_tokens", "heldout", "parameters", "accuracy"} <= set(r)
    assert next(r for r in rows if r["name"] == "toy-vlm")["visual_tokens"] == 36


@pytest.mark.parametrize("name", list(SCENE_MODELS))
def test_scene_model_loads_by_name_and_path_and_answers(name):
    family, n_visual = SCENE_MODELS[name]
    path = resolve(name)
    if family == "qwen2_vl":
        import attnflow.toys.tiny  # noqa: F401  (registers the image-only Qwen2-VL processor)
    plain = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert plain.config.model_type == family
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20
    info = json.loads((path / "training.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in plain.parameters())
    assert info["heldout"]["accuracy"] >= 0.95 and min(info["heldout"]["per_type"].values()) >= 0.85
    assert info["heldout"]["accuracy"] - info["heldout_blank_images"]["accuracy"] >= 0.30
    examples = load_examples(default_inputs(name))
    ids = encode(processor, examples[:1])["input_ids"][0]
    n_image = int((ids == plain.config.image_token_id).sum())
    assert n_image == n_visual
    if family == "llava":
        assert n_image / len(ids) >= 0.85
    subset = examples[:16]  # question types in turn: two of each
    for model, proc in ((plain, processor), load_model(name), load_model(str(path))):
        assert evaluate(model, proc, subset)["accuracy"] >= 14 / 16
    assert evaluate(plain, processor, subset, blank=True)["accuracy"] <= 12 / 16
