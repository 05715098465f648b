"""Image transforms: values worked out by hand, processor configs, crop geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qformer_cli.data import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    ImageTransformConfig,
    TrainTransform,
    build_transform,
    load_transform_config,
    sample_backbone_dir,
    transform_config_from_processor,
)
from qformer_cli.errors import DataError


def test_eval_transform_normalizes_each_channel() -> None:
    image = Image.new("RGB", (64, 64), (255, 0, 51))  # 51 / 255 = 0.2
    pixels = EvalTransform(ImageTransformConfig(image_size=64))(image)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1]]
    expected.append((0.2 - CLIP_MEAN[2]) / CLIP_STD[2])
    for channel, value in enumerate(expected):
        assert torch.allclose(pixels[channel], torch.full((64, 64), value), atol=1e-5)


def test_eval_transform_resizes_to_a_square() -> None:
    image = Image.new("RGB", (100, 40), (10, 20, 30))
    config = ImageTransformConfig(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    pixels = EvalTransform(config)(image)
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels[:, 5, 5], torch.tensor([10, 20, 30]) / 255.0, atol=1e-6)


def test_grey_and_rgba_images_become_rgb() -> None:
    config = ImageTransformConfig(image_size=8)
    assert EvalTransform(config)(Image.new("L", (8, 8), 128)).shape == (3, 8, 8)
    assert EvalTransform(config)(Image.new("RGBA", (8, 8))).shape == (3, 8, 8)


def test_config_of_the_shipped_vision_encoder() -> None:
    config = load_transform_config(sample_backbone_dir("vision"))
    assert config == ImageTransformConfig(64, CLIP_MEAN, CLIP_STD, Image.Resampling.BICUBIC)


def test_config_from_a_processor_file(tmp_path: Path) -> None:
    processor = {
        "crop_size": {"height": 48, "width": 48},
        "size": {"shortest_edge": 56},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
        "resample": 2,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    config = load_transform_config(tmp_path)
    assert config == ImageTransformConfig(48, (0.5,) * 3, (0.25,) * 3, Image.Resampling.BILINEAR)
    assert load_transform_config(tmp_path, image_size=96).image_size == 96


def test_config_defaults_without_a_processor(tmp_path: Path) -> None:
    assert load_transform_config(tmp_path) == ImageTransformConfig()
    assert load_transform_config("no-such-org/no-such-model").image_size == 224  # cache only
    assert transform_config_from_processor({"size": 384}).image_size == 384


def test_malformed_processor_config(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(DataError, match=r"preprocessor_config\.json: malformed image processor"):
        load_transform_config(tmp_path)


def halves_image(size: int = 64) -> Image.Image:
    """Left half black, right half white."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    image.paste((255, 255, 255), (size // 2, 0, size, size))
    return image


def test_train_transform_flips_about_half_the_time() -> None:
    config = ImageTransformConfig(64, (0.0,) * 3, (1.0,) * 3)
    transform = TrainTransform(config, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    transform.generator = torch.Generator().manual_seed(0)
    flipped = sum(bool(transform(halves_image())[0, 0, 0] > 0.5) for _ in range(400))
    assert 160 < flipped < 240
    no_flip = TrainTransform(config, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    assert all(no_flip(halves_image())[0, 0, 0] < 0.5 for _ in range(20))


def test_train_transform_is_reproducible_from_its_generator() -> None:
    config = ImageTransformConfig(32)
    image = Image.effect_mandelbrot((80, 60), (-2, -1, 1, 1), 50).convert("RGB")
    first = TrainTransform(config, generator=torch.Generator().manual_seed(3))
    second = TrainTransform(config, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(first(image), second(image)) for _ in range(5))
    assert not torch.equal(first(image), first(image))


def test_build_transform_picks_the_kind() -> None:
    config = ImageTransformConfig(16)
    assert isinstance(build_transform(config, train=False), EvalTransform)
    train = build_transform(config, train=True, hflip=False)
    assert isinstance(train, TrainTransform) and not train.hflip


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(1, 600),
    height=st.integers(1, 600),
    seed=st.integers(0, 2**31),
)
def test_crop_box_lies_inside_and_keeps_its_area(width: int, height: int, seed: int) -> None:
    transform = TrainTransform(
        ImageTransformConfig(8), generator=torch.Generator().manual_seed(seed)
    )
    left, top, right, bottom = transform.crop_box(width, height)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    area = (right - left) * (bottom - top) / (width * height)
    if min(width, height) >= 50 and 0.75 <= width / height <= 1.33:
        assert 0.45 <= area <= 1.0  # scale (0.5, 1.0), up to rounding


def _photo(width: int, height: int) -> Image.Image:
    """A smooth non-square test picture (gradients and a disc), like a photo's low frequencies."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2) < (min(width, height) / 4) ** 2
    pixels = np.stack([x / width * 255, y / height * 255, disc * 200.0 + 30], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    "processor_class, settings",
    [
        ("CLIPImageProcessorPil", {}),  # shortest edge 224 + centre crop 224
        (  # DINOv2's: shortest edge 256 + centre crop 224, ImageNet mean/std
            "BitImageProcessorPil",
            {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
             "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
        ),
        ("SiglipImageProcessorPil", {}),  # a 224 square, mean/std 0.5
        ("BlipImageProcessorPil", {}),  # a 384 square (BLIP-2's)
    ],
)  # fmt: skip
@pytest.mark.parametrize("width, height", [(320, 240), (200, 330)])
def test_eval_transform_equals_the_models_own_processor(
    tmp_path: Path, processor_class: str, settings: dict, width: int, height: int
) -> None:
    """The processor saved as transformers saves it, read back by us: the same pixels as the
    processor gives, landscape and portrait."""
    import transformers

    processor = getattr(transformers, processor_class)(**settings)
    processor.save_pretrained(tmp_path)
    image = _photo(width, height)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    ours = build_transform(load_transform_config(tmp_path), train=False)(image)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < 1e-5
