"""Captioning: which images, which prompt, the captions, and their COCO scores when the ground
truth is known. ``caption`` and ``eval-caption --model`` run :func:`caption_to_files`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qformer_cli.config import GenerationConfig
from qformer_cli.data import (
    BadSampleLog,
    Sample,
    read_coco_captions,
    read_image_folder,
    sample_split_files,
)
from qformer_cli.data.folder import image_file_sample
from qformer_cli.errors import DataError
from qformer_cli.inference.generators import Generator, generate_for_samples, generate_to_file


def caption_inputs(
    images: Path | None, annotations: Path | None, split: str
) -> tuple[list[Sample], Path | None]:
    """The images to caption and, when known, the COCO ground truth to score against.

    ``images`` FILE|DIR alone: those files (ids from their names). ``annotations``: the images
    it lists (in ``images`` DIR, default beside it). Neither: the sample_data split.
    """
    if annotations is not None:
        return read_coco_captions(annotations, images), annotations
    if images is not None:
        if images.is_dir():
            return read_image_folder(images), None
        if not images.is_file():
            raise DataError(f"{images}: no such image file or folder")
        return [image_file_sample(images)], None
    files = sample_split_files(split)
    if files.coco_captions is None:
        raise DataError(f"split '{split}' has no caption ground truth; use --images")
    return read_coco_captions(files.coco_captions, files.image_dir), files.coco_captions


def caption_prompt(generator: Generator, settings: GenerationConfig, given: bool) -> str:
    """The prompt: ``settings.prompt`` when the user gave one, else the one the model was
    trained with (a model that records none takes ``settings.prompt``)."""
    return settings.prompt if given or not generator.prompt else generator.prompt


def caption_row(sample: Sample, text: str) -> dict[str, Any]:
    """A row of the COCO captioning results format, with the image's file beside its id."""
    return {"image_id": sample.image_id, "caption": text, "file": sample.file}


def caption_samples(
    generator: Generator,
    samples: list[Sample],
    settings: GenerationConfig,
    prompt: str,
    *,
    batch_size: int = 32,
    shuffle_images: bool = False,
    skip_bad_samples: bool = False,
) -> tuple[list[dict[str, Any]], BadSampleLog]:
    """``[{"image_id", "caption", "file"}]`` in input order, and the log of samples skipped as
    bad."""
    bad = BadSampleLog(skip=skip_bad_samples)
    generated = generate_for_samples(
        generator,
        samples,
        settings,
        lambda _: prompt,
        batch_size=batch_size,
        shuffle_images=shuffle_images,
        bad=bad,
    )
    return [caption_row(sample, text) for sample, text in generated], bad


def caption_to_files(
    generator: Generator,
    samples: list[Sample],
    ground_truth: Path | None,
    settings: GenerationConfig,
    prompt: str,
    out_dir: Path,
    *,
    batch_size: int,
    shuffle_images: bool,
    bad: BadSampleLog,
    max_image_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Caption ``samples`` into ``out_dir/captions.json`` (on a failure: the captions done so
    far), list the samples ``bad`` skipped in ``out_dir/skipped.json`` and, with
    ``ground_truth``, score the captions into ``out_dir/metrics.json``; the command's result.
    With ``resume``, the rows already in ``captions.json`` are kept and their images are not
    captioned again (batches run in input order, so the result is the uninterrupted run's)."""
    from qformer_cli.eval.caption_metrics import evaluate_caption_files

    results_path = out_dir / "captions.json"
    captions, resumed_with = generate_to_file(
        generator,
        samples,
        settings,
        lambda _: prompt,
        caption_row,
        results_path,
        "image_id",
        "captions",
        batch_size=batch_size,
        shuffle_images=shuffle_images,
        bad=bad,
        max_image_pixels=max_image_pixels,
        progress=progress,
        resume=resume,
    )
    result: dict[str, Any] = {
        "backend": generator.backend,
        "prompt": prompt,
        "num_images": len(captions),
        "captions": str(results_path),
        "shuffled_images": shuffle_images,
        "resumed_with": resumed_with,
        **bad.result_fields(),
    }
    if bad.total:
        result["skipped"] = str(out_dir / "skipped.json")
    if ground_truth is not None:
        scores = evaluate_caption_files(ground_truth, results_path, bad.skipped_ids()).to_dict()
        (out_dir / "metrics.json").write_text(json.dumps(scores, indent=1))
        result["metrics"] = scores
    return result
