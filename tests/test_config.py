"""Configs: every shipped file loads; unknown keys and wrong types are one-line usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from qformer_cli.config import QFormerConfig, RunConfig, load_config, qformer_preset
from qformer_cli.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert isinstance(config.model.qformer_config(), QFormerConfig)


def test_there_are_configs_to_check():
    assert len(list(CONFIG_DIR.glob("*.yaml"))) >= 2


def test_overrides_are_typed_and_nested():
    config = load_config(
        None, ["train.lr=2e-4", "train.betas=[0.9, 0.99]", "model.qformer.num_layers=2"]
    )
    assert config.train.lr == 2e-4
    assert config.train.betas == [0.9, 0.99]
    assert config.model.qformer_config().num_layers == 2
    assert config.model.qformer_config().hidden_size == 128  # the rest of the tiny preset


def test_yaml_scientific_notation_is_a_float(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  warmup_steps: 10\n")
    config = load_config(path)
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(UsageError, match=r"train\.batch_size"):
        load_config(None, ["train.batch_size=2.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nothing.here=1", "unknown config key 'nothing'"),
        ("train.lr=fast", "config key 'train.lr': expected float"),
        ("train.precision=fp8", "'fp8' is not one of fp32, bf16, fp16"),
        ("train.max_steps=true", "expected int"),
        ("model.qformer.hidden=3", "unknown config key 'model.qformer.hidden'"),
        ("model.preset=huge", "unknown Q-Former preset 'huge'"),
        ("model.qformer.num_heads=5", "not a multiple of num_heads 5"),
        ("train.lr", "expected key=value"),
        ("train.lr.x=1", "config key 'train.lr': expected float"),
    ],
)
def test_bad_overrides_are_usage_errors(override: str, message: str):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_bad_yaml_names_the_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1,\n")
    with pytest.raises(UsageError, match=r"broken\.yaml: line"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        load_config(path)


def test_yaml_python_tags_are_refused(tmp_path: Path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UsageError):
        load_config(path)


def test_presets_hold_the_papers_sizes():
    blip2 = qformer_preset("blip2")
    assert (blip2.hidden_size, blip2.num_layers, blip2.num_heads) == (768, 12, 12)
    assert (blip2.intermediate_size, blip2.num_query_tokens, blip2.encoder_width) == (
        3072,
        32,
        1408,
    )
    assert (blip2.cross_attention_freq, blip2.vocab_size, blip2.layer_norm_eps) == (2, 30523, 1e-12)


def test_the_t5_demo_config_scales_the_soft_prompt_projection():
    import torch

    from qformer_cli.models.blip2 import Stage2Model

    config = load_config(CONFIG_DIR / "tiny_t5.yaml")
    assert config.model.llm.model == "sample_data/backbones/t5"
    torch.manual_seed(0)
    bridge = Stage2Model(config.model.qformer_config(), 128, config.model.llm_proj_init_std)
    assert abs(bridge.llm_proj.weight.std().item() - 0.1) < 0.01
    default = Stage2Model(qformer_preset("tiny"), 128)
    assert abs(default.llm_proj.weight.std().item() - 0.02) < 0.002


def test_a_partial_backbone_section_keeps_the_other_defaults(tmp_path: Path):
    # The backbones' defaults live in ModelConfig (sample_data's), not in BackboneConfig ("").
    config = load_config(None, ["model.vision.config.layer_norm_eps=0.001"])
    assert config.model.vision.model == "sample_data/backbones/vision"
    assert config.model.vision.config == {"layer_norm_eps": 0.001}
    assert config.model.llm.model == "sample_data/backbones/opt"
    path = tmp_path / "llm.yaml"
    path.write_text("model:\n  llm:\n    architecture: OPTForCausalLM\n")
    from_file = load_config(path)
    assert from_file.model.llm.model == "sample_data/backbones/opt"
    assert from_file.model.llm.architecture == "OPTForCausalLM"
