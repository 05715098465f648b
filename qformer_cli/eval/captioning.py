"""Generation over data sets: ``caption`` / ``eval-caption`` inputs, and batched generation
for any samples with per-sample prompts (captions, VQA answers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from qformer_cli.data import (
    BadSampleLog,
    Sample,
    SampleDataset,
    build_transform,
    load_transform_config,
    make_dataloader,
    read_coco_captions,
    read_image_folder,
    sample_split_files,
)
from qformer_cli.data.sample import image_id_from_name
from qformer_cli.errors import DataError
from qformer_cli.generate import GenerationSettings, generate_text
from qformer_cli.pretrained import Stage2Pipeline


def caption_inputs(
    images: Path | None, annotations: Path | None, split: str
) -> tuple[list[Sample], Path | None]:
    """The images to caption and, when known, the COCO ground truth to score against.

    ``--images FILE|DIR`` alone: those files (ids from their names). ``--annotations GT``: the
    images it lists (in ``--images DIR``, default beside it). Neither: the sample_data split.
    """
    if annotations is not None:
        return read_coco_captions(annotations, images), annotations
    if images is not None:
        if images.is_dir():
            return read_image_folder(images), None
        if not images.is_file():
            raise DataError(f"{images}: no such image file or folder")
        return [Sample(image=images, image_id=image_id_from_name(images), origin=str(images))], None
    files = sample_split_files(split)
    if files.coco_captions is None:
        raise DataError(f"split '{split}' has no caption ground truth; use --images")
    return read_coco_captions(files.coco_captions, files.image_dir), files.coco_captions


def shuffled(features: torch.Tensor, seed: int) -> torch.Tensor:
    """The images permuted across the batch (a derangement where possible): the grounding check."""
    count = features.shape[0]
    if count < 2:
        return features
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    order = torch.where(order == torch.arange(count), (order + 1) % count, order)
    return features[order]


def generate_for_samples(
    pipeline: Stage2Pipeline,
    samples: list[Sample],
    settings: GenerationSettings,
    prompt_for: Callable[[Sample], str],
    *,
    batch_size: int,
    device: torch.device,
    shuffle_images: bool = False,
    skip_bad_samples: bool = False,
) -> tuple[list[tuple[Sample, str]], BadSampleLog]:
    """Generate one text per sample (image + its text prompt), batched, in input order."""
    bad = BadSampleLog(skip=skip_bad_samples)
    transform = build_transform(load_transform_config(pipeline.image_processor_source), train=False)
    dataset = SampleDataset(samples, transform, bad_samples=bad)
    dtype = next(pipeline.vision.parameters()).dtype
    results = []
    for index, batch in enumerate(make_dataloader(dataset, batch_size=batch_size)):
        with torch.no_grad():
            features = pipeline.vision(batch.images.to(device=device, dtype=dtype))
        if shuffle_images:
            features = shuffled(features, seed=index)
        texts = generate_text(
            pipeline.bridge,
            pipeline.llm,
            pipeline.tokenizer,
            features.float(),
            [prompt_for(sample) for sample in batch.samples],
            settings,
        )
        results.extend(zip(batch.samples, texts, strict=True))
    return results, bad
