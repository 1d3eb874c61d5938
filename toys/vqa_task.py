"""A procedural visual question-answering task: coloured shapes on a grid, templated questions.

The trained toy VLM (``attnflow.toys.train_toy_vlm``) learns it and its held-out set ships in
``data/toy-vqa``. A 48x48 dark, slightly noisy image is a 6x6 grid of 8x8 cells, one per visual
token of an 8-pixel-patch vision tower; one or two objects of distinct colours and shapes sit in
distinct cells, 6 pixels wide and jittered inside their cell, so each lies in one visual token.
Every question type needs the image: its answer is not fixed by the question alone.

Questions end on the word they refer to ("what shape is red"), not on "?": the answer position
can then query the image with that word itself. With a trailing "?" the model must first learn
to fetch the word, and binding a word to an object stayed at chance for 1,000+ steps of the CPU
budget (larger objects spanning several patches made shapes harder to read, too).

Prompts read ``<system words> <image> <question>`` so the model's token layout is
``bos, system..., visual..., question...`` like a real VLM's. Everything random is drawn from one
``numpy.random.default_rng`` stream, so a seed fixes the examples exactly.

Rebuild the held-out set: ``python -m attnflow.toys.vqa_task --out data/toy-vqa``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from attnflow.fileio import atomic_dir
from attnflow.probes.inputs import Example

IMAGE_SIZE = 48
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # cells (and visual tokens) per side
MAX_OBJECTS = 2
SYSTEM_PROMPT = "answer about the image ."
IMAGE_TOKEN = "<image>"
HELDOUT_SEED = 20_240_917
HELDOUT_SIZE = 300

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 215, 40),
    "purple": (165, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("square", "circle", "triangle", "cross")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("one", "two")
QUESTION_TYPES = ("color_of_shape", "shape_of_color", "exists_shape", "exists_color", "where", "count")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", IMAGE_TOKEN)
_QUESTION_WORDS = ("what", "color", "shape", "is", "the", "there", "a", "anything", "where", "how", "many",
                   "objects")
_SHAPE_SIZE = 6  # pixels; a shape plus its jitter stays inside its cell (one patch)
_BACKGROUND = 24
_NOISE_STD = 8.0
_COLOR_JITTER = 15


@dataclass(frozen=True)
class Obj:
    """One object: colour and shape names, its cell (row, col) and its top-left pixel (y, x)."""

    color: str
    shape: str
    row: int
    col: int
    y: int
    x: int

    @property
    def quadrant(self) -> str:
        """The image quadrant word for the object's cell."""
        top = "top" if self.row < GRID // 2 else "bottom"
        left = "left" if self.col < GRID // 2 else "right"
        return f"{top}-{left}"

    @property
    def patch(self) -> int:
        """Index of the visual token (row-major patch) the object lies in."""
        return self.row * GRID + self.col


@dataclass(frozen=True)
class VQAExample:
    """One task example: an RGB uint8 image [H, W, 3], the full prompt, the answer word, the type.

    ``objects`` is the drawn scene (the training script captions visual tokens from it).
    """

    image: np.ndarray
    prompt: str
    answer: str
    qtype: str
    objects: tuple[Obj, ...]

    def as_input(self) -> Example:
        """The example in attnflow's inputs form (what ``probes.inputs.load_examples`` returns)."""
        return Example(self.prompt, [Image.fromarray(self.image)], self.answer, self.qtype)


def vocabulary() -> list[str]:
    """Every token of the task, special tokens first, in a fixed order (the tokenizer's ids)."""
    words = [*SYSTEM_PROMPT.split(), *_QUESTION_WORDS, *COLORS, *SHAPES, *QUADRANTS, *COUNTS, "yes", "no"]
    return [*SPECIAL_TOKENS, *dict.fromkeys(words)]


def prompt_for(question: str) -> str:
    """The full prompt for a question: system words, the image placeholder, the question."""
    return f"{SYSTEM_PROMPT} {IMAGE_TOKEN} {question}"


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> tuple[Obj, ...]:
    """Objects with distinct colours, shapes and cells, jittered in their cells.

    Their number is ``n_objects``, or drawn uniformly from 1 to ``MAX_OBJECTS`` when None.
    """
    if n_objects is not None and not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n_objects}")
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    colors = rng.choice(list(COLORS), size=n, replace=False)
    shapes = rng.choice(SHAPES, size=n, replace=False)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    jitter = rng.integers(0, PATCH - _SHAPE_SIZE + 1, size=(n, 2))
    return tuple(Obj(str(c), str(s), int(k) // GRID, int(k) % GRID,
                     int(k) // GRID * PATCH + int(dy), int(k) % GRID * PATCH + int(dx))
                 for c, s, k, (dy, dx) in zip(colors, shapes, cells, jitter))


def _shape_mask(shape: str) -> np.ndarray:
    """A boolean _SHAPE_SIZE x _SHAPE_SIZE mask drawing the shape."""
    n = _SHAPE_SIZE
    y, x = np.mgrid[0:n, 0:n] + 0.5
    centre = n / 2
    if shape == "square":
        return np.ones((n, n), dtype=bool)
    if shape == "circle":
        return (y - centre) ** 2 + (x - centre) ** 2 <= (0.45 * n) ** 2
    if shape == "triangle":  # apex at the top, base on the bottom row
        return np.abs(x - centre) <= y / 2
    if shape == "cross":
        bar = np.abs(np.arange(n) + 0.5 - centre) <= n / 5
        return bar[:, None] | bar[None, :]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(obj: Obj) -> np.ndarray:
    """The object's pixels as a boolean [IMAGE_SIZE, IMAGE_SIZE] mask."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[obj.y:obj.y + _SHAPE_SIZE, obj.x:obj.x + _SHAPE_SIZE] = _shape_mask(obj.shape)
    return mask


def render(scene: tuple[Obj, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw the scene as an RGB uint8 image: dark noisy background, jittered colours."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), _BACKGROUND, dtype=np.float64)
    for obj in scene:
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        img[object_mask(obj)] = np.asarray(COLORS[obj.color]) + jitter
    img += rng.normal(0.0, _NOISE_STD, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _exists_question(present: list[str], universe: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """Ask about a present value or an absent one with equal odds; return (value, yes/no)."""
    if rng.random() < 0.5:
        return str(rng.choice(present)), "yes"
    return str(rng.choice([v for v in universe if v not in present])), "no"


def sample_question(scene: tuple[Obj, ...], qtype: str, rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES,
                    counts: tuple[str, ...] = COUNTS) -> tuple[str, str]:
    """A question of type ``qtype`` about the scene and its one-word answer (``shapes``, ``counts``: the
    task's shape universe and count words; ``attnflow.toys.scene_task`` has more)."""
    obj = scene[int(rng.integers(len(scene)))]
    if qtype == "color_of_shape":
        return f"what color is the {obj.shape}", obj.color
    if qtype == "shape_of_color":
        return f"what shape is {obj.color}", obj.shape
    if qtype == "exists_shape":
        shape, answer = _exists_question([o.shape for o in scene], list(shapes), rng)
        return f"is there a {shape}", answer
    if qtype == "exists_color":
        color, answer = _exists_question([o.color for o in scene], list(COLORS), rng)
        return f"is there anything {color}", answer
    if qtype == "where":
        return f"where is {obj.color}", obj.quadrant
    if qtype == "count":
        return "how many objects", counts[len(scene) - 1]
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def sample_example(rng: np.random.Generator, qtype: str | None = None,
                   n_objects: int | None = None) -> VQAExample:
    """One example; the question type is drawn uniformly unless given."""
    scene = sample_scene(rng, n_objects)
    image = render(scene, rng)
    qtype = str(rng.choice(QUESTION_TYPES)) if qtype is None else qtype
    question, answer = sample_question(scene, qtype, rng)
    return VQAExample(image, prompt_for(question), answer, qtype, scene)


def heldout_examples(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[VQAExample]:
    """The held-out set: question types in turn (balanced), drawn from its own seed."""
    rng = np.random.default_rng(seed)
    return [sample_example(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(n)]


def write_dataset(examples: list[VQAExample], out: Path) -> Path:
    """Write ``out/heldout.jsonl`` and ``out/images/NNNN.png``, replacing ``out`` atomically."""
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        lines = []
        for i, ex in enumerate(examples):
            rel = f"images/{i:04d}.png"
            Image.fromarray(ex.image).save(tmp / rel)
            lines.append(json.dumps({"image": rel, "prompt": ex.prompt, "answer": ex.answer, "type": ex.qtype}))
        (tmp / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return Path(out) / "heldout.jsonl"


def heldout_args(argv: list[str] | None, description: str, out: str, size: int, seed: int) -> argparse.Namespace:
    """Parse a held-out writer's --out, --n and --seed."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True, help=f"output folder, e.g. {out}")
    ap.add_argument("--n", type=int, default=size, help="number of examples")
    ap.add_argument("--seed", type=int, default=seed, help="held-out seed (not a training seed)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI: write the held-out set."""
    args = heldout_args(argv, __doc__.splitlines()[0], "data/toy-vqa", HELDOUT_SIZE, HELDOUT_SEED)
    print(write_dataset(heldout_examples(args.n, args.seed), args.out))


if __name__ == "__main__":
    main()
