"""model.vision.layer: the Q-Former reads an earlier hidden layer, as BLIP-2 reads EVA ViT-g's
second to last; -2 of a tower equals the last of the same tower one block shorter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel

from qformer_cli.models.backbones import build_vision_encoder
from qformer_cli.models.config import BackboneConfig

SIZES = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=32, patch_size=8
)


@pytest.mark.parametrize(
    ("model_class", "config_class"),
    [(Blip2VisionModel, Blip2VisionConfig), (CLIPVisionModel, CLIPVisionConfig)],
)
def test_the_second_to_last_layer_is_the_shorter_towers_last(
    tmp_path: Path, model_class: type, config_class: type
) -> None:
    torch.manual_seed(0)
    full = model_class(config_class(num_hidden_layers=4, **SIZES)).eval()
    with torch.no_grad():  # weights that move the features: BLIP-2's init leaves them ~1e-10
        for parameter in full.parameters():
            parameter.normal_(std=0.2)
    full.save_pretrained(tmp_path / "full")
    shorter = model_class(config_class(num_hidden_layers=3, **SIZES)).eval()
    shorter.load_state_dict(full.state_dict(), strict=False)  # the first three blocks
    shorter.save_pretrained(tmp_path / "shorter")
    pixels = torch.randn(2, 3, 32, 32)
    second_to_last = build_vision_encoder(BackboneConfig(model=str(tmp_path / "full"), layer=-2))
    last_of_shorter = build_vision_encoder(BackboneConfig(model=str(tmp_path / "shorter")))
    with torch.no_grad():
        expected = last_of_shorter(pixels)
        if model_class is CLIPVisionModel:  # CLIP's last_hidden_state has no final norm either
            expected = shorter(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(second_to_last(pixels), expected)
        last = build_vision_encoder(BackboneConfig(model=str(tmp_path / "full")))(pixels)
    assert not torch.allclose(last, second_to_last(pixels))  # -2 is not the default
