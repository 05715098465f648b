"""Stage 2 with the frozen LLM sharded (FSDP2) or checkpointed: the same training, less memory.

Sharding must not change the math: `pretrain-stage2 --fsdp` under torchrun with 2 CPU processes
(gloo) logs the same losses and ends with the same bridge weights as the same 2-process run with
the LLM replicated. Activation checkpointing recomputes instead of storing: same losses, same
weights, in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qformer_cli.cli import app
from tests.test_distributed import torchrun
from tests.tiny_runs import metrics_rows

runner = CliRunner()
FAST = [
    "--max-steps", "3",
    "--batch-size", "8",
    "--set", "train.log_every=1",
    "--set", "train.warmup_steps=1",
    "--set", "train.deterministic=true",
]  # fmt: skip


def _losses(run: Path) -> list[float]:
    return [row["lm"] for row in metrics_rows(run)]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(str(final / "model.safetensors"))


def _torchrun_stage2(out: Path, *extra: str) -> str:
    """`pretrain-stage2` under torchrun with 2 CPU processes; returns what it logged."""
    args = ["-m", "qformer_cli", "pretrain-stage2", "--out", str(out), *FAST, *extra]
    return torchrun(*args).stderr


def _assert_same_training(run: Path, reference: Path) -> None:
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-5)
    weights, expected = _final_weights(run), _final_weights(reference)
    assert weights.keys() == expected.keys()
    assert not any(key.startswith("prompted_lm") for key in weights)  # the LLM is not saved
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_fsdp_sharded_llm_trains_exactly_like_a_replicated_one(tmp_path: Path) -> None:
    log = _torchrun_stage2(tmp_path / "fsdp", "--fsdp")
    assert "LLM sharded with FSDP2 over 2 processes (3 blocks + the rest)" in log
    _torchrun_stage2(tmp_path / "ddp")
    _assert_same_training(tmp_path / "fsdp", tmp_path / "ddp")


@pytest.mark.slow
def test_activation_checkpointing_changes_memory_not_results(tmp_path: Path) -> None:
    plain = runner.invoke(app, ["pretrain-stage2", "--out", str(tmp_path / "plain"), *FAST])
    assert plain.exit_code == 0, plain.output
    checkpointed = runner.invoke(
        app,
        ["pretrain-stage2", "--out", str(tmp_path / "ac"), "--activation-checkpointing", *FAST],
    )
    assert checkpointed.exit_code == 0, checkpointed.output
    assert "activation checkpointing on 3 LLM blocks" in checkpointed.output
    _assert_same_training(tmp_path / "ac", tmp_path / "plain")


def test_fsdp_without_torchrun_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain-stage2", "--out", str(tmp_path / "run"), "--fsdp"])
    assert result.exit_code == 2
    assert "--fsdp needs several processes: launch with torchrun" in result.output
