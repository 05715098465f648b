"""What a stage-2 model's soft prompt carries, and where its answers fail, on the embedded default.

The diagnosis behind the README's "Why yes/no and sizes stay near blind": linear probes
(``backbone_metrics.linear_probe_accuracy``, fitted on the 3000 train scenes, read on the 600
val + test scenes) on the soft prompt (the Q-Former's outputs projected into the LM, flattened)
and, for comparison, on the frozen features pooled as [CLS ; mean]:

- ``one_object``: colour, shape and size of the object of one-object scenes;
- ``pair_recall``: whether a (colour, shape) pair is in the scene, one probe per pair, as the
  share of present pairs found, by the scene's number of objects (1-3).

With ``--answers`` (``eval-vqa``'s ``vqa_results.json`` on val, real and ``--blind``): the share
of exactly right answers per question kind and number of objects, and which shape answered
"what shape is ..." for each true shape.

    python scripts/soft_prompt_probe.py --model RUN/stage2 --answers RUN/vqa RUN/vqa-blind
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import backbone_metrics as metrics  # scripts/ is on the path when run as a script
import torch

from qformer_cli.api import load_model

DATA = Path(__file__).resolve().parent.parent / "sample_data"
SIZES = ("small", "large")


@torch.no_grad()
def features(generator: Any, scenes: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per scene: the flattened soft prompt (Q x LLM width) and the frozen [CLS ; mean]."""
    pixels = metrics.load_split_pixels(DATA, scenes, DATA / "backbones" / "vision")
    prompts, pooled = [], []
    for start in range(0, len(pixels), 128):
        frozen = generator.encode_images(pixels[start : start + 128])  # (B, N, C)
        prompts.append(generator.pipeline.bridge.soft_prompt(frozen).flatten(1))
        pooled.append(torch.cat([frozen[:, 0], frozen[:, 1:].mean(dim=1)], dim=-1))
    return {"soft_prompt": torch.cat(prompts), "frozen_pooled": torch.cat(pooled)}


def one_object_probes(train: dict, test: dict, train_scenes: list, test_scenes: list) -> dict:
    labels_train, labels_test = (metrics.attribute_labels(s) for s in (train_scenes, test_scenes))
    return {
        attribute: round(
            metrics.linear_probe_accuracy(
                train[labels_train[attribute][0]],
                torch.tensor(labels_train[attribute][1]),
                test[labels_test[attribute][0]],
                torch.tensor(labels_test[attribute][1]),
            ),
            3,
        )
        for attribute in ("color", "shape", "size")
    }


def has_pair(scene: dict[str, Any], color: str, shape: str) -> int:
    return int(any(o["color"] == color and o["shape"] == shape for o in scene["objects"]))


def pair_recall(train: torch.Tensor, test: torch.Tensor, train_scenes: list, test_scenes: list):
    """Share of present (colour, shape) pairs a linear probe finds, by number of objects."""
    found: dict[int, list[int]] = defaultdict(list)
    objects = torch.tensor([len(s["objects"]) for s in test_scenes])
    for color in metrics.COLORS:
        for shape in metrics.SHAPES:
            y_train = torch.tensor([has_pair(s, color, shape) for s in train_scenes])
            y_test = torch.tensor([has_pair(s, color, shape) for s in test_scenes])
            predicted = metrics.fit_linear_probe(train, y_train, 2, max_iter=100)(test)
            for count in (1, 2, 3):
                present = (objects == count) & (y_test == 1)
                found[count] += predicted[present].tolist()
    return {count: round(sum(hits) / len(hits), 3) for count, hits in sorted(found.items())}


def question_kind(question: str) -> str | None:
    if question.startswith("is the "):
        return "is the {shape} {color}?"
    if question.startswith("is there"):
        named = "{shape}" if len(question.split()) == 4 else "{color} {shape}"
        return f"is there a {named}?"
    for start in ("what size", "what shape is the", "what color is the"):
        if question.startswith(start):
            return start
    return None


def answer_breakdown(results_file: Path) -> dict[str, Any]:
    """Exactly right answers by question kind and number of objects; shapes answered."""
    questions = metrics.read_json(DATA / "vqa_val_questions.json")["questions"]
    annotations = metrics.read_json(DATA / "vqa_val_annotations.json")["annotations"]
    truth = {a["question_id"]: a["multiple_choice_answer"] for a in annotations}
    asked = {q["question_id"]: q for q in questions}
    scenes = {s["image_id"]: s for s in metrics.read_json(DATA / "scenes_val.json")}
    right: dict[str, list[bool]] = defaultdict(list)
    shapes: Counter[str] = Counter()
    for row in json.loads(results_file.read_text()):
        question = asked[row["question_id"]]
        kind = question_kind(question["question"])
        if kind is None:
            continue
        answer, expected = metrics.answer_word(row["answer"]), truth[row["question_id"]]
        count = len(scenes[question["image_id"]]["objects"])
        right[f"{kind} / {count} objects"].append(answer == expected)
        if kind == "what shape is the":
            shapes[f"{expected} -> {answer}"] += 1
    return {
        "exact": {k: round(sum(v) / len(v), 2) for k, v in sorted(right.items())},
        "counts": {k: len(v) for k, v in sorted(right.items())},
        "shape_answers": dict(sorted(shapes.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a stage-2 run or checkpoint")
    parser.add_argument("--answers", type=Path, nargs="*", default=[], help="eval-vqa --out dirs")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    generator = load_model(args.model, device="cpu").generator
    train_scenes = metrics.read_json(DATA / "scenes_train.json")
    test_scenes = metrics.read_json(DATA / "scenes_val.json") + metrics.read_json(
        DATA / "scenes_test.json"
    )
    train, test = features(generator, train_scenes), features(generator, test_scenes)
    report: dict[str, Any] = {"model": str(args.model)}
    for name in train:
        report[name] = {
            "one_object": one_object_probes(train[name], test[name], train_scenes, test_scenes),
            "pair_recall": pair_recall(train[name], test[name], train_scenes, test_scenes),
        }
    for directory in args.answers:
        report[f"answers {directory}"] = answer_breakdown(directory / "vqa_results.json")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
