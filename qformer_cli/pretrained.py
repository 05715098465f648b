"""Loading trained models for inference (caption, eval, export): never imports the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qformer_cli import checkpoint
from qformer_cli.config import QFormerConfig, RunConfig, from_dict
from qformer_cli.errors import CheckpointError
from qformer_cli.models.blip2 import Stage1Model


@dataclass
class Stage1Checkpoint:
    model: Stage1Model
    tokenizer: PreTrainedTokenizerBase
    run_config: RunConfig
    directory: Path


def _checkpoint_config(directory: Path, stage: int) -> tuple[QFormerConfig, RunConfig]:
    saved = checkpoint.load_config(directory)
    if saved.get("stage") != stage:
        found = saved.get("stage")
        raise CheckpointError(f"{directory}: a stage-{found} checkpoint; this needs stage {stage}")
    return QFormerConfig(**saved["qformer"]), from_dict(RunConfig, saved["run"])


def _load_state(model: torch.nn.Module, directory: Path) -> None:
    result = model.load_state_dict(checkpoint.load_weights(directory), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: weights do not fit the model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )


def load_stage1(path: Path, device: torch.device) -> Stage1Checkpoint:
    """A stage-1 model from a run or checkpoint directory, in eval mode on ``device``."""
    directory = checkpoint.resolve_checkpoint(path)
    qformer_config, run_config = _checkpoint_config(directory, stage=1)
    model = Stage1Model(qformer_config)
    _load_state(model, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    return Stage1Checkpoint(model.to(device).eval(), tokenizer, run_config, directory)
