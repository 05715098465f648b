"""The Q-Former's sizes fitted to its backbones: ``QFormerConfig.fitted_to_backbones``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoConfig
from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.config import load_config
from qformer_cli.errors import UsageError
from qformer_cli.models.backbones import load_qformer_tokenizer
from qformer_cli.models.config import QFormerConfig, qformer_preset
from qformer_cli.train.common import fitted_qformer_config

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_a_fit_is_a_new_config_and_leaves_the_preset_as_it_was():
    preset = qformer_preset("tiny")
    fitted = preset.fitted_to_backbones(encoder_width=48, vocab_size=300, pad_token_id=5)
    expected = {**dataclasses.asdict(preset), "encoder_width": 48, "vocab_size": 300}
    assert fitted == QFormerConfig(**{**expected, "pad_token_id": 5})
    assert preset == qformer_preset("tiny")
    # None keeps the config's own vocabulary (stage 2 embeds no text)
    assert preset.fitted_to_backbones(encoder_width=48).vocab_size == preset.vocab_size
    with pytest.raises(dataclasses.FrozenInstanceError):
        fitted.encoder_width = 1  # type: ignore[misc]  # fitted only through the builder


@pytest.mark.parametrize(
    ("fit", "problem"),
    [
        ({"encoder_width": 0}, "model.qformer.encoder_width must be >= 1, got 0"),
        (
            {"encoder_width": 128, "vocab_size": 10, "pad_token_id": 10},
            "model.qformer.pad_token_id 10 is not a token id of the 10-token vocabulary",
        ),
    ],
)
def test_an_invalid_fit_is_refused_naming_what_was_fitted(fit: dict, problem: str):
    with pytest.raises(UsageError) as refused:
        qformer_preset("tiny").fitted_to_backbones(**fit)
    described = ", ".join(f"{name} {value}" for name, value in fit.items())
    assert str(refused.value) == f"the Q-Former does not fit its backbones ({described}): {problem}"


def test_stage1_fits_the_vision_width_and_the_tokenizer():
    config = load_config()
    tokenizer = load_qformer_tokenizer(str(ROOT / config.model.bert))
    vision = AutoConfig.from_pretrained(ROOT / config.model.vision.model)
    fitted = fitted_qformer_config(config, vision.hidden_size, tokenizer)
    assert fitted.encoder_width == vision.hidden_size
    assert fitted.vocab_size == len(tokenizer)
    assert fitted.pad_token_id == tokenizer.pad_token_id
    tokenizer.pad_token = "[SEP]"  # a tokenizer whose padding is not id 0
    assert tokenizer.pad_token_id != 0
    assert fitted_qformer_config(config, 8, tokenizer).pad_token_id == tokenizer.pad_token_id


def test_info_fits_the_qformer_to_the_configured_vision_width():
    result = runner.invoke(app, ["info", "--json", "--set", "model.vision.config.hidden_size=96"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["qformer"]["encoder_width"] == 96  # the preset says 128


def test_a_pad_id_outside_the_vocabulary_is_a_usage_error():
    result = runner.invoke(app, ["info", "--set", "model.qformer.pad_token_id=500"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: model.qformer.pad_token_id 500 is not a token id of the 202-token vocabulary"
    )
