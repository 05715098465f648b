"""`--out` holding an earlier run: refused, or with `--overwrite` cleared first, never mixed.

A new run written over an old one used to keep the old run's later checkpoints, so that
`eval-retrieval --model RUN` evaluated the old model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qformer_cli import checkpoint
from qformer_cli.cli import app
from qformer_cli.models.config import QFormerConfig
from qformer_cli.train import stage1, stage2
from tests.tiny_runs import metrics_steps, runner, train_stage1
from tests.train.test_distributed import torchrun


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _earlier_run(run: Path, step: int = 5) -> None:
    """What an earlier run leaves in its --out, and a file of the user's beside it."""
    meta = checkpoint.CheckpointMeta(stage=1, qformer=QFormerConfig(), run={})
    saved = checkpoint.save_checkpoint(run, step, {}, meta, {"step": step})
    (run / "metrics.jsonl").write_text(json.dumps({"step": step, "loss": 1.0}) + "\n")
    (run / "run_config.json").write_text("{}")
    (run / "config.json").write_text("{}")  # the run config's name before run_config.json
    (run / "notes.txt").write_text("mine")
    assert saved.is_dir()


@pytest.mark.parametrize("command", ["pretrain-stage1", "pretrain-stage2"])
def test_an_out_dir_holding_a_run_is_refused(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch
):
    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the recipe (and its backbones) was built before the refusal")

    monkeypatch.setattr(stage1, "build_stage1_recipe", must_not_load)
    monkeypatch.setattr(stage2, "build_stage2_recipe", must_not_load)
    run = tmp_path / "run"
    _earlier_run(run)
    before = sorted(run.rglob("*"))
    result = runner.invoke(app, [command, "--out", str(run), "--max-steps", "1"])
    assert result.exit_code == 2
    line = _error_line(result)
    assert line.startswith(f"error: {run}: holds an earlier run (")
    assert "checkpoints/step-00000005" in line and "metrics.jsonl" in line
    assert "--resume auto" in line and "--overwrite" in line
    assert sorted(run.rglob("*")) == before  # nothing touched


def test_overwrite_and_resume_together_are_refused(tmp_path: Path):
    result = runner.invoke(
        app, ["pretrain-stage1", "--out", str(tmp_path), "--overwrite", "--resume", "auto"]
    )
    assert result.exit_code == 2
    assert "--overwrite starts afresh and --resume continues a run" in _error_line(result)


@pytest.mark.slow  # three short runs and an evaluation
def test_overwrite_replaces_the_run_that_eval_then_reads(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    first = train_stage1(run, "--max-steps", "3")
    assert first.exit_code == 0, first.output
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000003"]

    again = train_stage1(run, "--max-steps", "1", "--seed", "7")
    assert again.exit_code == 2 and "holds an earlier run" in _error_line(again)
    assert metrics_steps(run) == [1, 2, 3]  # the refused run changed nothing

    second = train_stage1(run, "--max-steps", "1", "--seed", "7", "--overwrite")
    assert second.exit_code == 0, second.output
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000001"]
    assert metrics_steps(run) == [1]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are removed

    # eval reads the newest checkpoint of the run: the second run's, not the first's step 3
    evaluate = ["eval-retrieval", "--model", str(run), "--k", "4", "--out", str(tmp_path / "e")]
    evaluated = runner.invoke(app, [*evaluate, "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    second_checkpoint = json.loads(second.stdout)["final_checkpoint"]
    assert json.loads(evaluated.stdout)["checkpoint"] == second_checkpoint


def test_resume_auto_continues_an_existing_run_without_overwrite(tmp_path: Path):
    run = tmp_path / "run"
    assert train_stage1(run, "--max-steps", "2").exit_code == 0
    resumed = train_stage1(run, "--max-steps", "3", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert metrics_steps(run) == [1, 2, 3]


def test_extract_features_refuses_an_earlier_cache_unless_overwrite(tmp_path: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("index.json", "shard-00000.safetensors", "shard-00001.safetensors"):
        (cache / name).write_text("old")
    (cache / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["extract-features", "--out", str(cache)])
    assert result.exit_code == 2
    line = _error_line(result)
    assert line.startswith(f"error: {cache}: holds an earlier feature cache (index.json, ")
    assert "--overwrite" in line
    assert (cache / "shard-00001.safetensors").read_text() == "old"


@pytest.mark.slow
def test_overwrite_under_torchrun_clears_once_then_trains(tmp_path: Path):
    # Rank 0 removes the earlier run while rank 1 waits; both then train and write the new run.
    run = tmp_path / "run"
    _earlier_run(run)
    args = ["pretrain-stage2", "--out", str(run), "--overwrite", "--max-steps", "1"]
    torchrun("-m", "qformer_cli", *args, "--batch-size", "4")
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000001"]
    assert metrics_steps(run) == [1]
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "arguments",
    [
        ["pretrain-stage1", "--set", "train.lr=abc"],  # refused while reading the config
        ["pretrain-stage1", "--data", "missing.json", "--max-steps", "1"],  # refused in preflight
        ["eval-vqa", "--predictions", "missing.json"],  # refused while scoring
    ],
    ids=["bad-setting", "missing-training-data", "missing-predictions"],
)
def test_a_refused_command_leaves_no_default_out_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arguments: list[str]
):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, arguments)
    assert result.exit_code in (1, 2)
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.output
    assert sorted(tmp_path.iterdir()) == []  # no runs/<command>-<time>, no runs/


def test_a_refused_command_removes_only_the_out_dirs_it_created(tmp_path: Path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for out in (tmp_path / "new" / "run", mine):
        arguments = ["--data", str(tmp_path / "missing.json"), "--out", str(out)]
        result = runner.invoke(app, ["pretrain-stage1", *arguments, "--max-steps", "1"])
        assert result.exit_code == 2
        assert result.stderr.strip().endswith("missing.json: no such file"), result.output
    assert sorted(tmp_path.iterdir()) == [mine]  # new/run and new removed; the user's kept
    assert list(mine.iterdir()) == []  # and nothing (run_config.json) written into it
