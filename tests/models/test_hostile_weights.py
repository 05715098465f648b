"""Every place the toolkit reads a pickled weight file refuses code and never runs it.

The places: ``pretrain-stage2 --init FILE`` and ``model.bert`` (LAVIS / BERT ``.pth``/``.bin``
through ``models/convert.read_torch_weights``), and ``--resume`` (a checkpoint's
``train_state.pt`` through ``checkpoint.load_train_state``). Both use
``torch.load(weights_only=True)``; everything else is safetensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qformer_cli import checkpoint
from qformer_cli.cli import app
from tests.hostile import write_payload
from tests.tiny_runs import FAST, runner, train_stage1


def error_line(result) -> str:
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output
    return line


@pytest.mark.parametrize("torch_zip", [True, False])
@pytest.mark.parametrize("where", ["--init", "model.bert"])
def test_stage2_weight_files_with_code_are_refused(tmp_path: Path, where: str, torch_zip: bool):
    marker = tmp_path / "pwned"
    evil = write_payload(tmp_path / "evil.pth", marker, torch_zip=torch_zip)
    source = ["--init", str(evil)] if where == "--init" else ["--set", f"model.bert={evil}"]
    result = runner.invoke(
        app, ["pretrain-stage2", "--out", str(tmp_path / "run"), "--max-steps", "1", *FAST, *source]
    )
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith(f"error: {evil}: refused to load (only plain tensors are accepted")
    assert not marker.exists()


@pytest.mark.slow
def test_a_train_state_with_code_is_refused_on_resume(tmp_path: Path):
    run = tmp_path / "run"
    assert train_stage1(run, "--max-steps", "1").exit_code == 0
    [saved] = checkpoint.list_checkpoints(run)
    marker = tmp_path / "pwned"
    write_payload(saved / checkpoint.TRAIN_STATE, marker)
    checkpoint.write_manifest(saved)  # a consistent manifest: only the pickle guard is left
    result = train_stage1(run, "--max-steps", "2", "--resume", str(saved))
    assert result.exit_code == 1
    assert error_line(result).startswith(f"error: {saved / checkpoint.TRAIN_STATE}: unreadable (")
    assert not marker.exists()
