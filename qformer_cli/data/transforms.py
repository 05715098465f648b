"""Image transforms BLIP-2 uses, built with PIL + torch (torchvision is not a dependency).

- eval: resize to a square (bicubic), scale to [0, 1], normalize with the encoder's mean/std
  (LAVIS ``BlipImageEvalProcessor``); or, when the model's processor says so (CLIP, DINOv2:
  ``size.shortest_edge`` with ``do_center_crop``), the shorter side resized and the centre square
  cropped, as that processor does.
- train: RandomResizedCrop(scale 0.5-1.0, bicubic) + horizontal flip, then the same tensor steps
  (LAVIS ``BlipImageTrainProcessor`` without RandAugment, as the BLIP-2 configs use it).

The size, mean, std and resampling filter come from the model's image processor config, read as
transformers reads it: the ``image_processor`` entry of ``processor_config.json`` (what
transformers 5 writes for a processor such as ``Blip2Processor``), else
``preprocessor_config.json`` (what an image processor alone, or transformers 4, writes). With
neither, the side is the vision config's ``image_size`` (``config.json``) and mean/std are CLIP's,
as BLIP-2 uses; only with no config at all is it 224.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qformer_cli.errors import DataError, first_line

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # a whole processor; its image part under this key:
PROCESSOR_IMAGE_KEY = "image_processor"
MODEL_CONFIG = "config.json"

_log = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class ImageTransformConfig:
    """What the transforms need: output side length, normalization and resampling filter."""

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: Image.Resampling = Image.Resampling.BICUBIC
    # 0: resize to an image_size square (BLIP-2's eval transform); N: the shorter side to N, then
    # the centre image_size square (a CLIP / DINOv2 processor's shortest_edge + center crop)
    resize_shortest: int = 0
    # where the settings came from, for messages (not part of the transform)
    source: str = field(default="defaults", compare=False)


def _size_from_processor(config: dict[str, Any]) -> int | None:
    """The square side an image processor config produces (crop size, else resize size)."""
    for key in ("crop_size", "size"):
        value = config.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            height, width = value.get("height"), value.get("width")
            if height and width and height != width:
                raise DataError(
                    f"image processor {key} {height}x{width}: only square images are supported"
                )
            side = height or value.get("shortest_edge") or width
            if side:
                return int(side)
    return None


def transform_config_from_processor(
    config: dict[str, Any],
    image_size: int | None = None,
    *,
    fallback_size: int | None = None,
    source: str = "defaults",
) -> ImageTransformConfig:
    """Build an :class:`ImageTransformConfig` from an image processor config dict.

    ``image_size`` overrides the processor's size (BLIP-2 fine-tunes at 364 px with a 224 px
    processor, interpolating the position embeddings); ``fallback_size`` is used when the
    processor config names no size.
    """
    default = ImageTransformConfig()
    side = image_size or _size_from_processor(config) or fallback_size or default.image_size
    mean = tuple(config.get("image_mean") or default.mean)
    std = tuple(config.get("image_std") or default.std)
    if len(mean) != 3 or len(std) != 3:
        raise DataError(f"image processor config: image_mean/image_std need 3 values, got {mean}")
    resample = Image.Resampling(config.get("resample", default.resample))
    # an image_size of one's own (BLIP-2 fine-tunes at 364 px) is BLIP-2's square resize
    shortest = 0 if image_size else _shortest_edge_before_crop(config)
    return ImageTransformConfig(side, mean, std, resample, shortest, source)  # type: ignore[arg-type]


def _shortest_edge_before_crop(config: dict[str, Any]) -> int:
    """The shorter side a processor resizes to before its centre crop (0: none of that)."""
    size, crop = config.get("size"), config.get("crop_size")
    if not config.get("do_center_crop") or crop is None:
        return 0
    if isinstance(size, dict) and size.get("shortest_edge"):
        return int(size["shortest_edge"])
    return 0


def load_transform_config(
    model_name_or_path: str | Path | None, image_size: int | None = None
) -> ImageTransformConfig:
    """The image transform of a model folder (or a hub id already in the local cache; nothing is
    downloaded here): its image processor config, else its vision config's ``image_size`` with
    CLIP mean/std (logged), else the defaults (224 px, CLIP mean/std)."""
    if model_name_or_path is None:
        return transform_config_from_processor({}, image_size)
    name = str(model_name_or_path)
    found = _find_image_processor(name)
    if found is not None:
        processor, source = found
        return transform_config_from_processor(processor, image_size, source=source)
    if image_size is not None:  # the processor's side is all the vision config could give
        return transform_config_from_processor({}, image_size)
    vision_size = _vision_config_image_size(name)
    if vision_size is None:
        return transform_config_from_processor({})
    source = f"{name}: no image processor config; {vision_size} px from its vision config"
    _log_once(f"{source}, CLIP mean/std")
    return transform_config_from_processor({}, fallback_size=vision_size, source=source)


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        _log.warning(message)


def _find_file(model_name_or_path: str, filename: str) -> Path | None:
    """``filename`` in a local folder, or in the local hub cache for a hub id."""
    local = Path(model_name_or_path)
    if local.is_dir():
        candidate = local / filename
        return candidate if candidate.is_file() else None
    try:  # a hub id: only look in the local cache, never download here
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_name_or_path, filename)
    except Exception:
        return None
    return Path(cached) if isinstance(cached, str) else None


def _find_image_processor(model_name_or_path: str) -> tuple[dict[str, Any], str] | None:
    """The image processor config dict and where it was found, in transformers' order: the
    ``image_processor`` entry of ``processor_config.json``, then ``preprocessor_config.json``."""
    processor_path = _find_file(model_name_or_path, PROCESSOR_CONFIG)
    if processor_path is not None:
        nested = _read_json_object(processor_path, "processor config").get(PROCESSOR_IMAGE_KEY)
        if nested is not None:
            if not isinstance(nested, dict):
                raise DataError(f"{processor_path}: '{PROCESSOR_IMAGE_KEY}' is not a JSON object")
            return nested, f"{processor_path} ({PROCESSOR_IMAGE_KEY})"
    preprocessor_path = _find_file(model_name_or_path, PREPROCESSOR_CONFIG)
    if preprocessor_path is not None:
        return _read_json_object(preprocessor_path, "image processor config"), str(
            preprocessor_path
        )
    return None


def _vision_config_image_size(model_name_or_path: str) -> int | None:
    """``image_size`` of the model's vision config (``vision_config`` of a BLIP-2/CLIP config,
    or the config itself), with transformers' class defaults filled in; None without one."""
    if _find_file(model_name_or_path, MODEL_CONFIG) is None:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, local_files_only=True)
    except (OSError, ValueError) as error:
        _log_once(f"{model_name_or_path}: unreadable model config ({first_line(error)})")
        return None
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise DataError(
                f"{model_name_or_path}: image_size {list(size)}: only square images are supported"
            )
        size = size[0]
    return int(size) if isinstance(size, int) and size > 0 else None


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: malformed {what} ({error})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: {what} is not a JSON object")
    return config


def image_processor_settings(config: ImageTransformConfig) -> tuple[str, dict[str, Any]]:
    """:class:`EvalTransform` as a transformers image processor: its class name and keyword
    arguments. ``BlipImageProcessor`` for BLIP-2's square resize; ``CLIPImageProcessor`` for a
    shorter-side resize and centre crop."""
    side = config.image_size
    if config.resize_shortest:
        kind = "CLIPImageProcessor"
        sizes = {
            "size": {"shortest_edge": config.resize_shortest},
            "do_center_crop": True,
            "crop_size": {"height": side, "width": side},
        }
    else:
        kind, sizes = "BlipImageProcessor", {"size": {"height": side, "width": side}}
    return kind, {
        "do_resize": True,
        **sizes,
        "resample": int(config.resample),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(config.mean),
        "image_std": list(config.std),
        "do_convert_rgb": True,
    }


def to_normalized_tensor(image: Image.Image, config: ImageTransformConfig) -> torch.Tensor:
    """(H, W) RGB PIL image -> float tensor (3, H, W), normalized with the config's mean/std."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean) / std


class EvalTransform:
    """Resize to ``image_size`` squared and normalize (picklable for DataLoader workers)."""

    def __init__(self, config: ImageTransformConfig) -> None:
        self.config = config

    def __call__(self, image: Image.Image) -> torch.Tensor:
        side = self.config.image_size
        if self.config.resize_shortest:
            image = _shorter_side_to(image, self.config.resize_shortest, self.config.resample)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))  # (transformers' offsets)
        elif image.size != (side, side):
            image = image.resize((side, side), self.config.resample)
        return to_normalized_tensor(image, self.config)


def _shorter_side_to(image: Image.Image, shortest: int, resample: Image.Resampling) -> Image.Image:
    """The shorter side resized to ``shortest``, the longer one to ``int(shortest * long /
    short)``, as transformers computes it."""
    width, height = image.size
    if width <= height:
        size = (shortest, int(shortest * height / width))
    else:
        size = (int(shortest * width / height), shortest)
    return image if size == image.size else image.resize(size, resample)


class TrainTransform:
    """RandomResizedCrop + optional horizontal flip, then normalize.

    Random numbers come from torch's global generator, which DataLoader seeds differently in each
    worker (base_seed + worker_id), or from ``generator`` when given.
    """

    def __init__(
        self,
        config: ImageTransformConfig,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.config = config
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop picks it:
        area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, 10 tries, then a
        centre crop with the ratio clamped."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * self._uniform(*self.scale)
            aspect = math.exp(self._uniform(log_low, log_high))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = int(self._uniform(0, width - crop_w + 1))
                top = int(self._uniform(0, height - crop_h + 1))
                return left, top, left + crop_w, top + crop_h
        return _center_crop_box(width, height, self.ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        side = self.config.image_size
        box = self.crop_box(*image.size)
        image = image.resize((side, side), self.config.resample, box=box)
        if self.hflip and self._uniform(0, 1) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(image, self.config)


def _center_crop_box(
    width: int, height: int, ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def build_transform(
    config: ImageTransformConfig, train: bool, hflip: bool = True
) -> ImageTransform:
    """The train or eval transform for ``config``; ``hflip=False`` keeps left/right meaningful
    (the synthetic world's captions and questions name positions)."""
    return TrainTransform(config, hflip=hflip) if train else EvalTransform(config)
