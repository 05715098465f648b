"""`qformer pretrain-stage1` end to end on the embedded default: losses, files, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qformer_cli import checkpoint, faults
from qformer_cli.cli import app
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.config import QFormerConfig
from qformer_cli.models.convert import load_external_weights
from tests.tiny_runs import (
    assert_same_weights,
    assert_weights_moved,
    final_weights,
    metrics_rows,
    metrics_steps,
    runner,
)
from tests.tiny_runs import train_stage1 as _train


@pytest.mark.slow
def test_training_writes_checkpoint_metrics_and_plot(tmp_path: Path):
    result = _train(tmp_path / "run", "--max-steps", "4", "--set", "train.save_every=2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    run = tmp_path / "run"
    assert summary["steps"] == 4
    assert (run / "loss.png").stat().st_size > 0
    assert json.loads((run / "run_config.json").read_text())["train"]["batch_size"] == 8
    rows = metrics_rows(run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert {"itc", "itm", "itg", "loss", "lr"} <= set(rows[-1])
    final = Path(summary["final_checkpoint"])
    checkpoint.verify_checkpoint(final)
    assert (final / "tokenizer" / "tokenizer.json").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000002", "step-00000004"]

    # ... and it converts to LAVIS's layout, which loads back tensor for tensor.
    converted = runner.invoke(
        app, ["convert", str(tmp_path / "s1.pth"), "--model", str(run), "--to", "lavis"]
    )
    assert converted.exit_code == 0, converted.output
    trained = load_file(str(final / "model.safetensors"))
    fresh = Stage1Model(QFormerConfig(**json.loads((final / "config.json").read_text())["qformer"]))
    report = load_external_weights(fresh, tmp_path / "s1.pth")
    assert report.missing == [] and report.unexpected == []
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path: Path):
    straight = _train(tmp_path / "straight", "--max-steps", "5")
    assert straight.exit_code == 0, straight.output

    interrupted = _train(
        tmp_path / "resumed", "--max-steps", "5", env={faults.STOP_AFTER_STEP_ENV: "2"}
    )
    assert interrupted.exit_code == 143, interrupted.output
    assert "--resume auto" in interrupted.stderr
    resumed = _train(tmp_path / "resumed", "--max-steps", "5", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output

    assert_same_weights(final_weights(straight), final_weights(resumed))
    assert metrics_steps(tmp_path / "resumed") == [1, 2, 3, 4, 5]
    assert_weights_moved(tmp_path / "resumed")  # step 2 -> step 5
    elapsed = [row["elapsed_s"] for row in metrics_rows(tmp_path / "resumed")]
    assert elapsed == sorted(elapsed) and elapsed[2] > elapsed[1], elapsed  # goes on at resume


def test_bad_training_data_is_a_one_line_error(tmp_path: Path):
    bad = tmp_path / "train.json"
    bad.write_text('[{"caption": "a red circle"}]')
    result = _train(tmp_path / "run", "--max-steps", "1", "--data", str(bad))
    assert result.exit_code == 1
    assert "train.json" in result.stderr and "image" in result.stderr
    assert "Traceback" not in result.output


def test_resume_from_a_corrupt_checkpoint_is_refused(tmp_path: Path):
    directory = checkpoint.save_checkpoint(
        tmp_path, 3, {}, checkpoint.CheckpointMeta(1, QFormerConfig(), run={}), {"step": 3}
    )
    (directory / checkpoint.WEIGHTS).write_bytes(b"garbage")
    result = _train(tmp_path / "other", "--max-steps", "1", "--resume", str(directory))
    assert result.exit_code == 1
    assert "truncated" in result.stderr or "checksum" in result.stderr


def test_skip_bad_samples_goes_on_and_reports(tmp_path: Path):
    from qformer_cli.data import sample_split_files

    entries = json.loads(sample_split_files("train").karpathy.read_text())[:40]
    root = sample_split_files("train").root
    for entry in entries:
        entry["image"] = str(root / entry["image"])
    entries[3]["image"] = str(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    entries[5]["image"] = str(tmp_path / "broken.png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps(entries))
    failed = _train(tmp_path / "a", "--max-steps", "1", "--data", str(data))
    assert failed.exit_code == 1 and "missing.png" in failed.stderr
    # 5 steps of 8 = the whole file once, so both bad entries are met
    result = _train(tmp_path / "b", "--max-steps", "5", "--data", str(data), "--skip-bad-samples")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bad_samples"] == 2
    assert summary["bad_sample_reasons"] == {"missing image": 1, "unreadable image": 1}
    skipped = json.loads((tmp_path / "b" / "skipped.json").read_text())
    assert sorted(Path(row["file"]).name for row in skipped) == ["broken.png", "missing.png"]


@pytest.mark.slow
def test_gradient_accumulation_contrasts_against_the_whole_batch(tmp_path: Path):
    # 2 micro-batches of 4 see the same 8 samples as one batch of 8 (same shuffled order);
    # with ITC features cached across micro-batches, step 1's ITC loss is the 8-sample one.
    no_dropout = ["--max-steps", "1", "--set", "model.qformer.attention_dropout=0.0"]
    whole = _train(tmp_path / "whole", *no_dropout)
    assert whole.exit_code == 0, whole.output
    accumulated = _train(
        tmp_path / "accumulated", *no_dropout, "--batch-size", "4", "--set", "train.grad_accum=2"
    )
    assert accumulated.exit_code == 0, accumulated.output
    rows = [metrics_rows(tmp_path / run)[0] for run in ("whole", "accumulated")]
    assert rows[1]["itc"] == pytest.approx(rows[0]["itc"], rel=1e-5)
    # ITM mines its negatives within each micro-batch of 4, so it may differ. ITG divides each
    # micro-batch's token losses by the whole step's target tokens: the same sum, in another
    # order (measured: 7e-8 relative, float32 rounding; the bound leaves ~10x).
    assert rows[1]["itg"] == pytest.approx(rows[0]["itg"], rel=1e-6)
