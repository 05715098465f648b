"""Frozen backbones load with the checkpoint's weights, or the run is refused.

transformers fills a weight a checkpoint lacks with a fresh random init and only logs it; for a
frozen backbone that means training on noise with exit 0. These runs go through the command line
on directories saved by the installed transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from qformer_cli.cli import app
from qformer_cli.models import backbones
from qformer_cli.train import stage2
from qformer_cli.train import vision as train_vision
from tests.conftest import NUM_QUERIES, TINY_QFORMER, TINY_VISION
from tests.tiny_runs import FAST, ROOT, runner

SAMPLE_VISION = ROOT / "sample_data" / "backbones" / "vision"
SAMPLE_OPT = ROOT / "sample_data" / "backbones" / "opt"
# A text tower for the full CLIP / SigLIP checkpoints (it must be ignored, not refused).
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
)


def _image_processor(directory: Path, side: int) -> None:
    """A CLIP image processor config at the model's own image size."""
    transformers.CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(directory)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full Blip2ForConditionalGeneration saved by transformers (vision, Q-Former, OPT), with
    the OPT's tokenizer and the image processor beside it, as on the hub."""
    directory = tmp_path_factory.mktemp("blip2")
    config = transformers.Blip2Config(
        vision_config=TINY_VISION,
        qformer_config=TINY_QFORMER,
        text_config=transformers.OPTConfig.from_pretrained(SAMPLE_OPT).to_dict(),
        num_query_tokens=NUM_QUERIES,
    )
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(SAMPLE_OPT).save_pretrained(directory)
    _image_processor(directory, TINY_VISION["image_size"])
    return directory


@pytest.fixture
def built_vision(monkeypatch: pytest.MonkeyPatch) -> list[backbones.VisionEncoder]:
    """Every vision encoder the training command builds (the one it trains on)."""
    built: list[backbones.VisionEncoder] = []

    def recording(*args, **kwargs):
        encoder = backbones.build_vision_encoder(*args, **kwargs)
        built.append(encoder)
        return encoder

    monkeypatch.setattr(train_vision, "build_vision_encoder", recording)
    return built


def _stage1(out: Path, *args: str):
    return runner.invoke(
        app, ["pretrain-stage1", "--out", str(out), *FAST, "--max-steps", "1", *args]
    )


def _error_line(result) -> str:
    """The one error line (transformers' load progress bar may precede it in-process)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("architecture", ["", "Blip2VisionModel"])
def test_a_blip2_directory_as_vision_model_trains_on_its_vision_tower(
    tmp_path: Path, blip2_dir: Path, built_vision: list, architecture: str
):
    # What configs/blip2_vitg_opt2.7b.yaml sets (architecture), and the plain --vision-model.
    extra = ["--set", f"model.vision.architecture={architecture}"] if architecture else []
    result = _stage1(tmp_path / "run", "--vision-model", str(blip2_dir), *extra)
    assert result.exit_code == 0, result.output
    [encoder] = built_vision
    saved = load_file(str(blip2_dir / "model.safetensors"))
    trained_on = encoder.model.state_dict()
    assert isinstance(encoder.model, transformers.Blip2VisionModel)
    # every weight is the saved tower's (post_layernorm is BLIP-2's ln_vision: ours, not frozen)
    assert len(trained_on) == len([k for k in saved if k.startswith("vision_model.")]) - 2
    for key, value in trained_on.items():
        assert torch.equal(value, saved[f"vision_model.{key}"]), key


def _vit_classifier(directory: Path) -> torch.nn.Module:
    """A ViT image classifier: a classification head, and no pooler (ViTModel has one)."""
    config = transformers.ViTConfig(**TINY_VISION, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    return transformers.ViTForImageClassification.from_pretrained(directory).vit


def _image_text_model(family: str):
    """A full image-text checkpoint (``CLIPModel``, ``SiglipModel``): vision and text towers."""
    model_cls = getattr(transformers, f"{family}Model")
    config_cls = getattr(transformers, f"{family}Config")

    def save(directory: Path) -> torch.nn.Module:
        config = config_cls(vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT))
        model_cls(config).save_pretrained(directory)
        return model_cls.from_pretrained(directory).vision_model

    return save


@pytest.mark.parametrize(
    ("save", "tower"),
    [
        (_image_text_model("CLIP"), "CLIPVisionModel"),
        (_image_text_model("Siglip"), "SiglipVisionModel"),
        (_vit_classifier, "ViTModel"),
    ],
    ids=["clip", "siglip", "vit-classifier"],
)
def test_weights_the_features_do_not_use_may_be_absent_or_unread(
    tmp_path: Path, built_vision: list, save, tower: str
):
    # CLIP/SigLIP: the text tower is "unexpected" for the vision class, left unread. ViT: the
    # classifier is unread and ViTModel's pooler is "missing", but only the pooled output uses it.
    reference = save(tmp_path / "backbone").state_dict()  # the tower as its full model loads it
    _image_processor(tmp_path / "backbone", TINY_VISION["image_size"])
    result = _stage1(tmp_path / "run", "--vision-model", str(tmp_path / "backbone"))
    assert result.exit_code == 0, result.output
    [encoder] = built_vision
    assert type(encoder.model).__name__ == tower
    trained_on = {k: v for k, v in encoder.model.state_dict().items() if k in reference}
    assert len(trained_on) == len(reference)
    for key, value in trained_on.items():
        assert torch.equal(value, reference[key]), key


def _with_one_more_layer(source: Path, directory: Path) -> Path:
    """A copy of ``source`` whose config asks for one layer more than its weights hold."""
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_vision_checkpoint_missing_weights_is_refused(tmp_path: Path):
    vision = _with_one_more_layer(SAMPLE_VISION, tmp_path / "vision")
    last = json.loads((vision / "config.json").read_text())["num_hidden_layers"] - 1
    result = _stage1(tmp_path / "run", "--vision-model", str(vision))
    assert result.exit_code == 1
    line = _error_line(result)
    with safe_open(str(SAMPLE_VISION / "model.safetensors"), framework="pt") as handle:
        per_layer = sum(".layers.0." in key for key in handle.keys())  # noqa: SIM118
    architecture = json.loads((vision / "config.json").read_text())["architectures"][0]
    assert line.startswith(f"error: {vision}: {per_layer} of the ")  # the added layer's tensors
    assert f"{architecture} are not in the checkpoint and would be random" in line
    assert f"encoder.layers.{last}." in line
    assert "model.vision.architecture" in line


def test_an_llm_checkpoint_missing_layers_is_refused(tmp_path: Path):
    llm = _with_one_more_layer(SAMPLE_OPT, tmp_path / "opt")
    result = runner.invoke(
        app,
        [
            "pretrain-stage2",
            "--out",
            str(tmp_path / "run"),
            *FAST,
            "--max-steps=1",
            "--llm",
            str(llm),
        ],
    )
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith(f"error: {llm}: ")
    assert "OPTForCausalLM are not in the checkpoint and would be random" in line
    assert "model.decoder.layers." in line and "model.llm.architecture" in line


def test_a_blip2_directory_as_llm_and_vision_model_trains_stage2_on_its_towers(
    tmp_path: Path, blip2_dir: Path, built_vision: list, monkeypatch: pytest.MonkeyPatch
):
    built_llm: list[backbones.LanguageModel] = []

    def recording(*args, **kwargs):
        llm = backbones.build_language_model(*args, **kwargs)
        built_llm.append(llm)
        return llm

    monkeypatch.setattr(stage2, "build_language_model", recording)
    towers = ["--vision-model", str(blip2_dir), "--llm", str(blip2_dir)]
    args = ["pretrain-stage2", "--out", str(tmp_path / "run"), *FAST, "--max-steps=1", *towers]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = load_file(str(blip2_dir / "model.safetensors"))
    [llm], [encoder] = built_llm, built_vision
    assert isinstance(llm.model, transformers.OPTForCausalLM)
    llm_weights = llm.model.state_dict()
    assert len(llm_weights) == len([k for k in saved if k.startswith("language_model.")])
    for key, value in llm_weights.items():
        assert torch.equal(value, saved[f"language_model.{key}"]), key
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, saved[f"vision_model.{key}"]), key
