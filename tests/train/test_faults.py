"""Crash consistency and preemption: real processes killed at chosen points, then resumed.

Every crash test runs the same 6-step tiny stage-1 run (checkpoints every 2 steps), kills it
with ``QFORMER_FAULT`` (``os._exit``: no cleanup, like a node dying), checks what is on disk,
resumes with ``--resume auto`` and compares the final weights with an uninterrupted run's.
Preemption: SIGTERM / SIGINT to the process, and SIGTERM to one of 2 torchrun ranks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file

from qformer_cli import checkpoint, faults
from tests.tiny_runs import (
    FAST,
    assert_same_weights,
    assert_weights_moved,
    final_weights,
    metrics_rows,
    metrics_steps,
    run_stage1_process,
    stage1_command,
    subprocess_env,
    train_stage1,
)
from tests.train.test_distributed import REPO_ROOT, step_env, torchrun, torchrun_command

pytestmark = pytest.mark.slow
STEPS = ["--max-steps", "6", "--set", "train.save_every=2", "--set", "train.keep_last=3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted 6-step run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = train_stage1(run, *STEPS)
    assert result.exit_code == 0, result.output
    assert_weights_moved(run)  # step 2 -> step 6: the runs compared with it really train
    return final_weights(result)


def crash(run: Path, fault: str) -> subprocess.CompletedProcess:
    died = run_stage1_process(run, *STEPS, **{faults.FAULT_ENV: fault})
    assert died.returncode == faults.FAULT_EXIT_CODE, died.stderr
    return died


def resume(run: Path) -> Result:
    result = train_stage1(run, *STEPS, "--resume", "auto")
    assert result.exit_code == 0, result.output
    return result


def checkpoint_steps(run: Path) -> list[str]:
    return [path.name for path in checkpoint.list_checkpoints(run)]


def test_crash_mid_step_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path: Path, straight):
    run = tmp_path / "run"
    crash(run, "mid_step:5")  # after step 5's backward, before its optimizer step
    assert checkpoint_steps(run) == ["step-00000002", "step-00000004"]
    checkpoint.verify_checkpoint(run / "checkpoints" / "step-00000004")
    resumed = resume(run)
    assert "resuming from" in resumed.stderr and "step-00000004" in resumed.stderr
    assert_same_weights(final_weights(resumed), straight)
    assert metrics_steps(run) == [1, 2, 3, 4, 5, 6]


def test_crash_before_the_rename_leaves_the_previous_checkpoint(tmp_path: Path, straight):
    run = tmp_path / "run"
    crash(run, "before_rename:4")
    # step 4 is complete in its temporary directory, but was never published
    temp = run / "checkpoints" / ".step-00000004.tmp"
    checkpoint.verify_checkpoint(temp)
    assert checkpoint_steps(run) == ["step-00000002"]
    checkpoint.verify_checkpoint(run / "checkpoints" / "step-00000002")
    resumed = resume(run)
    assert "step-00000002" in resumed.stderr
    assert_same_weights(final_weights(resumed), straight)
    assert not temp.exists()  # the redone step-4 save replaced it
    assert metrics_steps(run) == [1, 2, 3, 4, 5, 6]


def test_crash_mid_metrics_line_is_repaired_on_resume(tmp_path: Path, straight):
    run = tmp_path / "run"
    crash(run, "torn_metrics:5")
    text = (run / "metrics.jsonl").read_text()
    assert not text.endswith("\n")  # half of step 5's row
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[-1])
    resumed = resume(run)
    assert_same_weights(final_weights(resumed), straight)
    assert metrics_steps(run) == [1, 2, 3, 4, 5, 6]  # torn row dropped, no duplicates


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path: Path, straight, damage: str):
    run = tmp_path / "run"
    stopped = train_stage1(run, *STEPS, env={faults.STOP_AFTER_STEP_ENV: "4"})
    assert stopped.exit_code == 143, stopped.output
    weights = run / "checkpoints" / "step-00000004" / checkpoint.WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    expected = "truncated" if damage == "truncate" else "checksum mismatch"
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        checkpoint.verify_checkpoint(weights.parent)

    resumed = resume(run)
    skipped = [line for line in resumed.stderr.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and expected in skipped[0] and "step-00000004" in skipped[0]
    assert "resuming from" in resumed.stderr and "step-00000002" in resumed.stderr
    assert_same_weights(final_weights(resumed), straight)
    assert metrics_steps(run) == [1, 2, 3, 4, 5, 6]


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path: Path):
    run = tmp_path / "run"
    result = train_stage1(
        run, *STEPS, "--max-nonfinite-steps", "2", env={faults.FAULT_ENV: "nan_loss:3"}
    )
    assert result.exit_code == 1
    [message] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output
    last_good = run / "checkpoints" / "step-00000002"
    assert message.startswith("error: step 4: 2 non-finite steps in a row")
    assert f"last good checkpoint: {last_good}" in message
    rows = metrics_rows(run)
    assert [row["skipped_nonfinite"] for row in rows] == [0, 0, 1, 2]
    assert checkpoint_steps(run) == ["step-00000002"]


def test_an_isolated_nonfinite_step_is_skipped_and_counted(tmp_path: Path):
    # nan from step 6 on, with a budget of 2: step 6 is skipped, the run still finishes
    result = train_stage1(
        tmp_path / "run", *STEPS, "--max-nonfinite-steps", "2", env={faults.FAULT_ENV: "nan_loss:6"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["last"]["skipped_nonfinite"] == 1


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.parametrize(
    ("stop_signal", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_a_signal_writes_a_checkpoint_exits_128_plus_it_and_resume_auto_continues(
    tmp_path: Path, stop_signal: signal.Signals, exit_code: int
):
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) stop at the next step boundary."""
    run = tmp_path / "run"
    process = subprocess.Popen(
        stage1_command(run, "--max-steps", "200"),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(run, 2, process)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert not [line for line in stderr.splitlines() if line.startswith("error:")]  # a stop
    stop_lines = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stop_lines) == 1 and f"stopped: {stop_signal.name} at step" in stop_lines[0]
    assert f"--resume auto --out {run}" in stop_lines[0]
    [saved] = checkpoint.list_checkpoints(run)
    checkpoint.verify_checkpoint(saved)
    stopped_at = int(saved.name.split("-")[1])
    assert stopped_at >= 2 and metrics_steps(run) == list(range(1, stopped_at + 1))

    resumed = train_stage1(run, "--max-steps", str(stopped_at + 2), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["steps"] == stopped_at + 2
    assert metrics_steps(run) == list(range(1, stopped_at + 3))


# --------------------------------------------------------------------------------------------
# SIGTERM to one of 2 torchrun ranks

TORCHRUN_STEPS = 30  # long enough that the signal after step 2 lands well before the end


TORCHRUN_FAILED = 1  # torchrun's own exit code when a worker exits non-zero


def _stage1_args(run: Path, *extra: str) -> list[str]:
    """`pretrain-stage1`'s FAST run of TORCHRUN_STEPS steps, as torchrun's arguments."""
    return ["-m", "qformer_cli", "pretrain-stage1", "--out", str(run), *FAST,
            "--max-steps", str(TORCHRUN_STEPS), *extra]  # fmt: skip


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (a child with RANK=<rank>), via /proc."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"torchrun has no worker of rank {rank}")


def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_one_step(tmp_path: Path):
    """A scheduler that signals one process of a job: the stop flag is all-reduced at each step
    boundary, so both ranks stop after the same step, rank 0 writes one checkpoint of it, and
    `--resume auto` ends with the uninterrupted run's weights."""
    straight_run = tmp_path / "straight"
    torchrun(*_stage1_args(straight_run))
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        torchrun_command(*_stage1_args(run)), cwd=REPO_ROOT, env=step_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_step(run, 2, launcher)
        os.kill(_worker_pid(launcher, rank=1), signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)  # ranks that disagree hang in a collective
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # torchrun and its workers
    assert launcher.returncode == TORCHRUN_FAILED, stderr
    stops = re.findall(r"^stopped: SIGTERM at step (\d+); checkpoint (\S+);", stderr,
                       re.MULTILINE)  # fmt: skip
    assert len(stops) == 2 and stops[0] == stops[1], stderr  # both ranks: one step, one path
    stopped_at = int(stops[0][0])
    assert 2 <= stopped_at < TORCHRUN_STEPS
    [saved] = checkpoint.list_checkpoints(run)
    assert Path(stops[0][1]) == saved
    checkpoint.verify_checkpoint(saved)
    assert checkpoint.load_train_state(saved)["step"] == stopped_at
    assert metrics_steps(run) == list(range(1, stopped_at + 1))

    torchrun(*_stage1_args(run, "--resume", "auto"))
    assert metrics_steps(run) == list(range(1, TORCHRUN_STEPS + 1))
    resumed = load_file(str(checkpoint.list_checkpoints(run)[-1] / checkpoint.WEIGHTS))
    expected = load_file(str(checkpoint.list_checkpoints(straight_run)[-1] / checkpoint.WEIGHTS))
    assert_same_weights(resumed, expected)


def test_a_run_whose_only_checkpoint_is_truncated_says_why(tmp_path: Path) -> None:
    """`--model RUN` when RUN's one checkpoint lost bytes: the message names the file."""
    from qformer_cli.cli import app
    from tests.tiny_runs import runner

    run = tmp_path / "run"
    assert train_stage1(run, "--max-steps", "1").exit_code == 0
    [saved] = checkpoint.list_checkpoints(run)
    weights = saved / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    result = runner.invoke(app, ["eval-retrieval", "--model", str(run)])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert "no complete checkpoint (1 broken; the newest:" in line and "truncated" in line
    assert str(weights) in line
