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
