"""Runs refused before any backbone loads: exit 2, one line on stderr, the recipe never built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qformer_cli import checkpoint
from qformer_cli.cli import app
from qformer_cli.config import load_config
from qformer_cli.models.backbones import load_qformer_tokenizer, resolve_model_name
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.config import QFormerConfig
from qformer_cli.train import preflight, stage1, stage2
from qformer_cli.train.common import fitted_qformer_config
from tests.tiny_runs import FAST, ROOT, runner

TINY_VISION_WIDTH = json.loads((ROOT / "sample_data/backbones/vision/config.json").read_text())[
    "hidden_size"
]


@pytest.fixture(autouse=True)
def recipes_must_not_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a recipe loads the backbones: every refusal here must come before it."""

    def loaded_backbones(*_args, **_kwargs):
        raise AssertionError("the recipe (and its backbones) was built before the refusal")

    monkeypatch.setattr(stage1, "build_stage1_recipe", loaded_backbones)
    monkeypatch.setattr(stage2, "build_stage2_recipe", loaded_backbones)


def refused(command: str, *args: str) -> str:
    """Run ``command``; assert exit 2 with one line on stderr; return that line."""
    result = runner.invoke(app, [command, *FAST, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def fake_checkpoint(
    run: Path, stage: int, vocab_size: int = 202, llm_embedding_dim: int = 64
) -> Path:
    """A complete checkpoint directory whose config says ``stage`` (weights are not needed)."""
    llm = {"llm_family": "decoder-only", "llm_embedding_dim": llm_embedding_dim}
    meta = checkpoint.CheckpointMeta(
        stage, QFormerConfig(vocab_size=vocab_size), run={}, **(llm if stage == 2 else {})
    )
    return checkpoint.save_checkpoint(run, 2, {}, meta, {"step": 2})


def test_unwritable_output_directory(tmp_path: Path):
    (tmp_path / "a_file").write_text("")
    line = refused("pretrain-stage1", "--out", str(tmp_path / "a_file" / "run"))
    assert f"{tmp_path / 'a_file' / 'run'}: output directory is not writable" in line


@pytest.mark.parametrize("command", ["pretrain-stage1", "pretrain-stage2"])
def test_missing_backbone(tmp_path: Path, command: str):
    line = refused(command, "--out", str(tmp_path / "run"), "--vision-model", "/nowhere/vit")
    assert line == "error: /nowhere/vit: backbone directory not found"


def test_missing_llm_for_stage2(tmp_path: Path):
    line = refused("pretrain-stage2", "--out", str(tmp_path / "run"), "--llm", "/nowhere/opt")
    assert line == "error: /nowhere/opt: backbone directory not found"


@pytest.mark.parametrize("command", ["pretrain-stage1", "pretrain-stage2"])
def test_an_image_size_the_vision_tower_cannot_take(tmp_path: Path, command: str):
    """The sample ViT's position embeddings are for 64 px: 96 px would give 145 tokens where it
    has 65 places, a RuntimeError deep in the first step."""
    out = tmp_path / "run"
    line = refused(command, "--out", str(out), "--set", "data.image_size=96")
    assert line.startswith("error: data.image_size 96: sample_data/backbones/vision takes 64 px")
    assert "--set data.image_size=64" in line and not out.exists()


@pytest.mark.parametrize(
    ("command", "other_stage"), [("pretrain-stage1", 2), ("pretrain-stage2", 1)]
)
def test_checkpoint_of_the_other_stage(tmp_path: Path, command: str, other_stage: int):
    directory = fake_checkpoint(tmp_path / "other", other_stage)
    line = refused(command, "--out", str(tmp_path / "run"), "--resume", str(directory))
    stage = 3 - other_stage
    assert (
        line
        == f"error: {directory}: a stage-{other_stage} checkpoint; {command} resumes stage {stage}"
    )
    # --resume auto on the other stage's run finds the same checkpoint and refuses it too
    line = refused(command, "--out", str(tmp_path / "other"), "--resume", "auto")
    assert f"a stage-{other_stage} checkpoint" in line


def test_config_written_by_the_other_stage(tmp_path: Path):
    directory = fake_checkpoint(tmp_path / "other", 2)
    line = refused("pretrain-stage1", "--config", str(directory / checkpoint.CONFIG))
    assert line == (
        f"error: {directory / checkpoint.CONFIG}: the config of a stage-2 checkpoint, not a run "
        "config (continue that run with --resume DIR, or start from it with pretrain-stage2 --init)"
    )


def test_tokenizer_that_does_not_match_the_checkpoint(tmp_path: Path):
    bert = load_config(None, []).model.bert
    vocab = len(load_qformer_tokenizer(resolve_model_name(bert)))
    directory = fake_checkpoint(tmp_path / "old", 1, vocab_size=vocab + 7)
    line = refused("pretrain-stage1", "--out", str(tmp_path / "run"), "--resume", str(directory))
    assert line == (
        f"error: {directory}: trained with a {vocab + 7}-token vocabulary, but the tokenizer "
        f"of model.bert ({bert}) has {vocab} tokens"
    )


def test_llm_that_does_not_match_a_stage2_checkpoint(tmp_path: Path):
    llm = load_config(None, []).model.llm.model
    directory = fake_checkpoint(tmp_path / "old", 2, llm_embedding_dim=2560)  # an OPT-2.7B run
    line = refused("pretrain-stage2", "--out", str(tmp_path / "run"), "--resume", str(directory))
    assert line == (
        f"error: {directory}: trained for an LLM with 2560-wide token embeddings, but "
        f"model.llm ({llm}) has 128"  # the shipped tiny OPT
    )


def test_too_little_disk_for_one_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda _directory: 1_000_000)
    line = refused("pretrain-stage1", "--out", str(tmp_path / "run"))
    needed = preflight.trainable_parameters(1, load_config(None, ["model.qformer.num_layers=2"]))
    assert line.startswith(f"error: {tmp_path / 'run'}: 1.0 MB free, but one checkpoint needs")
    assert f"about {needed * 12 / 1e6:.1f} MB" in line


def test_checkpoint_size_estimate_counts_the_stage1_model():
    config = load_config(None, [])
    tokenizer = load_qformer_tokenizer(resolve_model_name(config.model.bert))
    model = Stage1Model(fitted_qformer_config(config, TINY_VISION_WIDTH, tokenizer))
    assert preflight.trainable_parameters(1, config) == sum(p.numel() for p in model.parameters())


def test_enough_disk_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = load_config(None, [])
    needed = preflight.trainable_parameters(1, config) * preflight.CHECKPOINT_BYTES_PER_TRAINABLE
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda _directory: needed)
    preflight.check_before_loading(1, "pretrain-stage1", config, tmp_path, None)
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda _directory: needed - 1)
    with pytest.raises(preflight.UsageError):
        preflight.check_before_loading(1, "pretrain-stage1", config, tmp_path, None)
