"""Validation during training (train.eval_every): the metrics it logs equal what the evaluation
commands report for the same checkpoint, and checkpoints/best is the best of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qformer_cli.cli import app
from tests.tiny_runs import FAST, ROOT, invoke_json, metrics_rows, runner

SAMPLE = ROOT / "sample_data"
VAL_IMAGES = 60


@pytest.fixture(scope="module")
def validated_stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("validated") / "stage1"
    invoke_json(
        "pretrain-stage1", "--out", str(run), *FAST, "--max-steps", "30",
        "--set", "train.eval_every=10", "--set", f"data.val_limit={VAL_IMAGES}",
        "--set", "train.lr=3e-3", "--set", "train.log_every=5",
    )  # fmt: skip
    return run


def test_stage1_validation_equals_eval_retrieval_and_best_is_the_best(
    validated_stage1: Path, tmp_path: Path
) -> None:
    rows = [row for row in metrics_rows(validated_stage1) if "val_r_mean" in row]
    assert [row["step"] for row in rows] == [10, 20, 30]
    best_row = max(rows, key=lambda row: row["val_r_mean"])  # the first of equals is kept
    best = validated_stage1 / "checkpoints" / "best"
    assert json.loads((best / "config.json").read_text())["step"] == best_row["step"]
    # eval-retrieval on RUN:best with the same held-out images: its ITC-only rows
    subset = tmp_path / "val.json"
    subset.write_text(
        json.dumps(json.loads((SAMPLE / "karpathy_val.json").read_text())[:VAL_IMAGES])
    )
    scores = invoke_json(
        "eval-retrieval", "--model", f"{validated_stage1}:best", "--annotations", str(subset),
        "--images", str(SAMPLE), "--k", "1", "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert scores["checkpoint"] == str(best)
    assert scores["image_to_text_itc_only"]["R@1"] == best_row["val_i2t_r1"]
    assert scores["image_to_text_itc_only"]["R@5"] == best_row["val_i2t_r5"]
    assert scores["text_to_image_itc_only"]["R@1"] == best_row["val_t2i_r1"]
    assert scores["text_to_image_itc_only"]["R@5"] == best_row["val_t2i_r5"]


def test_stage2_starts_from_run_best(validated_stage1: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["pretrain-stage2", "--init", f"{validated_stage1}:best", "--max-steps", "1",
         "--batch-size", "8", "--out", str(tmp_path / "stage2"), "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Q-Former init from {validated_stage1 / 'checkpoints' / 'best'}" in result.stderr


def test_stage2_validation_cider_equals_the_caption_command(
    trained_stage1: Path, tmp_path: Path
) -> None:
    run = tmp_path / "stage2"
    invoke_json(
        "pretrain-stage2", "--init", str(trained_stage1), "--out", str(run), "--max-steps", "6",
        "--batch-size", "16", "--set", "train.eval_every=3", "--set", "data.val_limit=12",
        "--set", "generate.num_beams=1", "--quiet",
    )  # fmt: skip
    rows = [row for row in metrics_rows(run) if "val_cider" in row]
    assert [row["step"] for row in rows] == [3, 6]
    best_row = max(rows, key=lambda row: row["val_cider"])
    coco = json.loads((SAMPLE / "captions_val.json").read_text())
    images = coco["images"][:12]
    kept = {image["id"] for image in images}
    truth = {
        "images": images,
        "annotations": [a for a in coco["annotations"] if a["image_id"] in kept],
    }
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    captioned = invoke_json(
        "caption", "--model", f"{run}:best", "--annotations", str(tmp_path / "truth.json"),
        "--images", str(SAMPLE / "images" / "val"), "--num-beams", "1",
        "--out", str(tmp_path / "caption"),
    )  # fmt: skip
    assert captioned["metrics"]["CIDEr"] == pytest.approx(best_row["val_cider"], abs=1e-9)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.keep_best_by=val_cider", "train.keep_best_by 'val_cider': stage 1 reports"),
        ("train.eval_every=-1", "train.eval_every = -1: must be >= 0"),
    ],
)
def test_validation_settings_are_checked_before_loading(setting: str, message: str) -> None:
    args = ["pretrain-stage1", "--set", "train.eval_every=5", "--set", setting]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert message in line
