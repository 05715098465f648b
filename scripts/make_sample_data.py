"""Generate the synthetic scene world under ``sample_data/`` (deterministic from a seed).

Each image is a 64x64 PNG with 1-3 objects (shape x colour x size on a 3x3 grid) over a varied,
noisy light background. Every image gets five captions and VQA questions with ten human-style
answers. The files use the real formats users bring:

- ``images/{split}/scene_{image_id:06d}.png``
- ``karpathy_{train,val,test}.json``: LAVIS Karpathy split JSON (train: one entry per caption)
- ``captions_{val,test}.json``: COCO caption ground truth (``images`` + ``annotations``)
- ``vqa_{split}_questions.json`` / ``vqa_{split}_annotations.json``: VQAv2 format
- ``scenes_{split}.json``: the ground-truth object lists (for probes and analysis)
- ``hard_negatives_{val,test}.json``: captions with one attribute swapped (SugarCrepe's layout);
  ``hard_negatives_train.json`` too with ``--train-hard-negatives``

Every image is generated from its own random stream keyed by (seed, split, index), so a smaller
run produces exactly the first images, captions and questions of a larger one, and two runs with
the same arguments write byte-identical files.

Usage: python scripts/make_sample_data.py [--out sample_data] [--num-train 3000] ...
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 3
CELL = IMAGE_SIZE / GRID
SPLITS = ("train", "val", "test")
# Image ids are split base + index, so ids never depend on another split's size.
SPLIT_ID_BASE = {"train": 100_000, "val": 200_000, "test": 300_000}
QUESTIONS_PER_IMAGE_ID = 10  # question_id = image_id * 10 + k (VQAv2 uses image_id * 1000 + k)
# One yes/no + one number question per image, plus this many "other" questions.
OTHER_QUESTIONS = {"train": 1, "val": 2, "test": 2}
# Yes/no questions added to each train image, from their own random stream (the questions above
# are unchanged) and written after the split's other questions: one yes and one no per image.
# Yes/no needs colour and shape bound to one object, hardest in scenes of two and three, and with
# one such question per image stage 2 of `make demo` learned it only just (README "What make
# demo shows": +7.9 VQA points over blind with one, +11.6 with three, the same stage 1).
EXTRA_YES_NO = {"train": 2, "val": 0, "test": 0}

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (145, 60, 185),
}
# Pixels from centre to edge: big enough that a ViT with 8 px patches learns the shapes; a
# large object sits exactly in its 21 px cell, a small one moves by up to 2 px.
HALF_EXTENT = {"small": 7, "large": 10}
POSITION_PHRASES = (
    ("in the top left corner", "at the top", "in the top right corner"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITION_PHRASES[self.row][self.col]


@dataclass(frozen=True)
class QuestionSpec:
    question: str
    answer: str  # canonical answer (already in VQA-normalized form)
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str  # the question's opening words, as VQAv2 groups them


# ---------------------------------------------------------------- random streams


def stream_seed(seed: int, split: str, index: int, purpose: str) -> int:
    """A 64-bit seed that depends only on (seed, split, index, purpose): stable across runs."""
    digest = hashlib.sha256(f"{seed}/{split}/{index}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# ---------------------------------------------------------------- scenes and images


def sample_objects(rng: random.Random) -> list[SceneObject]:
    count = rng.randint(1, 3)
    cells = sorted(rng.sample(range(GRID * GRID), count))  # reading order
    return [
        SceneObject(
            shape=rng.choice(SHAPES),
            color=rng.choice(list(COLORS)),
            size=rng.choice(list(HALF_EXTENT)),
            row=cell // GRID,
            col=cell % GRID,
        )
        for cell in cells
    ]


NOISE_KINDS = ("pixel", "blotchy", "speckled", "clean")


def background(noise_kind: str, rng: np.random.Generator) -> np.ndarray:
    """A light tinted background with a gradient and a noise texture: (H, W, 3)."""
    tint = rng.integers(175, 236, size=3).astype(np.float64)
    ramp = np.linspace(-1.0, 1.0, IMAGE_SIZE)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # (H, W)
    image = tint[None, None, :] + rng.uniform(0, 20) * gradient[:, :, None]
    return image + noise_texture(noise_kind, rng)


def noise_texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Grey noise (same on all channels, which keeps the PNGs small): (H, W, 1)."""
    shape = (IMAGE_SIZE, IMAGE_SIZE, 1)
    if kind == "pixel":  # three-level pixel noise
        return rng.integers(-1, 2, size=shape) * rng.uniform(4, 9)
    if kind == "blotchy":  # noise in 2x2 or 4x4 blocks
        block = int(rng.choice([2, 4]))
        coarse = rng.normal(0, rng.uniform(5, 10), size=(IMAGE_SIZE // block,) * 2 + (1,))
        return np.kron(coarse, np.ones((block, block, 1)))
    if kind == "speckled":
        mask = rng.random(shape) < rng.uniform(0.05, 0.15)
        return mask * rng.normal(0, 25, size=shape)
    return np.zeros(shape)  # clean gradient


def object_polygon(obj: SceneObject, rng: np.random.Generator) -> tuple[str, list[float]]:
    """Draw call name and coordinates for one object, centred in its cell with a small jitter."""
    half = HALF_EXTENT[obj.size]
    jitter = 0 if obj.size == "large" else 2
    cx = (obj.col + 0.5) * CELL + rng.integers(-jitter, jitter + 1)
    cy = (obj.row + 0.5) * CELL + rng.integers(-jitter, jitter + 1)
    box = [cx - half, cy - half, cx + half, cy + half]
    if obj.shape == "circle":
        return "ellipse", box
    if obj.shape == "square":
        return "rectangle", [cx - half + 1, cy - half + 1, cx + half - 1, cy + half - 1]
    return "polygon", [cx, cy - half, cx + half, cy + half, cx - half, cy + half]


def render(objects: list[SceneObject], noise_kind: str, rng: np.random.Generator) -> Image.Image:
    pixels = np.clip(background(noise_kind, rng), 0, 255).astype(np.uint8)  # (H, W, 3)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        shade = np.array(COLORS[obj.color]) + rng.integers(-15, 16, size=3)
        fill = tuple(int(v) for v in np.clip(shade, 0, 255))
        outline = tuple(int(v) for v in rng.integers(20, 60, size=3))  # a dark outline
        kind, coords = object_polygon(obj, rng)
        getattr(draw, kind)(coords, fill=fill, outline=outline)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)  # PIL writes no timestamp: deterministic
    return buffer.getvalue()


# ---------------------------------------------------------------- captions


def noun_phrase(obj: SceneObject, with_size: bool) -> str:
    size = f"{obj.size} " if with_size else ""
    return f"a {size}{obj.color} {obj.shape}"


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def full_description(objects: list[SceneObject]) -> str:
    """Every object's size, colour, shape and place: what a perfect captioner would write."""
    return join_phrases([f"{noun_phrase(o, with_size=True)} {o.position}" for o in objects])


def relation(a: SceneObject, b: SceneObject) -> str:
    if a.row < b.row:
        return "above"
    if a.row > b.row:
        return "below"
    return "to the left of" if a.col < b.col else "to the right of"


def caption_templates(objects: list[SceneObject], noise_kind: str) -> list[str]:
    """Seven differently worded captions of one scene (five are kept)."""
    sized = [noun_phrase(o, with_size=True) for o in objects]
    plain = [noun_phrase(o, with_size=False) for o in objects]
    placed = [f"{p} {o.position}" for p, o in zip(plain, objects, strict=True)]
    count = len(objects)
    counted = f"{NUMBER_WORDS[count]} shape{'s' if count > 1 else ''}: {join_phrases(plain)}"
    if count == 1:
        related = f"{sized[0]} alone {objects[0].position}"
        there = f"there is {placed[0]}"
    else:
        related = f"{sized[0]} {relation(objects[0], objects[1])} {plain[1]}"
        if count == 3:
            related += f" and {plain[2]} {objects[2].position}"
        there = f"there are {NUMBER_WORDS[count]} shapes, {join_phrases(placed)}"
    reversed_sized = join_phrases(sized[::-1])
    return [
        join_phrases(sized),
        join_phrases(placed),
        counted,
        related,
        there,
        f"a photo of {join_phrases(plain)}",
        f"{reversed_sized} on a {'plain' if noise_kind == 'clean' else 'noisy'} background",
    ]


def make_captions(objects: list[SceneObject], noise_kind: str, rng: random.Random) -> list[str]:
    return rng.sample(caption_templates(objects, noise_kind), 5)


# ---------------------------------------------------------------- questions


def yes_no_question(objects: list[SceneObject], want_yes: bool, rng: random.Random) -> QuestionSpec:
    """Balanced yes/no; the "no" cases prefer hard negatives that need colour-shape binding."""
    present = {(o.color, o.shape) for o in objects}
    shapes = Counter(o.shape for o in objects)
    unique_shapes = [s for s, n in shapes.items() if n == 1]
    kind = rng.choices(("binding", "shape", "is_the"), weights=(6, 2, 2))[0]
    if kind == "shape" and not want_yes and len(shapes) == len(SHAPES):
        kind = "binding"
    if kind == "is_the" and not unique_shapes:
        kind = "binding"
    answer = "yes" if want_yes else "no"
    if kind == "shape":
        pool = sorted(shapes) if want_yes else [s for s in SHAPES if s not in shapes]
        shape = rng.choice(pool)
        return QuestionSpec(f"is there a {shape}?", answer, "yes/no", "is there a")
    if kind == "is_the":
        shape = rng.choice(sorted(unique_shapes))
        true_color = next(o.color for o in objects if o.shape == shape)
        color = true_color if want_yes else hard_wrong_color(objects, true_color, rng)
        return QuestionSpec(f"is the {shape} {color}?", answer, "yes/no", "is the")
    color, shape = rng.choice(sorted(present)) if want_yes else absent_pair(objects, rng)
    return QuestionSpec(f"is there a {color} {shape}?", answer, "yes/no", "is there a")


def hard_wrong_color(objects: list[SceneObject], true_color: str, rng: random.Random) -> str:
    """A wrong colour, taken from another object in the scene when there is one."""
    in_scene = sorted({o.color for o in objects} - {true_color})
    return rng.choice(in_scene or [c for c in COLORS if c != true_color])


def absent_pair(objects: list[SceneObject], rng: random.Random) -> tuple[str, str]:
    """A (colour, shape) not in the scene; both parts present on different objects if possible."""
    present = {(o.color, o.shape) for o in objects}
    hard = sorted({(a.color, b.shape) for a in objects for b in objects} - present)
    if hard:
        return rng.choice(hard)
    easy = sorted({(c, s) for c in COLORS for s in SHAPES} - present)
    return rng.choice(easy)


def number_question(objects: list[SceneObject], rng: random.Random) -> QuestionSpec:
    kind = rng.choices(("all", "color", "shape"), weights=(2, 1, 1))[0]
    if kind == "color":
        color = rng.choice(sorted({o.color for o in objects}))
        count = sum(o.color == color for o in objects)
        question = f"how many {color} shapes are there?"
    elif kind == "shape":
        shape = rng.choice(sorted({o.shape for o in objects}))
        count = sum(o.shape == shape for o in objects)
        question = f"how many {shape}s are there?"
    else:
        count = len(objects)
        question = "how many shapes are there?"
    return QuestionSpec(question, str(count), "number", "how many")


def other_question_candidates(objects: list[SceneObject], rng: random.Random) -> list[QuestionSpec]:
    """One question per applicable "other" template (colour, shape, size, by name or position)."""
    shapes = Counter(o.shape for o in objects)
    colors = Counter(o.color for o in objects)
    pairs = Counter((o.color, o.shape) for o in objects)
    anchor = rng.choice(objects)
    candidates = [
        QuestionSpec(
            f"what color is the object {anchor.position}?",
            anchor.color,
            "other",
            "what color is the",
        ),
        QuestionSpec(f"what shape is {anchor.position}?", anchor.shape, "other", "what shape is"),
    ]
    unique_shape = [o for o in objects if shapes[o.shape] == 1]
    if unique_shape:
        obj = rng.choice(unique_shape)
        candidates.append(
            QuestionSpec(f"what color is the {obj.shape}?", obj.color, "other", "what color is the")
        )
    unique_color = [o for o in objects if colors[o.color] == 1]
    if unique_color:
        obj = rng.choice(unique_color)
        candidates.append(
            QuestionSpec(
                f"what shape is the {obj.color} object?", obj.shape, "other", "what shape is"
            )
        )
    unique_pair = [o for o in objects if pairs[(o.color, o.shape)] == 1]
    if unique_pair:
        obj = rng.choice(unique_pair)
        candidates.append(
            QuestionSpec(
                f"what size is the {obj.color} {obj.shape}?", obj.size, "other", "what size is the"
            )
        )
    return candidates


def make_questions(
    objects: list[SceneObject], want_yes: bool, num_other: int, rng: random.Random
) -> list[QuestionSpec]:
    others = rng.sample(other_question_candidates(objects, rng), num_other)
    return [yes_no_question(objects, want_yes, rng), number_question(objects, rng), *others]


# ---------------------------------------------------------------- human answers


def wrong_answer(spec: QuestionSpec, rng: random.Random) -> str:
    if spec.answer_type == "yes/no":
        return "no" if spec.answer == "yes" else "yes"
    if spec.answer_type == "number":
        count = int(spec.answer)
        return str(rng.choice([n for n in (count - 1, count + 1) if n >= 1]))
    for vocabulary in (list(COLORS), list(SHAPES), list(HALF_EXTENT)):
        if spec.answer in vocabulary:
            return rng.choice([w for w in vocabulary if w != spec.answer])
    raise ValueError(f"no wrong answer for {spec}")


def surface_form(canonical: str, rng: random.Random) -> str:
    """How a person might type the answer; the VQAv2 normalization maps each back to canonical."""
    word = canonical
    if canonical.isdigit() and rng.random() < 0.35:
        word = NUMBER_WORDS[int(canonical)]
    elif canonical in SHAPES and rng.random() < 0.3:
        word = f"{rng.choice(['a', 'the'])} {canonical}"
    if rng.random() < 0.15:
        word = word.capitalize()
    if rng.random() < 0.1:
        word += "."
    return word


def human_answers(spec: QuestionSpec, rng: random.Random) -> list[dict[str, Any]]:
    """Ten answers in varied surface forms; 0-3 annotators disagree, so the majority (VQAv2's
    ``multiple_choice_answer``) is always the right answer."""
    num_wrong = rng.choices((0, 1, 2, 3), weights=(4, 3, 2, 1))[0]
    wrong_ids = set(rng.sample(range(1, 11), num_wrong))
    answers = []
    for answer_id in range(1, 11):
        wrong = answer_id in wrong_ids
        canonical = wrong_answer(spec, rng) if wrong else spec.answer
        confidence = (
            rng.choice(("maybe", "no")) if wrong else rng.choices(("yes", "maybe"), (9, 1))[0]
        )
        answers.append(
            {
                "answer": surface_form(canonical, rng),
                "answer_confidence": confidence,
                "answer_id": answer_id,
            }
        )
    return answers


# ---------------------------------------------------------------- one split


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str  # one of NOISE_KINDS
    image: Image.Image
    captions: list[str]


def make_scene(seed: int, split: str, index: int) -> tuple[Scene, random.Random]:
    """Scene ``index`` of a split (any name: "train", ..., or e.g. "vision-pretrain"), and its
    text random stream, left where the questions continue from it."""
    text_rng = random.Random(stream_seed(seed, split, index, "text"))
    pixel_rng = np.random.default_rng(stream_seed(seed, split, index, "pixels"))
    objects = sample_objects(text_rng)
    background = text_rng.choice(NOISE_KINDS)
    image = render(objects, background, pixel_rng)
    return Scene(objects, background, image, make_captions(objects, background, text_rng)), text_rng


@dataclass
class SplitRecords:
    scenes: list[dict[str, Any]]
    captions: dict[int, list[str]]  # image_id -> 5 captions
    questions: list[dict[str, Any]]
    annotations: list[dict[str, Any]]


def image_relpath(split: str, image_id: int) -> str:
    return f"images/{split}/scene_{image_id:06d}.png"


def generate_split(split: str, count: int, seed: int, out: Path) -> SplitRecords:
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob("*.png"):
        stale.unlink()
    records = SplitRecords([], {}, [], [])
    extra = SplitRecords([], {}, [], [])  # EXTRA_YES_NO's questions, written after the others
    for index in range(count):
        image_id = SPLIT_ID_BASE[split] + index
        scene, text_rng = make_scene(seed, split, index)
        (out / image_relpath(split, image_id)).write_bytes(png_bytes(scene.image))
        records.scenes.append(
            {
                "image": image_relpath(split, image_id),
                "image_id": image_id,
                "background": scene.background,
                "objects": [asdict(o) for o in scene.objects],
            }
        )
        records.captions[image_id] = scene.captions
        specs = make_questions(scene.objects, index % 2 == 0, OTHER_QUESTIONS[split], text_rng)
        for k, spec in enumerate(specs):
            add_question(records, image_id, image_id * QUESTIONS_PER_IMAGE_ID + k, spec, text_rng)
        add_extra_yes_no(extra, scene.objects, (seed, split, index), image_id, len(specs))
    records.questions += extra.questions
    records.annotations += extra.annotations
    return records


def add_extra_yes_no(
    records: SplitRecords,
    objects: list[SceneObject],
    stream: tuple[int, str, int],
    image_id: int,
    first_k: int,
) -> None:
    """``EXTRA_YES_NO[split]`` more yes/no questions about one image (``stream``: seed, split,
    index), numbered on from ``first_k``; the k-th asks for "yes" when index + k is odd."""
    seed, split, index = stream
    rng = random.Random(stream_seed(seed, split, index, "extra-yes-no"))
    for k in range(EXTRA_YES_NO[split]):
        spec = yes_no_question(objects, (index + k) % 2 == 1, rng)
        add_question(records, image_id, image_id * QUESTIONS_PER_IMAGE_ID + first_k + k, spec, rng)


def add_question(
    records: SplitRecords, image_id: int, question_id: int, spec: QuestionSpec, rng: random.Random
) -> None:
    answers = human_answers(spec, rng)
    records.questions.append(
        {"image_id": image_id, "question": spec.question, "question_id": question_id}
    )
    records.annotations.append(
        {
            "answer_type": spec.answer_type,
            "answers": answers,
            "image_id": image_id,
            "multiple_choice_answer": spec.answer,
            "question_id": question_id,
            "question_type": spec.question_type,
        }
    )


# ---------------------------------------------------------------- ITM hard negatives

SWAP_KINDS = ("color", "shape", "size", "position")
# The templates (caption_templates' order) that state every object's cell: elsewhere a moved
# object only changes the reading order ("a red circle and a blue square" -> "a blue square and
# a red circle", still true) or a relation that may still hold.
PLACING_TEMPLATES = (1, 4)
ALONE_TEMPLATE = 3  # "a small red circle alone in the center" (one object)


def swap_attribute(objects: list[SceneObject], kind: str, rng: random.Random) -> list[SceneObject]:
    """The scene with one attribute of one object changed (colour, shape, size or cell)."""
    index = rng.randrange(len(objects))
    old = objects[index]
    if kind == "color":
        new = replace(old, color=rng.choice([c for c in COLORS if c != old.color]))
    elif kind == "shape":
        new = replace(old, shape=rng.choice([s for s in SHAPES if s != old.shape]))
    elif kind == "size":
        new = replace(old, size="large" if old.size == "small" else "small")
    else:
        used = {(o.row, o.col) for o in objects}
        free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]
        row, col = rng.choice(free)
        new = replace(old, row=row, col=col)
    changed = [new if k == index else o for k, o in enumerate(objects)]
    return sorted(changed, key=lambda o: (o.row, o.col))  # captions list objects in reading order


def hard_negative(
    objects: list[SceneObject], noise_kind: str, captions: list[str], kind: str, rng: random.Random
) -> tuple[str, str] | None:
    """One of the image's captions and the same template worded for the scene with one
    attribute swapped: a caption that is false for the image (no template of the true scene
    says it). None when the few tries find none (e.g. a size swap in a caption without sizes)."""
    true_texts = caption_templates(objects, noise_kind)
    for _ in range(8):
        caption = rng.choice(captions)
        template = true_texts.index(caption)
        placing = PLACING_TEMPLATES + ((ALONE_TEMPLATE,) if len(objects) == 1 else ())
        if kind == "position" and template not in placing:
            continue
        negative = caption_templates(swap_attribute(objects, kind, rng), noise_kind)[template]
        if negative not in true_texts:
            return caption, negative
    return None


def hard_negative_entries(split: str, records: SplitRecords, seed: int) -> dict[str, Any]:
    """SugarCrepe's layout: ``{id: {"filename", "caption", "negative_caption"}}``, plus the
    attribute swapped; up to one entry per image and kind, from its own random stream."""
    entries: dict[str, Any] = {}
    for index, scene in enumerate(records.scenes):
        rng = random.Random(stream_seed(seed, split, index, "hard-negatives"))
        objects = [SceneObject(**o) for o in scene["objects"]]
        captions = records.captions[scene["image_id"]]
        for kind in SWAP_KINDS:
            pair = hard_negative(objects, scene["background"], captions, kind, rng)
            if pair is not None:
                entries[str(len(entries))] = {
                    "caption": pair[0],
                    "filename": scene["image"],
                    "negative_caption": pair[1],
                    "swapped": kind,
                }
    return entries


# ---------------------------------------------------------------- file formats


def write_json(path: Path, payload: Any) -> None:
    """Compact, key-sorted JSON: byte-identical for identical content."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    path.write_text(text + "\n", encoding="utf-8")


def karpathy_entries(split: str, records: SplitRecords) -> list[dict[str, Any]]:
    if split == "train":  # one entry per caption, as LAVIS' coco_karpathy_train.json
        return [
            {"caption": caption, "image": image_relpath(split, image_id), "image_id": image_id}
            for image_id, captions in records.captions.items()
            for caption in captions
        ]
    return [
        {"caption": captions, "image": image_relpath(split, image_id)}
        for image_id, captions in records.captions.items()
    ]


def coco_captions(split: str, records: SplitRecords) -> dict[str, Any]:
    images = [
        {
            "file_name": Path(image_relpath(split, i)).name,
            "height": IMAGE_SIZE,
            "id": i,
            "width": IMAGE_SIZE,
        }
        for i in records.captions
    ]
    annotations = [
        {"caption": caption, "id": image_id * QUESTIONS_PER_IMAGE_ID + k, "image_id": image_id}
        for image_id, captions in records.captions.items()
        for k, caption in enumerate(captions)
    ]
    info = {"description": f"synthetic scene world, {split} split", "version": "1.0"}
    return {
        "annotations": annotations,
        "images": images,
        "info": info,
        "licenses": [],
        "type": "captions",
    }


def vqa_files(split: str, records: SplitRecords) -> tuple[dict[str, Any], dict[str, Any]]:
    info = {"description": f"synthetic scene world VQA, {split} split", "version": "1.0"}
    common = {"data_subtype": split, "data_type": "synthetic", "info": info, "license": {}}
    questions = {**common, "questions": records.questions, "task_type": "Open-Ended"}
    annotations = {**common, "annotations": records.annotations}
    return questions, annotations


def write_split(
    split: str, records: SplitRecords, out: Path, seed: int, train_hard_negatives: bool = False
) -> None:
    write_json(out / f"scenes_{split}.json", records.scenes)
    write_json(out / f"karpathy_{split}.json", karpathy_entries(split, records))
    if split != "train":
        write_json(out / f"captions_{split}.json", coco_captions(split, records))
    # val/test: held out for eval-retrieval. train: ITM text negatives to train with
    # (stage1.itm_hard_negatives), only on request: 2.7 MB for an experiment that did not help
    # (README), where sample_data must stay within 40 MB.
    hard_negatives = out / f"hard_negatives_{split}.json"
    if split != "train" or train_hard_negatives:
        write_json(hard_negatives, hard_negative_entries(split, records, seed))
    else:
        hard_negatives.unlink(missing_ok=True)  # from an earlier run with the flag
    questions, annotations = vqa_files(split, records)
    write_json(out / f"vqa_{split}_questions.json", questions)
    write_json(out / f"vqa_{split}_annotations.json", annotations)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "sample_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument(
        "--train-hard-negatives",
        action="store_true",
        help="also write hard_negatives_train.json (for stage1.itm_hard_negatives)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    for split in SPLITS:
        records = generate_split(split, counts[split], args.seed, args.out)
        write_split(split, records, args.out, args.seed, args.train_hard_negatives)
    print(
        f"wrote {sum(counts.values())} images to {args.out} in {time.perf_counter() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
