"""A checkpoint's metadata (``checkpoint.CheckpointMeta``, its ``config.json``) and a run's
resolved config (``run_config.json``; ``config.json`` in runs written before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qformer_cli import checkpoint
from qformer_cli.checkpoint import CheckpointMeta
from qformer_cli.cli import app
from qformer_cli.config import load_config
from qformer_cli.errors import CheckpointError
from qformer_cli.models.config import qformer_preset
from tests.tiny_runs import train_stage1

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# A stage-2 checkpoint's config.json as the code before CheckpointMeta wrote it (pretrain-stage2
# --init <stage-1 run> --max-steps 2 --set model.qformer.num_layers=2, on the embedded default).
WRITTEN_BEFORE = ROOT / "tests/fixtures/checkpoint_config_stage2.json"


def test_metadata_written_before_reads_and_writes_back_byte_for_byte(tmp_path: Path):
    text = WRITTEN_BEFORE.read_text()
    meta = CheckpointMeta.from_dict(json.loads(text), WRITTEN_BEFORE)
    assert (meta.stage, meta.step, meta.llm_family) == (2, 2, "decoder-only")
    assert meta.qformer.num_layers == 2 and meta.run["model"]["qformer"] == {"num_layers": 2}
    directory = checkpoint.save_checkpoint(tmp_path, meta.step, {}, meta)
    assert (directory / checkpoint.CONFIG).read_text() == text
    assert checkpoint.load_meta(directory) == meta


def test_stage1_metadata_round_trips_without_the_llm_entries():
    meta = CheckpointMeta(1, qformer_preset("tiny"), run=load_config().to_dict()).at_step(7)
    written = json.loads(json.dumps(meta.to_dict()))
    assert list(written) == ["stage", "qformer", "run", "step"]
    assert CheckpointMeta.from_dict(written, Path("config.json")) == meta


MISSING = object()


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("step", MISSING, "no 'step' entry"),
        ("llm_embedding_dim", MISSING, "no 'llm_embedding_dim' entry"),
        ("stage", 3, "'stage' must be 1 or 2, got 3"),
        ("stage", "2", "'stage' must be int, got '2'"),
        ("run", None, "'run' must be dict, got None"),
        ("qformer", {"hidden_sizes": 8}, "'qformer' is not a Q-Former config"),
        ("qformer", {"hidden_size": 130}, "'qformer' is not a Q-Former config"),
    ],
)
def test_a_bad_entry_is_a_checkpoint_error_naming_the_file(key: str, value: object, problem: str):
    data = json.loads(WRITTEN_BEFORE.read_text())
    if value is MISSING:
        del data[key]
    else:
        data[key] = value
    with pytest.raises(CheckpointError) as refused:
        CheckpointMeta.from_dict(data, WRITTEN_BEFORE)
    assert str(refused.value).startswith(f"{WRITTEN_BEFORE}: {problem}")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("stage1") / "run"
    result = train_stage1(run, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    return run


def test_a_checkpoint_missing_an_entry_is_refused_by_the_commands(stage1_run: Path, tmp_path: Path):
    final = checkpoint.list_checkpoints(stage1_run)[-1]
    broken = tmp_path / "broken"
    checkpoint.save_checkpoint(
        broken, 2, checkpoint.load_weights(final), checkpoint.load_meta(final)
    )
    directory = checkpoint.list_checkpoints(broken)[-1]
    recorded = checkpoint.load_config(directory)
    del recorded["step"]
    (directory / checkpoint.CONFIG).write_text(json.dumps(recorded))
    checkpoint.write_manifest(directory)  # complete and intact: only the entry is missing
    result = runner.invoke(
        app, ["convert", str(tmp_path / "s1.pth"), "--model", str(broken), "--to", "lavis"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {directory / checkpoint.CONFIG}: no 'step' entry "
        "(not a checkpoint of this package?)"
    ]


def test_a_run_writes_its_config_under_its_own_name(stage1_run: Path):
    assert not (stage1_run / "config.json").exists()
    recorded = json.loads((stage1_run / "run_config.json").read_text())
    final = checkpoint.list_checkpoints(stage1_run)[-1]
    assert checkpoint.load_meta(final).run == recorded
    # the run config is a --config file
    assert load_config(stage1_run / "run_config.json").to_dict() == recorded


def test_a_run_written_before_with_config_json_still_loads(stage1_run: Path, tmp_path: Path):
    old = tmp_path / "old"
    shutil.copytree(stage1_run, old)
    (old / "run_config.json").rename(old / "config.json")  # the name before run_config.json
    # --config with the old name
    recorded = json.loads((old / "config.json").read_text())
    assert load_config(old / "config.json").to_dict() == recorded
    # --model on the run directory
    converted = runner.invoke(
        app, ["convert", str(tmp_path / "s1.pth"), "--model", str(old), "--to", "lavis"]
    )
    assert converted.exit_code == 0, converted.output
    # --resume auto continues it
    resumed = train_stage1(old, "--max-steps", "3", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert [p.name for p in checkpoint.list_checkpoints(old)][-1] == "step-00000003"


def test_overwrite_removes_the_run_config_of_a_run_written_before(stage1_run: Path, tmp_path: Path):
    old = tmp_path / "old"
    shutil.copytree(stage1_run, old)
    (old / "run_config.json").rename(old / "config.json")
    result = train_stage1(old, "--max-steps", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (old / "config.json").exists()  # no stale config beside the new run's
    assert json.loads((old / "run_config.json").read_text())["train"]["max_steps"] == 1
