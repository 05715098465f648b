"""Stage 2 with the frozen LLM sharded (FSDP2) or checkpointed: the same training, less memory.

Sharding must not change the math: `pretrain-stage2 --fsdp` under torchrun with 2 CPU processes
(gloo) logs the same losses and ends with the same bridge weights as the same 2-process run with
the LLM replicated, and every LLM parameter is a DTensor of which each rank holds half the rows
(reported from inside the run by tests/fsdp_probe.py). Activation checkpointing recomputes instead
of storing: each LLM block's forward runs twice a step instead of once (counted with a global
forward pre-hook), with the same losses and weights, in one process.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.opt.modeling_opt import OPTDecoderLayer
from typer.testing import CliRunner

from qformer_cli.cli import app
from tests.tiny_runs import metrics_rows
from tests.train.test_distributed import REPO_ROOT, torchrun

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


PROBE = REPO_ROOT / "tests" / "fsdp_probe.py"
LLM_BLOCKS = 3  # sample_data/backbones/opt: 3 OPTDecoderLayer blocks


def _torchrun_stage2(out: Path, *extra: str, probe_dir: Path | None = None) -> str:
    """`pretrain-stage2` under torchrun with 2 CPU processes; returns what it logged. With
    ``probe_dir``, each rank reports its sharded LLM parameters there (tests/fsdp_probe.py)."""
    command = ["pretrain-stage2", "--out", str(out), *FAST, *extra]
    launch = [str(PROBE), str(probe_dir)] if probe_dir else ["-m", "qformer_cli"]
    return torchrun(*launch, *command).stderr


def _assert_sharded_in_halves(probe_dir: Path) -> None:
    """Every LLM parameter is a DTensor sharded on dim 0; each of the 2 ranks holds its half of
    the rows (torch.chunk's split: the first rank the larger half), the halves add up."""
    reports = [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["world_size"] for report in reports] == [2, 2]
    parameters = reports[0]["parameters"]
    assert parameters.keys() == reports[1]["parameters"].keys()
    assert sum(".layers." in name for name in parameters) >= LLM_BLOCKS  # the blocks are in it
    for name, first in parameters.items():
        second = reports[1]["parameters"][name]
        assert first["dtensor"] and second["dtensor"], name
        assert first["placements"] == second["placements"] == ["Shard(dim=0)"], name
        rows, *rest = first["global_shape"]
        assert first["local_shape"] == [(rows + 1) // 2, *rest], name
        assert second["local_shape"] == [rows // 2, *rest], name


def _assert_same_training(run: Path, reference: Path) -> None:
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-5)
    weights, expected = _final_weights(run), _final_weights(reference)
    assert weights.keys() == expected.keys()
    assert not any(key.startswith("prompted_lm") for key in weights)  # the LLM is not saved
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_fsdp_sharded_llm_trains_exactly_like_a_replicated_one(tmp_path: Path) -> None:
    log = _torchrun_stage2(tmp_path / "fsdp", "--fsdp", probe_dir=tmp_path)
    assert "LLM sharded with FSDP2 over 2 processes (3 blocks + the rest)" in log
    _assert_sharded_in_halves(tmp_path)
    _torchrun_stage2(tmp_path / "ddp")
    _assert_same_training(tmp_path / "fsdp", tmp_path / "ddp")


def _stage2_counting_block_forwards(out: Path, *extra: str) -> Counter:
    """`pretrain-stage2` in this process; how many times each LLM block's forward ran."""
    calls: Counter = Counter()

    def count(module: torch.nn.Module, _args: object) -> None:
        if isinstance(module, OPTDecoderLayer):
            calls[id(module)] += 1

    # A pre-hook: a recomputation stops as soon as backward has what it needs (torch's
    # non-reentrant checkpoint stops early), so the block's forward may never return there.
    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        result = runner.invoke(app, ["pretrain-stage2", "--out", str(out), *FAST, *extra])
    finally:
        hook.remove()
    assert result.exit_code == 0, result.output
    return calls


@pytest.mark.slow
def test_activation_checkpointing_changes_memory_not_results(tmp_path: Path) -> None:
    """Each block's forward runs once a step, and once more in backward when checkpointed."""
    steps = int(FAST[FAST.index("--max-steps") + 1])
    plain = _stage2_counting_block_forwards(tmp_path / "plain")
    assert sorted(plain.values()) == [steps] * LLM_BLOCKS
    checkpointed = _stage2_counting_block_forwards(tmp_path / "ac", "--activation-checkpointing")
    assert sorted(checkpointed.values()) == [2 * steps] * LLM_BLOCKS
    _assert_same_training(tmp_path / "ac", tmp_path / "plain")


def test_fsdp_without_torchrun_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain-stage2", "--out", str(tmp_path / "run"), "--fsdp"])
    assert result.exit_code == 2
    assert "--fsdp needs several processes: launch with torchrun" in result.output
