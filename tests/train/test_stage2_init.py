"""`pretrain-stage2 --init S1_RUN` trains on the vision encoder and image size S1_RUN used.

The stage-1 Q-Former learned to read one encoder's features; stage 2 used to load the default
encoder whatever stage 1 was trained on (exit 0, the cross-attention weights of another width
silently left at init).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from qformer_cli import checkpoint
from qformer_cli.cli import app
from qformer_cli.train import stage2
from tests.tiny_runs import FAST, ROOT, metrics_rows, runner

# Unlike the shipped tiny encoder (width 128, 64 px): another width and another image size.
OTHER_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
SAMPLE_IMAGES = ROOT / "sample_data" / "images" / "val"


def _run_config(run: Path) -> dict:
    return checkpoint.load_config(checkpoint.resolve_checkpoint(run))["run"]


@pytest.fixture(scope="module")
def other_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIPVisionModel and its image processor, saved by transformers."""
    directory = tmp_path_factory.mktemp("vision")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**OTHER_VISION)).save_pretrained(
        directory
    )
    side = OTHER_VISION["image_size"]
    transformers.CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory: pytest.TempPathFactory, other_vision: Path) -> Path:
    run = tmp_path_factory.mktemp("s1") / "run"
    args = ["pretrain-stage1", "--out", str(run), *FAST, "--max-steps", "2"]
    result = runner.invoke(app, [*args, "--vision-model", str(other_vision)])
    assert result.exit_code == 0, result.output
    return run


def test_stage2_init_trains_on_the_stage1_vision_encoder(
    tmp_path: Path, stage1_run: Path, other_vision: Path
):
    run = tmp_path / "s2"
    args = ["pretrain-stage2", "--init", str(stage1_run), "--out", str(run), *FAST]
    result = runner.invoke(app, [*args, "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    # every Q-Former weight of stage 1 fits: nothing left at init but the new LLM projection
    assert "missing (left at init): llm_proj.weight, llm_proj.bias" in result.stderr
    trained = _run_config(run)
    assert trained["model"]["vision"]["model"] == str(other_vision)
    assert trained["data"]["image_size"] == _run_config(stage1_run)["data"]["image_size"]

    # Resumed as the SIGTERM hint says (--resume auto --out RUN), it must not fall back to the
    # default encoder: refused without the encoder, continued with the --init it started from.
    resume = ["pretrain-stage2", "--resume", "auto", "--out", str(run), *FAST, "--max-steps", "3"]
    refused = runner.invoke(app, resume)
    assert refused.exit_code == 2, refused.output
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert f"trained on the vision encoder {other_vision} " in line
    assert f"resume with --vision-model {other_vision}" in line
    resumed = runner.invoke(app, [*resume, "--init", str(stage1_run)])
    assert resumed.exit_code == 0, resumed.output
    assert [row["step"] for row in metrics_rows(run)] == [1, 2, 3]

    image = sorted(SAMPLE_IMAGES.iterdir())[0]
    caption = ["caption", "--model", str(run), "--images", str(image), "--max-new-tokens", "3"]
    caption += ["--min-new-tokens", "1"]
    captioned = runner.invoke(app, [*caption, "--out", str(tmp_path / "captions"), "--json"])
    assert captioned.exit_code == 0, captioned.output


def _refused(*args: str) -> str:
    result = runner.invoke(app, ["pretrain-stage2", *FAST, "--max-steps", "1", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "option",
    [
        ["--vision-model", "sample_data/backbones/vision"],
        ["--set", "model.vision.model=sample_data/backbones/vision"],
        ["--set", "data.image_size=64"],
    ],
    ids=["--vision-model", "--set model.vision.model", "--set data.image_size"],
)
def test_a_conflicting_vision_option_is_refused(
    tmp_path: Path, stage1_run: Path, option: list[str], monkeypatch: pytest.MonkeyPatch
):
    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the stage-2 recipe was built before the refusal")

    monkeypatch.setattr(stage2, "build_stage2_recipe", must_not_load)
    line = _refused("--init", str(stage1_run), "--out", str(tmp_path / "s2"), *option)
    directory = checkpoint.resolve_checkpoint(stage1_run)
    assert f"{directory} was trained" in line and "stage 2 --init uses that one" in line


def test_a_stage1_weight_of_another_shape_is_an_error_not_skipped(tmp_path: Path, stage1_run):
    # The Q-Former built for stage 2 must take every stage-1 weight it has a place for.
    args = ["--init", str(stage1_run), "--out", str(tmp_path / "s2"), "--max-steps", "1"]
    narrower = ["--set", "model.qformer.intermediate_size=256"]  # stage 1: the tiny preset's 512
    result = runner.invoke(app, ["pretrain-stage2", *FAST, *args, *narrower])
    assert result.exit_code == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    directory = checkpoint.resolve_checkpoint(stage1_run)
    assert line.startswith(f"error: {directory}: qformer.layers.0.")
    assert " is (512" in line and " there but (256" in line and "in this stage-2 model" in line


def test_the_same_vision_model_spelled_otherwise_is_not_a_conflict(
    stage1_run: Path, other_vision: Path
):
    # As the stage-1 run has it, given again (an absolute path vs one with "..").
    from qformer_cli.config import load_config

    spelled = str(other_vision / ".." / other_vision.name)
    config = load_config(None, [f"model.vision.model={spelled}"])
    inherited = stage2.inherit_init_vision(config, stage1_run, {"model.vision.model"})
    assert inherited.model.vision.model == str(other_vision)
    assert json.dumps(inherited.to_dict()["model"]["vision"]) == json.dumps(
        _run_config(stage1_run)["model"]["vision"]
    )
