"""The synthetic world: regeneration is byte-identical, the shipped data came from the script's
defaults, and its questions, answers and captions agree with the scene ground truth (checked
by a small solver written independently of the generator)."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "sample_data"
sys.path.insert(0, str(ROOT / "scripts"))

import make_sample_data  # noqa: E402

COLORS = {"red", "green", "blue", "yellow", "purple"}
SHAPES = {"circle", "square", "triangle"}
CELL_OF_PHRASE = {
    "in the top left corner": (0, 0),
    "at the top": (0, 1),
    "in the top right corner": (0, 2),
    "on the left": (1, 0),
    "in the center": (1, 1),
    "on the right": (1, 2),
    "in the bottom left corner": (2, 0),
    "at the bottom": (2, 1),
    "in the bottom right corner": (2, 2),
}
NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4"}


def load(name: str) -> object:
    return json.loads((SHIPPED / name).read_text())


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_sample_data.main(
        ["--out", str(out), "--num-train", "12", "--num-val", "4", "--num-test", "4"]
    )
    return out


def test_regeneration_is_byte_identical(small_world: Path, tmp_path: Path) -> None:
    make_sample_data.main(
        ["--out", str(tmp_path), "--num-train", "12", "--num-val", "4", "--num-test", "4"]
    )
    first, second = files_of(small_world), files_of(tmp_path)
    assert len(first) == 12 + 4 + 4 + 16  # images + 16 JSON files
    assert first == second


def test_another_seed_gives_other_images(small_world: Path, tmp_path: Path) -> None:
    make_sample_data.main(
        [
            "--out",
            str(tmp_path),
            "--seed",
            "1",
            "--num-train",
            "2",
            "--num-val",
            "0",
            "--num-test",
            "0",
        ]
    )
    name = "images/train/scene_100000.png"
    assert (tmp_path / name).read_bytes() != (small_world / name).read_bytes()


def test_shipped_data_is_what_the_script_generates(small_world: Path) -> None:
    """Each image has its own random stream, so a small run reproduces the first shipped ones."""
    for name, content in files_of(small_world / "images").items():
        assert (SHIPPED / "images" / name).read_bytes() == content, name
    shipped_val = load("karpathy_val.json")
    small_val = json.loads((small_world / "karpathy_val.json").read_text())
    assert shipped_val[:4] == small_val
    shipped_questions = load("vqa_test_questions.json")["questions"]
    small_questions = json.loads((small_world / "vqa_test_questions.json").read_text())["questions"]
    assert shipped_questions[:16] == small_questions
    small_train = json.loads((small_world / "vqa_train_annotations.json").read_text())
    first_ids = {a["image_id"] for a in small_train["annotations"]}
    shipped_train = load("vqa_train_annotations.json")["annotations"]
    assert [a for a in shipped_train if a["image_id"] in first_ids] == small_train["annotations"]
    small_pairs = json.loads((small_world / "hard_negatives_val.json").read_text())
    shipped_pairs = load("hard_negatives_val.json")
    assert small_pairs and all(shipped_pairs[key] == pair for key, pair in small_pairs.items())


def test_shipped_sizes_and_budget() -> None:
    assert len(list((SHIPPED / "images" / "train").glob("*.png"))) == 3000
    assert len(list((SHIPPED / "images" / "val").glob("*.png"))) == 300
    assert len(list((SHIPPED / "images" / "test").glob("*.png"))) == 300
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total <= 40_000_000  # 40 MB, backbones included


# ---------------------------------------------------------------- an independent solver


def solve(question: str, objects: list[dict[str, object]]) -> str:
    """The right answer to a question about a scene, from the objects alone."""
    colors = [o["color"] for o in objects]
    shapes = [o["shape"] for o in objects]
    at = {(o["row"], o["col"]): o for o in objects}
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(colors.count(m[1]))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(shapes.count(m[1]))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if (m[1], m[2]) in zip(colors, shapes, strict=True) else "no"
    if m := re.fullmatch(r"is there a (\w+)\?", question):
        return "yes" if m[1] in shapes else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+)\?", question):
        assert shapes.count(m[1]) == 1, question
        return "yes" if colors[shapes.index(m[1])] == m[2] else "no"
    if m := re.fullmatch(r"what color is the object (.+)\?", question):
        return str(at[CELL_OF_PHRASE[m[1]]]["color"])
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        assert shapes.count(m[1]) == 1, question
        return str(colors[shapes.index(m[1])])
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        assert colors.count(m[1]) == 1, question
        return str(shapes[colors.index(m[1])])
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        return str(at[CELL_OF_PHRASE[m[1]]]["shape"])
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        (match,) = [o for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        return str(match["size"])
    raise AssertionError(f"unparsed question: {question}")


def normalize(answer: str) -> str:
    """The VQAv2 normalizations this world uses: case, final period, articles, number words."""
    words = [w for w in answer.lower().rstrip(".").split() if w not in {"a", "an", "the"}]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


# Questions per image: yes/no, number, other x2 (val, test); train: one other, two more yes/no.
@pytest.mark.parametrize(("split", "per_image"), [("train", 5), ("val", 4), ("test", 4)])
def test_vqa_answers_agree_with_the_scenes(split: str, per_image: int) -> None:
    scenes = {s["image_id"]: s["objects"] for s in load(f"scenes_{split}.json")}
    questions = load(f"vqa_{split}_questions.json")["questions"]
    annotations = {
        a["question_id"]: a for a in load(f"vqa_{split}_annotations.json")["annotations"]
    }
    assert len(questions) == len(annotations) == per_image * len(scenes)
    assert Counter(q["image_id"] for q in questions) == dict.fromkeys(scenes, per_image)
    disagreements = 0
    for q in questions:
        annotation = annotations[q["question_id"]]
        truth = solve(q["question"], scenes[q["image_id"]])
        human = [normalize(a["answer"]) for a in annotation["answers"]]
        assert len(human) == 10 and [a["answer_id"] for a in annotation["answers"]] == list(
            range(1, 11)
        )
        assert annotation["multiple_choice_answer"] == truth
        assert 7 <= human.count(truth) <= 10, q  # up to three people disagree
        disagreements += human.count(truth) < 10
    assert 0.4 * len(questions) < disagreements < 0.8 * len(questions)


def test_yes_no_is_balanced_with_hard_negatives() -> None:
    scenes = {s["image_id"]: s["objects"] for s in load("scenes_train.json")}
    yes = no = hard = 0
    for q in load("vqa_train_questions.json")["questions"]:
        m = re.fullmatch(r"is there a (\w+) (\w+)\?", q["question"])
        truth = solve(q["question"], scenes[q["image_id"]])
        if truth not in ("yes", "no"):
            continue
        yes, no = yes + (truth == "yes"), no + (truth == "no")
        if m and truth == "no":
            objects = scenes[q["image_id"]]
            hard += m[1] in {o["color"] for o in objects} and m[2] in {o["shape"] for o in objects}
    assert yes == no == 4500  # one yes/no per image, two more per train image (EXTRA_YES_NO)
    assert hard >= 300  # colour and shape both present, just not on the same object


def test_answers_include_variants_the_metric_normalizes() -> None:
    raw = Counter(
        a["answer"]
        for ann in load("vqa_val_annotations.json")["annotations"]
        for a in ann["answers"]
    )
    assert {"two", "2", "Red.", "red", "a circle", "circle"} <= set(raw)
    assert sum(n for a, n in raw.items() if a != normalize(a)) > 0.1 * sum(raw.values())


def test_captions_name_only_what_is_in_the_scene() -> None:
    scenes = {s["image_id"]: s for s in load("scenes_val.json")}
    for entry in load("karpathy_val.json"):
        image_id = int(re.search(r"(\d+)\.png$", entry["image"])[1])
        objects = scenes[image_id]["objects"]
        assert len(entry["caption"]) == len(set(entry["caption"])) == 5
        for caption in entry["caption"]:
            words = set(caption.replace(",", " ").replace(":", " ").split())
            assert words & COLORS <= {o["color"] for o in objects}, caption
            assert words & SHAPES <= {o["shape"] for o in objects}, caption
            if "plain background" in caption:
                assert scenes[image_id]["background"] == "clean"


# ---------------------------------------------------------------- ITM hard negatives

PHRASE = re.compile(
    r"a (?:(small|large) )?(red|green|blue|yellow|purple) (circle|square|triangle)"
    r"(?:(?: alone)? (" + "|".join(CELL_OF_PHRASE) + r"))?"
)


def describes(text: str, objects: list[dict[str, object]]) -> bool:
    """Whether each object phrase of ``text`` ("a small red circle in the center") can be given
    its own object of the scene agreeing on everything the phrase states, the first two in the
    relation the text names ("... above ...") if it names one."""
    phrases = PHRASE.findall(text)
    relation = re.search(r" (above|below|to the left of|to the right of) ", text)

    def related(first: dict[str, object], second: dict[str, object]) -> bool:
        """The caption's relation of its first object to its second, as the scene has them."""
        if relation is None:
            return True
        rows, cols = (first["row"], second["row"]), (first["col"], second["col"])
        return {
            "above": rows[0] < rows[1],
            "below": rows[0] > rows[1],
            "to the left of": rows[0] == rows[1] and cols[0] < cols[1],
            "to the right of": rows[0] == rows[1] and cols[0] > cols[1],
        }[relation[1]]

    def agrees(phrase: tuple[str, ...], obj: dict[str, object]) -> bool:
        size, color, shape, place = phrase
        cell = (obj["row"], obj["col"])
        return (
            (not size or size == obj["size"])
            and (color, shape) == (obj["color"], obj["shape"])
            and (not place or CELL_OF_PHRASE[place] == cell)
        )

    def assign(rest: list[tuple[str, ...]], free: list[dict[str, object]], chosen: list) -> bool:
        if not rest:
            return len(chosen) < 2 or related(chosen[0], chosen[1])
        return any(
            agrees(rest[0], obj) and assign(rest[1:], free[:k] + free[k + 1 :], [*chosen, obj])
            for k, obj in enumerate(free)
        )

    return bool(phrases) and assign(phrases, list(objects), [])


CAPTION_KEYS = ("caption", "negative_caption")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_hard_negatives_are_false_captions_one_attribute_away(
    split: str, request: pytest.FixtureRequest
) -> None:
    """val/test: shipped, held out for eval-retrieval; train: stage1.itm_hard_negatives's, from
    ``make_sample_data.py --train-hard-negatives``."""
    folder = request.getfixturevalue("train_hard_negatives_world") if split == "train" else SHIPPED

    def read(name: str) -> Any:
        return json.loads((folder / name).read_text())

    scenes = {s["image"]: s["objects"] for s in read(f"scenes_{split}.json")}
    captions: dict[str, set[str]] = {}
    for entry in read(f"karpathy_{split}.json"):  # train: one caption per entry
        texts = entry["caption"]
        captions.setdefault(entry["image"], set()).update(
            [texts] if isinstance(texts, str) else texts
        )
    pairs = read(f"hard_negatives_{split}.json")
    assert Counter(p["swapped"] for p in pairs.values()).keys() == {
        "color",
        "shape",
        "size",
        "position",
    }
    assert len(pairs) >= 3.5 * len(scenes)  # nearly every image has all four kinds
    vocabulary = {
        "color": COLORS,
        "shape": SHAPES,
        "size": {"small", "large"},
        "position": {word for phrase in CELL_OF_PHRASE for word in phrase.split()},
    }
    for pair in pairs.values():
        objects = scenes[pair["filename"]]
        assert pair["caption"] in captions[pair["filename"]], pair
        assert describes(pair["caption"], objects), pair
        assert not describes(pair["negative_caption"], objects), pair
        old, new = (Counter(pair[key].replace(",", "").split()) for key in CAPTION_KEYS)
        changed = set((old - new) + (new - old))  # the words one has more of than the other
        assert changed and changed <= vocabulary[pair["swapped"]], pair
