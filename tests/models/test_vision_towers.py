"""Today's vision towers through the commands: a SigLIP and a DINOv2 tower (tiny, random, saved
the way transformers saves them) train stage 1 and are read back by eval-retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

from tests.tiny_runs import FAST, ROOT, invoke_json

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize(
    "tower",
    [
        SiglipVisionModel(SiglipVisionConfig(image_size=64, patch_size=16, **SIZES)),
        Dinov2Model(Dinov2Config(image_size=64, patch_size=16, **SIZES)),
    ],
    ids=["siglip", "dinov2"],
)
def test_a_vision_tower_trains_stage1_and_evaluates(tower: torch.nn.Module, tmp_path: Path) -> None:
    tower.save_pretrained(tmp_path / "tower")
    run = tmp_path / "run"
    summary = invoke_json(
        "pretrain-stage1", "--vision-model", str(tmp_path / "tower"), "--out", str(run),
        *FAST, "--max-steps", "3", "--quiet",
    )  # fmt: skip
    assert summary["steps"] == 3 and summary["last"]["itc"] > 0
    recorded = json.loads((run / "run_config.json").read_text())["model"]["vision"]
    assert recorded["model"] == str(tmp_path / "tower")
    subset = tmp_path / "val.json"
    subset.write_text(
        json.dumps(json.loads((ROOT / "sample_data/karpathy_val.json").read_text())[:16])
    )
    scores = invoke_json(
        "eval-retrieval", "--model", str(run), "--annotations", str(subset),
        "--images", str(ROOT / "sample_data"), "--k", "2", "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert scores["num_images"] == 16 and 0 <= scores["text_to_image"]["R@1"] <= 100


def test_a_run_trained_at_its_own_image_size_is_read_at_that_size(tmp_path: Path) -> None:
    """DINOv2 takes any size: trained at 96 px (its processor says 64), every later reading of
    the run (`match`, `export-onnx`) must feed it 96-px images, as training did."""
    from qformer_cli.data import build_transform, load_image, load_transform_config
    from qformer_cli.data.folder import image_file_sample
    from qformer_cli.inference.retrieve import match_scores
    from qformer_cli.pretrained import load_stage1_pipeline

    tower = tmp_path / "tower"
    Dinov2Model(Dinov2Config(image_size=64, patch_size=16, **SIZES)).save_pretrained(tower)
    run = tmp_path / "run"
    invoke_json(
        "pretrain-stage1", "--vision-model", str(tower), "--out", str(run), *FAST,
        "--max-steps", "3", "--set", "data.image_size=96", "--quiet",
    )  # fmt: skip
    image = ROOT / "sample_data/images/val/scene_200000.png"
    text = "a blue triangle"
    result = invoke_json("match", "--model", str(run), "--image", str(image), "--text", text)
    [scored] = result["matches"]

    # the reference: the training transform's pixels, from the tower's settings at 96 px
    pipeline = load_stage1_pipeline(run, torch.device("cpu"))
    sample = load_image(image_file_sample(image))

    def scores_at(size: int) -> dict:
        pixels = build_transform(load_transform_config(str(tower), size), train=False)(sample)
        assert pixels.shape[-2:] == (size, size)
        [row] = match_scores(pipeline, pixels[None], [text])
        return row

    trained, native = scores_at(96), scores_at(64)
    assert scored["itc_similarity"] == pytest.approx(trained["itc_similarity"], abs=1e-5)
    assert scored["itm_probability"] == pytest.approx(trained["itm_probability"], abs=1e-5)
    assert abs(native["itc_similarity"] - trained["itc_similarity"]) > 1e-4  # it matters

    exported = tmp_path / "onnx"
    invoke_json("export-onnx", "--model", str(run), "--out", str(exported))
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["image_size"] == [3, 96, 96]
    processor = json.loads((exported / "preprocessor_config.json").read_text())
    assert 96 in processor["size"].values(), processor
