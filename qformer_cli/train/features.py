"""``qformer extract-features``: run the frozen vision encoder once over the training images.

The images are the ones ``pretrain-stage1`` with the same config would train on (one row per
image id), transformed as for evaluation (no augmentation: a cached feature is one fixed view).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qformer_cli.config import RunConfig
from qformer_cli.data import BadSampleLog, SampleDataset, build_transform, make_dataloader
from qformer_cli.data.features import (
    FEATURE_DTYPES,
    FeatureIndex,
    FeatureWriter,
    check_fingerprint,
    encoder_fingerprint,
    image_key,
    read_index,
    unique_images,
)
from qformer_cli.errors import UsageError
from qformer_cli.models.backbones import backbone_config, check_vision_kind, resolve_model_name
from qformer_cli.pretrained import image_transform_config
from qformer_cli.progress import ProgressReport
from qformer_cli.train.common import read_caption_samples
from qformer_cli.train.vision import image_features, load_vision


def expected_fingerprint(config: RunConfig) -> dict[str, str]:
    """The cache fingerprint this config's encoder and transform give (reads configs only)."""
    name = resolve_model_name(config.model.vision.model)
    encoder_config = backbone_config(config.model.vision).to_dict()
    if config.model.vision.layer != -1:  # another layer's features (caches of -1 unchanged)
        encoder_config["qformer_reads_layer"] = config.model.vision.layer
    return encoder_fingerprint(name, encoder_config, image_transform_config(config))


def open_feature_cache(config: RunConfig) -> FeatureIndex:
    """``data.features``, checked against the config before any backbone loads."""
    if config.data.augment:
        raise UsageError(
            "--features cannot be combined with data.augment: cached features are of one fixed, "
            "un-augmented view of each image"
        )
    index = read_index(Path(config.data.features))
    check_fingerprint(index, expected_fingerprint(config))
    return index


def extract_features(
    config: RunConfig,
    out: Path,
    *,
    dtype: str,
    shard_size: int,
    batch_size: int,
    device: torch.device,
    console: Console,
    report: Callable[[str], None],
    quiet: bool = False,
) -> dict[str, Any]:
    if dtype not in FEATURE_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)} (got {dtype!r})")
    check_vision_kind(config.model.vision)
    fingerprint = expected_fingerprint(config)
    bad = BadSampleLog(skip=config.data.skip_bad_samples)
    samples = list(unique_images(read_caption_samples(config.data, bad)))
    transform = build_transform(image_transform_config(config), train=False)
    loader = make_dataloader(
        SampleDataset(
            samples, transform, bad_samples=bad, max_image_pixels=config.data.max_image_pixels
        ),
        batch_size=batch_size,
        num_workers=config.data.num_workers,
    )
    vision = load_vision(config, device)
    writer = FeatureWriter(out, fingerprint, dtype, shard_size)
    report(f"extracting {len(samples)} images with {fingerprint['model']} on {device}")
    started = time.perf_counter()
    done = 0
    with ProgressReport(console, "extract", len(samples), quiet=quiet) as progress:
        for batch in loader:
            features = image_features(vision, batch.images, device, config.train.precision)
            writer.add([image_key(sample) for sample in batch.samples], features)
            done += len(batch) + len(batch.skipped)
            progress.update(done)
    index = writer.finish()
    seconds = time.perf_counter() - started
    return {
        "out_dir": str(out),
        "num_images": index["num_images"],
        "feature_shape": index["feature_shape"],
        "dtype": dtype,
        "shards": len(index["shards"]),
        "encoder": fingerprint,
        "images_per_s": round(index["num_images"] / seconds, 2) if seconds > 0 else None,
        **bad.result_fields(),
    }
