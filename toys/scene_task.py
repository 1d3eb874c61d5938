"""A richer procedural scene task: 1-4 coloured shapes on a coarse grid, eight question types.

It is ``attnflow.toys.vqa_task`` grown towards a real VLM's regime: a 96x96 image, so a vision
tower with 8-pixel patches sees a 12x12 patch grid (144 visual tokens in a LLaVA; 36 after a
Qwen2-VL 2x2 merge). Objects sit on a coarse 6x6 grid of 16-pixel cells: each cell is 2x2
patches (one merged Qwen2-VL token), and a 6-pixel object lies in one patch of its cell,
jittered inside it. One to four objects with distinct colours, shapes and cells.

Question types need different amounts of the image:

* one object: ``color_of_shape`` (what color is the circle), ``shape_of_color`` (what shape is
  red), ``where`` (where is red -> quadrant);
* the whole image: ``exists_shape``, ``exists_color`` (yes/no), ``count`` (how many objects ->
  one..four);
* two objects and their relation: ``left_of`` (is red left of blue), ``above`` (is red above
  blue); the two objects always differ in column (row), answers yes/no at even odds.

As in ``vqa_task`` the questions end on a word they ask about, never on "?", and every answer is
one word. Prompts read ``<system words> <image> <question>``; the image placeholder is the
model family's own (``IMAGE_PLACEHOLDERS``). One ``numpy.random.default_rng`` stream fixes the
examples exactly.

Rebuild the held-out set (images shared by both families' JSONL): ``python -m attnflow.toys.scene_task
--out data/toy-scenes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from attnflow.fileio import atomic_dir
from attnflow.toys import vqa_task
from attnflow.toys.vqa_task import COLORS, IMAGE_TOKEN, SPECIAL_TOKENS, SYSTEM_PROMPT, VQAExample

IMAGE_SIZE = 96
PATCH = 8
PATCHES = IMAGE_SIZE // PATCH  # patches per side (12)
CELL = 16  # pixels per grid cell: 2x2 patches
GRID = IMAGE_SIZE // CELL  # cells per side (6)
MAX_OBJECTS = 4
HELDOUT_SEED = 20_241_113
HELDOUT_SIZE = 400
IMAGE_PLACEHOLDERS = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                      "idefics3": "<image>"}
QWEN_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")

SHAPES = (*vqa_task.SHAPES, "bar")  # five shapes, so "is there a <shape>" can be "no" with four objects
QUADRANTS = vqa_task.QUADRANTS
COUNTS = ("one", "two", "three", "four")
QUESTION_TYPES = ("color_of_shape", "shape_of_color", "exists_shape", "exists_color", "where", "count",
                  "left_of", "above")
PAIR_TYPES = ("left_of", "above")  # need two objects
ROWS = tuple(f"row{i}" for i in range(GRID))  # caption-only words: the cell's row and column
COLUMNS = tuple(f"col{i}" for i in range(GRID))
_QUESTION_WORDS = ("what", "color", "shape", "is", "the", "there", "a", "anything", "where", "how", "many",
                   "objects", "left", "of", "above")
_SHAPE_SIZE = vqa_task._SHAPE_SIZE


@dataclass(frozen=True)
class SceneObj(vqa_task.Obj):
    """One object: colour and shape names, its cell (row, col) on the 6x6 grid and its top-left pixel (y, x)."""

    @property
    def quadrant(self) -> str:
        """The image quadrant word for the object's cell."""
        return f"{'top' if self.row < GRID // 2 else 'bottom'}-{'left' if self.col < GRID // 2 else 'right'}"

    @property
    def patch(self) -> int:
        """Index of the 8-pixel patch (row-major over the 12x12 patch grid) the object lies in."""
        return (self.y // PATCH) * PATCHES + self.x // PATCH

    @property
    def cell(self) -> int:
        """Index of the cell (row-major over the 6x6 grid): a Qwen2-VL merged token."""
        return self.row * GRID + self.col

    def caption(self) -> tuple[str, ...]:
        """The words the per-patch captioning loss asks its visual token to name."""
        return self.color, self.shape, self.quadrant, ROWS[self.row], COLUMNS[self.col]


def referents(example: VQAExample) -> list[tuple[int, tuple[str, ...]]]:
    """The question's words that name a colour or a shape, as (position from the prompt's end, the
    named object's caption, or ``("no",)`` when the scene has no such object): the training
    script's referent loss."""
    words = example.prompt.split()
    question = words[max(i for i, w in enumerate(words) if w.startswith("<")) + 1:]
    found = []
    for j, word in enumerate(question):
        if word in COLORS or word in SHAPES:
            obj = next((o for o in example.objects if word in (o.color, o.shape)), None)
            found.append((len(question) - j, obj.caption() if obj else ("no",)))
    return found


def vocabulary() -> list[str]:
    """Every token of the task, special tokens first, in a fixed order (the tokenizer's ids)."""
    words = [*SYSTEM_PROMPT.split(), *_QUESTION_WORDS, *COLORS, *SHAPES, *QUADRANTS, *COUNTS, "yes", "no",
             *ROWS, *COLUMNS]
    return [*SPECIAL_TOKENS, *QWEN_TOKENS, *IDEFICS3_TOKENS, *dict.fromkeys(words)]


def prompt_for(question: str, family: str = "llava") -> str:
    """The full prompt: system words, the family's image placeholder, the question."""
    return f"{SYSTEM_PROMPT} {IMAGE_PLACEHOLDERS[family]} {question}"


def sample_scene(rng: np.random.Generator, n_objects: int) -> tuple[SceneObj, ...]:
    """``n_objects`` objects with distinct colours, shapes and cells, each inside one patch of its cell."""
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n_objects}")
    colors = rng.choice(list(COLORS), size=n_objects, replace=False)
    shapes = rng.choice(SHAPES, size=n_objects, replace=False)
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    sub = rng.integers(0, CELL // PATCH, size=(n_objects, 2))  # which patch of the cell
    jitter = rng.integers(0, PATCH - _SHAPE_SIZE + 1, size=(n_objects, 2))
    return tuple(SceneObj(str(c), str(s), int(k) // GRID, int(k) % GRID,
                          int(k) // GRID * CELL + int(sy) * PATCH + int(dy),
                          int(k) % GRID * CELL + int(sx) * PATCH + int(dx))
                 for c, s, k, (sy, sx), (dy, dx) in zip(colors, shapes, cells, sub, jitter))


def _shape_mask(shape: str) -> np.ndarray:
    """The toy task's masks plus ``bar``, a horizontal bar two pixels high."""
    if shape == "bar":
        mask = np.zeros((_SHAPE_SIZE, _SHAPE_SIZE), dtype=bool)
        mask[_SHAPE_SIZE // 2 - 1:_SHAPE_SIZE // 2 + 1] = True
        return mask
    return vqa_task._shape_mask(shape)


def render(scene: tuple[SceneObj, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw the scene as an RGB uint8 image: dark noisy background, jittered colours."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), vqa_task._BACKGROUND, dtype=np.float64)
    for obj in scene:
        jitter = rng.integers(-vqa_task._COLOR_JITTER, vqa_task._COLOR_JITTER + 1, size=3)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        mask[obj.y:obj.y + _SHAPE_SIZE, obj.x:obj.x + _SHAPE_SIZE] = _shape_mask(obj.shape)
        img[mask] = np.asarray(COLORS[obj.color]) + jitter
    img += rng.normal(0.0, vqa_task._NOISE_STD, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _pair_question(scene: tuple[SceneObj, ...], qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """``is A left of B`` / ``is A above B`` for two objects in different columns (rows), or None if none are."""
    key = (lambda o: o.col) if qtype == "left_of" else (lambda o: o.row)
    pairs = [(a, b) for a in scene for b in scene if key(a) != key(b)]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    relation = "left of" if qtype == "left_of" else "above"
    return f"is {a.color} {relation} {b.color}", "yes" if key(a) < key(b) else "no"


def sample_question(scene: tuple[SceneObj, ...], qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A question of type ``qtype`` about the scene and its one-word answer (None: the scene has no such pair)."""
    if qtype in PAIR_TYPES:
        return _pair_question(scene, qtype, rng)
    return vqa_task.sample_question(scene, qtype, rng, shapes=SHAPES, counts=COUNTS)


def sample_example(rng: np.random.Generator, qtype: str | None = None, n_objects: int | None = None,
                   family: str = "llava") -> VQAExample:
    """One example; the question type is drawn uniformly unless given, the object count from 1-4 unless given.

    Relation questions get at least two objects; a scene whose objects share one column (row) is redrawn.
    """
    qtype = str(rng.choice(QUESTION_TYPES)) if qtype is None else qtype
    low = 2 if qtype in PAIR_TYPES else 1
    while True:
        n = int(rng.integers(low, MAX_OBJECTS + 1)) if n_objects is None else max(low, n_objects)
        scene = sample_scene(rng, n)
        qa = sample_question(scene, qtype, rng)
        if qa is not None:
            break
    image = render(scene, rng)
    return VQAExample(image, prompt_for(qa[0], family), qa[1], qtype, scene)


def heldout_examples(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED, family: str = "llava") -> list[VQAExample]:
    """The held-out set: question types in turn (balanced), drawn from its own seed."""
    rng = np.random.default_rng(seed)
    return [sample_example(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)], family=family) for i in range(n)]


def write_heldout(out: Path, n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[Path]:
    """Write ``out/images/NNNN.png`` once and ``out/heldout-<family>.jsonl`` per family (the same
    examples, each with its family's image placeholder), replacing ``out`` atomically."""
    examples = heldout_examples(n, seed)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for i, ex in enumerate(examples):
            Image.fromarray(ex.image).save(tmp / f"images/{i:04d}.png")
        for family, slot in IMAGE_PLACEHOLDERS.items():
            lines = [json.dumps({"image": f"images/{i:04d}.png", "prompt": ex.prompt.replace(IMAGE_TOKEN, slot),
                                 "answer": ex.answer, "type": ex.qtype}) for i, ex in enumerate(examples)]
            (tmp / f"heldout-{family}.jsonl").write_text("\n".join(lines) + "\n")
    return [Path(out) / f"heldout-{family}.jsonl" for family in IMAGE_PLACEHOLDERS]


def main(argv: list[str] | None = None) -> None:
    """CLI: write the held-out set (shared images, one JSONL per family)."""
    args = vqa_task.heldout_args(argv, __doc__.splitlines()[0], "data/toy-scenes", HELDOUT_SIZE, HELDOUT_SEED)
    for path in write_heldout(args.out, args.n, args.seed):
        print(path)


if __name__ == "__main__":
    main()
