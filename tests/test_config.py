"""Configs: every shipped file loads; unknown keys and wrong types are one-line usage errors;
no --config is configs/tiny.yaml; shipped configs and the embedded default are found by name
from any directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.config import RunConfig, load_config
from qformer_cli.errors import UsageError
from qformer_cli.models.backbones import resolve_model_name
from qformer_cli.models.config import QFormerConfig, qformer_preset

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
runner = CliRunner()


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
        ("train.precision=fp8", "'fp8' is not one of auto, fp32, bf16, fp16"),
        ("train.max_steps=true", "expected int"),
        ("model.qformer.hidden=3", "unknown config key 'model.qformer.hidden'"),
        ("model.preset=huge", "unknown Q-Former preset 'huge'"),
        ("model.qformer.num_heads=5", "not a multiple of num_heads 5"),
        ("train.lr", "expected key=value"),
        ("train.lr.x=1", "'lr' is not a section"),
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


# --------------------------------------------------------------------------------------------
# The embedded default: one recipe, with or without --config, from any directory.

# What configs/tiny.yaml sets that the built-in defaults (under every other config) do not: the
# stage-2 VQA mix, which a config of one's own must not inherit (README: "Configuration"), no
# instruction templates for its tiny LM (README: qformer finetune), no Q-Former dropout, and
# ITM's easy-negative warm-up and weight (README: "What make demo shows").
TINY_ONLY = {
    "data.vqa_questions",
    "data.vqa_annotations",
    "data.instruction_templates",
    "model.qformer",
    "model.qformer.hidden_dropout",
    "model.qformer.attention_dropout",
    "stage1.itm_weight",
    "stage1.itm_negative_warmup",
    "train.precision",
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_no_config_is_configs_tiny_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # not the source tree: the shipped file is found all the same
    default = load_config().to_dict()
    assert default["data"]["vqa_questions"] == "sample_data/vqa_train_questions.json"
    for same in ("tiny", "tiny.yaml", "configs/tiny.yaml", CONFIG_DIR / "tiny.yaml"):
        assert load_config(same).to_dict() == default, same


def test_the_builtin_defaults_are_tiny_yaml_except_the_vqa_mix():
    builtin = _flat(RunConfig().to_dict())
    tiny = _flat(load_config("tiny").to_dict())
    differ = {key for key in builtin.keys() | tiny.keys() if builtin.get(key) != tiny.get(key)}
    assert differ == TINY_ONLY


def test_stage2_without_config_reads_the_vqa_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from qformer_cli.data import BadSampleLog
    from qformer_cli.train.common import read_vqa_training_samples

    monkeypatch.chdir(tmp_path)
    samples = read_vqa_training_samples(load_config().data, BadSampleLog(skip=False))
    assert len(samples) > 1000 and all(sample.answer and sample.question for sample in samples)


@pytest.mark.parametrize(
    "name", ["blip2_vitg_opt2.7b", "blip2_stage1_vitg.yaml", "tiny_t5", "blip2_pretrain_129m"]
)
def test_a_shipped_config_by_name_from_any_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    by_path = load_config(CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml")
    assert load_config(name).to_dict() == by_path.to_dict()


def test_a_file_here_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("train:\n  lr: 0.5\n")
    assert load_config("tiny.yaml").train.lr == 0.5  # the user's file
    assert load_config("tiny").train.lr == 1e-3  # no file named `tiny` here: the shipped one


def test_an_unknown_config_name_is_one_line_listing_the_shipped_names():
    result = runner.invoke(app, ["info", "--config", "blip3"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: blip3: no such config file")
    for name in ("tiny", "tiny_t5", "blip2_vitg_opt2.7b", "blip2_stage1_vitg"):
        assert name in lines[0]


def test_the_backbone_lookup_follows_qformer_sample_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)  # no sample_data/ here
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "backbones").mkdir(parents=True)
    (elsewhere / "backbones" / "vision").symlink_to(ROOT / "sample_data" / "backbones" / "vision")
    monkeypatch.setenv("QFORMER_SAMPLE_DATA", str(elsewhere))
    vision = resolve_model_name("sample_data/backbones/vision")
    assert vision == str(elsewhere / "backbones" / "vision")
    # The command: the LLM is not in $QFORMER_SAMPLE_DATA, and the error says where it looked.
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: sample_data/backbones/opt: backbone directory not found "
        f"(looked in {elsewhere / 'backbones' / 'opt'})"
    )


def test_the_129m_mixture_config_is_the_stage1_recipe_over_six_sources() -> None:
    mixture, stage1 = load_config("blip2_pretrain_129m"), load_config("blip2_stage1_vitg")
    assert mixture.model == stage1.model and mixture.train == stage1.train
    assert mixture.stage1 == stage1.stage1
    assert [s["weight"] for s in mixture.data.sources] == [113, 100, 860, 3000, 10000, 115000]
    assert sum(s["weight"] for s in mixture.data.sources) == 129073  # thousand images: 129M
    assert mixture.data.mixture_order == "random"  # as LAVIS draws its loaders
    assert mixture.data.streaming  # no index of 129M samples before the first step


def test_long_values_are_cut_and_huge_files_refused_unread(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", "--set", "train.lr=" + "y" * 100_000])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.endswith("... (100,002 characters)") and len(line) < 200
    huge = tmp_path / "huge.yaml"
    huge.write_text("train:\n  lr: '" + "x" * (2 << 20) + "'\n")
    result = runner.invoke(app, ["info", "--config", str(huge)])
    assert result.exit_code == 2
    size = huge.stat().st_size
    expected = f"error: {huge}: {size:,} bytes, not a run config (at most 1 MiB)"
    assert result.output.strip() == expected


# --------------------------------------------------------------------------------------------
# per_command: a config file's settings for one command


def test_tiny_gives_stage2_its_own_learning_rate_and_nothing_else() -> None:
    # configs/tiny.yaml: stage 2 at stage 1's 1e-3 sat on its loss plateau (README "What make
    # demo shows"); every other command keeps the file's shared settings.
    stage2 = _flat(load_config("tiny", command="pretrain-stage2").to_dict())
    for command in ("pretrain-stage1", "finetune", "caption", "eval-vqa", None):
        shared = _flat(load_config("tiny", command=command).to_dict())
        assert shared["train.lr"] == 1e-3, command
        assert {key for key in shared if shared[key] != stage2[key]} == {"train.lr"}, command
    assert stage2["train.lr"] == 5e-4
    overridden = load_config("tiny", ["train.lr=2e-3"], command="pretrain-stage2")
    assert overridden.train.lr == 2e-3  # --set comes last, over per_command too


def test_pretrain_stage2_records_the_learning_rate_it_trained_at(
    trained_stage1: Path, trained_stage2: Path
) -> None:
    import json

    def recorded(run: Path) -> float:
        return json.loads((run / "run_config.json").read_text())["train"]["lr"]

    # the user's path: the commands without --config, as the demo runs them
    assert recorded(trained_stage2) == 5e-4
    assert recorded(trained_stage1) == 1e-3


@pytest.mark.parametrize(
    ("per_command", "message"),
    [
        (
            "  pretrain-stage3:\n    train:\n      lr: 1.0e-4\n",
            "config section 'per_command.pretrain-stage3': not a command that reads --config",
        ),
        (  # checked whichever command runs (here info), not only when caption does
            "  caption:\n    train:\n      lrr: 1.0e-4\n",
            "config section 'per_command.caption': unknown config key 'train.lrr'",
        ),
        (
            "  caption:\n    train:\n      lr: fast\n",
            "config section 'per_command.caption': config key 'train.lr': expected float",
        ),
        ("  caption: 5\n", "config section 'per_command.caption' must be a mapping"),
        ("  - caption\n", "config section 'per_command' must map command names to sections"),
    ],
)
def test_a_wrong_per_command_section_is_one_line(
    per_command: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  lr: 1.0e-3\nper_command:\n" + per_command)
    result = runner.invoke(app, ["info", "--config", str(path)])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: {message}"), line


def test_per_command_names_every_command_that_reads_config() -> None:
    import typer

    from qformer_cli.config import CONFIG_COMMANDS

    group = typer.main.get_command(app)
    reading = {
        name
        for name, command in group.commands.items()
        if any(param.name == "config" for param in command.params)
    }
    assert reading == set(CONFIG_COMMANDS)
