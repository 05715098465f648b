"""`--compile`: the training step under torch.compile computes what the eager step computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch._dynamo
from typer.testing import CliRunner

from qformer_cli.cli import app
from tests.tiny_runs import metrics_rows

runner = CliRunner()
FAST = [
    "--batch-size", "8",
    "--max-steps", "2",
    "--set", "model.qformer.num_layers=2",
    "--set", "model.qformer.hidden_dropout=0.0",
    "--set", "model.qformer.attention_dropout=0.0",
    "--set", "train.log_every=1",
]  # fmt: skip


def _losses(out: Path) -> list[dict[str, float]]:
    rows = metrics_rows(out)
    return [{key: row[key] for key in ("itc", "itm", "itg")} for row in rows]


@pytest.mark.slow
def test_compiled_stage1_steps_match_eager_steps(tmp_path: Path) -> None:
    eager = runner.invoke(app, ["pretrain-stage1", "--out", str(tmp_path / "eager"), *FAST])
    assert eager.exit_code == 0, eager.output
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = runner.invoke(
        app, ["pretrain-stage1", "--out", str(tmp_path / "compiled"), "--compile", *FAST]
    )
    assert compiled.exit_code == 0, compiled.output
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    for eager_row, compiled_row in zip(
        _losses(tmp_path / "eager"), _losses(tmp_path / "compiled"), strict=True
    ):
        for key, value in eager_row.items():
            # fused kernels round differently; the math is the same
            assert compiled_row[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    torch._dynamo.reset()
