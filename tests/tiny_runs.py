"""Few-step stage-1 runs on the embedded default, shared by the training and fault tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import Result
from safetensors.torch import load_file
from typer.testing import CliRunner

from qformer_cli import checkpoint
from qformer_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# The shared trained runs (conftest: trained_stage1, trained_stage2)
TRAINED_STAGE1_STEPS = 40
# 60: after 30 steps through the slot-trained OPT (2026-12-01) every val image got the same
# caption (1 distinct in 300; 60 steps: 17), and tests comparing images or backends need captions
# that depend on the image.
TRAINED_STAGE2_STEPS = 60
SMALL_RUN = ("--batch-size", "16", "--set", "train.log_every=1")
# A small, fast run: 2 layers, batch 8, no dropout (so that runs are comparable step by step).
FAST = [
    "--batch-size", "8",
    "--set", "model.qformer.num_layers=2",
    "--set", "model.qformer.hidden_dropout=0.0",
    "--set", "train.log_every=1",
    "--set", "train.warmup_steps=2",
    "--set", "train.lr=1e-3",
    "--set", "train.deterministic=true",
]  # fmt: skip


def train_stage1(out: Path, *extra: str, env: dict | None = None) -> Result:
    """`qformer pretrain-stage1 --json` in this process."""
    return runner.invoke(
        app, ["pretrain-stage1", "--out", str(out), "--json", *FAST, *extra], env=env
    )


def stage1_command(out: Path, *extra: str) -> list[str]:
    """The same run as a command line for a real process (signals, os._exit)."""
    return [
        sys.executable,
        "-m",
        "qformer_cli",
        "pretrain-stage1",
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout's code first on the path, plus ``extra`` variables."""
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def run_stage1_process(out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        stage1_command(out, *extra),
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_weights(result: Result) -> dict[str, torch.Tensor]:
    final = Path(json.loads(result.stdout)["final_checkpoint"])
    return load_file(str(final / checkpoint.WEIGHTS))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


def assert_weights_moved(run: Path) -> None:
    """The run's newest checkpoint differs from its oldest in nearly every tensor.

    Guards the "same weights as another run" tests: two runs whose optimizer never updates agree
    too. (Attention key biases get an exactly-zero gradient, and a few other tensors may get
    none in a short run, hence "nearly".)"""
    saved = checkpoint.list_checkpoints(run)
    assert len(saved) >= 2, f"{run}: needs two checkpoints to compare, has {len(saved)}"
    oldest = load_file(str(saved[0] / checkpoint.WEIGHTS))
    newest = load_file(str(saved[-1] / checkpoint.WEIGHTS))
    assert oldest.keys() == newest.keys()
    moved = [key for key in oldest if not oldest[key].equal(newest[key])]
    assert len(moved) > 0.9 * len(oldest), f"only {len(moved)} of {len(oldest)} tensors moved"


def invoke_json(*args: str) -> dict:
    """``qformer ARGS --json`` in-process, which must exit 0; its JSON summary."""
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def first_and_last_means(rows: list[dict], key: str, count: int) -> tuple[float, float]:
    """The mean of ``key`` over the first ``count`` and over the last ``count`` metrics rows."""
    values = [row[key] for row in rows]
    return sum(values[:count]) / count, sum(values[-count:]) / count


def metrics_rows(run: Path) -> list[dict]:
    """Every row of a run's ``metrics.jsonl``; each line must parse."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def metrics_steps(run: Path) -> list[int]:
    """The step of every metrics row."""
    return [row["step"] for row in metrics_rows(run)]


def ids_by_step(run: Path) -> dict[int, list[str]]:
    """The samples of each step (``train.log_sample_ids``, rank 0); a step trained again after
    a resume counts as its last run."""
    steps: dict[int, list[str]] = {}
    for line in (run / "sample_ids.rank0.txt").read_text().splitlines():
        step, *ids = line.split()
        steps[int(step)] = ids
    return steps
