"""JSONL and CSV tables of captions and questions, written the way Python's json and csv modules
(and spreadsheets) write them, read through the commands; each scored against the same data in
the official layout."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from qformer_cli.cli import app
from qformer_cli.data import read_caption_file, read_coco_captions
from qformer_cli.eval.vqa_metric import normalize_answer
from tests.tiny_runs import ROOT, invoke_json, runner

SAMPLE = ROOT / "sample_data"
IMAGES = 12
QUESTIONS = 24


def _coco_subset(tmp_path: Path) -> tuple[Path, dict]:
    """The first IMAGES images of the val captions, as COCO JSON beside the sample images."""
    coco = json.loads((SAMPLE / "captions_val.json").read_text())
    images = coco["images"][:IMAGES]
    kept = {image["id"] for image in images}
    subset = {
        "images": images,
        "annotations": [a for a in coco["annotations"] if a["image_id"] in kept],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(subset))
    return path, subset


def _caption_csv(tmp_path: Path, subset: dict) -> Path:
    names = {image["id"]: image["file_name"] for image in subset["images"]}
    path = tmp_path / "captions.csv"
    with path.open("w", newline="") as handle:  # commas in captions get quoted
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for annotation in subset["annotations"]:
            writer.writerow([names[annotation["image_id"]], annotation["caption"]])
    return path


def test_caption_csv_reads_as_its_coco_json(tmp_path: Path) -> None:
    coco, subset = _coco_subset(tmp_path)
    table = _caption_csv(tmp_path, subset)
    image_dir = SAMPLE / "images" / "val"
    from_table = read_caption_file(table, image_dir, karpathy_splits=("test",))
    from_json = read_coco_captions(coco, image_dir)
    # the same images, ids (the numbers ending the file names), files and captions
    assert [replace(s, origin="") for s in from_table] == [replace(s, origin="") for s in from_json]
    assert any("," in caption for sample in from_table for caption in sample.captions)


def test_eval_caption_scores_a_csv_ground_truth_as_its_coco_json(tmp_path: Path) -> None:
    coco, subset = _coco_subset(tmp_path)
    table = _caption_csv(tmp_path, subset)
    predictions = [
        {"image_id": image["id"], "caption": "a small red circle on a noisy background"}
        for image in subset["images"]
    ]
    (tmp_path / "results.json").write_text(json.dumps(predictions))
    scores = [
        invoke_json(
            "eval-caption",
            "--predictions",
            str(tmp_path / "results.json"),
            "--annotations",
            str(truth),
            "--out",
            str(tmp_path / truth.suffix[1:]),
        )
        for truth in (coco, table)
    ]
    assert scores[0] == scores[1] and scores[0]["CIDEr"] > 0


def _vqa_subset() -> tuple[list[dict], dict[int, dict]]:
    questions = json.loads((SAMPLE / "vqa_val_questions.json").read_text())["questions"]
    annotations = json.loads((SAMPLE / "vqa_val_annotations.json").read_text())["annotations"]
    by_id = {a["question_id"]: a for a in annotations}
    return questions[:QUESTIONS], by_id


def _results(questions: list[dict], by_id: dict[int, dict], path: Path) -> Path:
    """Half right (the majority answer), half wrong."""
    majority = {qid: a["multiple_choice_answer"] for qid, a in by_id.items()}
    rows = [
        {
            "question_id": q["question_id"],
            "answer": majority[q["question_id"]] if i % 2 else "purple",
        }
        for i, q in enumerate(questions)
    ]
    path.write_text(json.dumps(rows))
    return path


def test_vqa_jsonl_with_ten_answers_scores_as_the_official_files(tmp_path: Path) -> None:
    questions, by_id = _vqa_subset()
    table = tmp_path / "vqa.jsonl"
    with table.open("w") as handle:
        for q in questions:
            answers = [a["answer"] for a in by_id[q["question_id"]]["answers"]]
            row = {"image": f"scene_{q['image_id']}.png", "question": q["question"],
                   "answers": answers, "question_id": q["question_id"]}  # fmt: skip
            handle.write(json.dumps(row) + "\n")
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    annotations = [by_id[q["question_id"]] for q in questions]
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    results = _results(questions, by_id, tmp_path / "results.json")
    official = invoke_json(
        "eval-vqa", "--predictions", str(results), "--questions", str(tmp_path / "q.json"),
        "--annotations", str(tmp_path / "a.json"), "--out", str(tmp_path / "official"),
    )  # fmt: skip
    from_table = invoke_json(
        "eval-vqa", "--predictions", str(results), "--questions", str(table),
        "--out", str(tmp_path / "table"),
    )  # fmt: skip
    assert from_table["overall"] == official["overall"]
    assert from_table["num_questions"] == official["num_questions"] == QUESTIONS


def test_vqa_csv_with_one_answer_needs_the_exact_metric(tmp_path: Path) -> None:
    questions, by_id = _vqa_subset()
    table = tmp_path / "vqa.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "image", "question", "answer"])
        for q in questions:
            answer = by_id[q["question_id"]]["multiple_choice_answer"]
            writer.writerow([q["question_id"], f"scene_{q['image_id']}.png", q["question"], answer])
    results = _results(questions, by_id, tmp_path / "results.json")
    args = ["eval-vqa", "--predictions", str(results), "--questions", str(table)]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "official")])
    assert refused.exit_code == 1 and "--metric exact" in refused.stderr
    scored = invoke_json(*args, "--metric", "exact", "--out", str(tmp_path / "exact"))
    rows = json.loads(results.read_text())
    truth = {qid: normalize_answer(a["multiple_choice_answer"]) for qid, a in by_id.items()}
    right = [normalize_answer(row["answer"]) == truth[row["question_id"]] for row in rows]
    assert scored["overall"] == pytest.approx(100 * sum(right) / len(right), abs=0.01)
    assert 0 < scored["overall"] < 100


def test_training_reads_a_jsonl_caption_table(tmp_path: Path) -> None:
    entries = json.loads((SAMPLE / "karpathy_train.json").read_text())[:32]
    table = tmp_path / "train.jsonl"
    table.write_text(
        "".join(json.dumps({"image": e["image"], "caption": e["caption"]}) + "\n" for e in entries)
    )
    args = ["--max-steps", "1", "--batch-size", "8", "--set", "model.qformer.num_layers=2"]
    summary = invoke_json(
        "pretrain-stage1", "--data", str(table), "--set", f"data.image_root={SAMPLE}",
        *args, "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert summary["steps"] == 1
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["data"]["train"] == str(table)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        (
            "bad.jsonl",
            '{"image": "a.png", "caption": "ok"}\n{"image": "b.png", caption\n',
            "line 2",
        ),
        ("bad.csv", "image,caption\na.png,fine\nb.png,\n", "line 3"),
        ("bad.tsv", "image\ttext\na.png\tfine\n", "line 2"),
    ],
)
@pytest.mark.parametrize(
    "command", [["caption", "--annotations"], ["eval-retrieval", "--annotations"]]
)
def test_a_bad_row_is_named_before_any_model_loads(
    tmp_path: Path, name: str, text: str, where: str, command: list[str]
) -> None:
    """--model names an empty folder: the data error comes first, so the data were read first."""
    (tmp_path / name).write_text(text)
    result = runner.invoke(
        app, [command[0], "--model", str(tmp_path), command[1], str(tmp_path / name)]
    )
    assert result.exit_code == 1
    assert f"{name}: {where}" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_bad_question_is_named_before_any_model_loads(tmp_path: Path) -> None:
    questions = {"questions": [{"question_id": 1, "image_id": 200000}]}  # no "question"
    (tmp_path / "q.json").write_text(json.dumps(questions))
    args = ["eval-vqa", "--model", str(tmp_path), "--questions", str(tmp_path / "q.json")]
    result = runner.invoke(app, [*args, "--images", str(SAMPLE / "images" / "val")])
    assert result.exit_code == 1, result.output
    assert "q.json" in result.stderr and "'question'" in result.stderr
