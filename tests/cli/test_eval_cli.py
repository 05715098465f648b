"""`eval-vqa` and `eval-caption` with --predictions: no model, files in, metrics out."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.data import sample_split_files

runner = CliRunner()
FILES = sample_split_files("val")


def _majority_answers() -> list[dict]:
    annotations = json.loads(FILES.vqa_annotations.read_text())["annotations"]
    return [
        {"question_id": a["question_id"], "answer": a["multiple_choice_answer"]}
        for a in annotations
    ]


def test_vqa_predictions_mode_scores_a_results_file(tmp_path: Path):
    # At most 3 of the 10 annotators disagree, so the majority answer matches >= 7 of them:
    # every leave-one-out subset has >= 3 matches, min(1, n/3) = 1, accuracy 100 everywhere.
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_majority_answers()))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["eval-vqa", "--predictions", str(results), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["overall"] == 100.0
    assert metrics["num_questions"] == 1200
    assert set(metrics["per_answer_type"]) == {"yes/no", "number", "other"}
    assert json.loads((out / "metrics.json").read_text())["overall"] == 100.0


def test_vqa_all_wrong_answers_score_zero(tmp_path: Path):
    wrong = [dict(row, answer="zebra") for row in _majority_answers()]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(wrong))
    result = runner.invoke(
        app, ["eval-vqa", "--predictions", str(results), "--out", str(tmp_path / "o"), "--json"]
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["overall"] == 0.0


def test_vqa_missing_questions_are_named(tmp_path: Path):
    answers = _majority_answers()
    results = tmp_path / "results.json"
    results.write_text(json.dumps(answers[2:]))
    result = runner.invoke(
        app, ["eval-vqa", "--predictions", str(results), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "2 of 1200" in result.stderr and str(answers[0]["question_id"]) in result.stderr


def test_vqa_needs_exactly_one_of_model_and_predictions(tmp_path: Path):
    result = runner.invoke(app, ["eval-vqa", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2


def test_caption_predictions_mode_writes_coco_metrics(tmp_path: Path):
    ground_truth = json.loads(FILES.coco_captions.read_text())
    first = {}
    for annotation in ground_truth["annotations"]:
        first.setdefault(annotation["image_id"], annotation["caption"])
    results = tmp_path / "captions.json"
    results.write_text(json.dumps([{"image_id": k, "caption": v} for k, v in first.items()]))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["eval-caption", "--predictions", str(results), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert {"BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics)
    assert metrics["BLEU_1"] > 0.9  # each prediction is one of its own references
    assert "SPICE" in metrics.get("skipped", {}) or "SPICE" in metrics
    assert json.loads((out / "metrics.json").read_text())["CIDEr"] == metrics["CIDEr"]


def test_vqa_predictions_without_annotations_are_refused(tmp_path: Path) -> None:
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1}]}))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question_id": 1, "answer": "yes"}]))
    args = ["eval-vqa", "--predictions", str(results), "--questions", str(questions)]
    outcome = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert outcome.exit_code == 2
    assert outcome.output.strip().splitlines() == [
        "error: --predictions is scored against --annotations: give the annotations"
    ]
