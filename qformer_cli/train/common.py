"""What both stages build the same way: output directory, training data, the frozen encoder."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from qformer_cli.config import DataConfig, RunConfig, from_dict
from qformer_cli.data import (
    BadSampleLog,
    Sample,
    SampleDataset,
    SampleLoader,
    build_transform,
    make_dataloader,
    one_caption_per_sample,
    read_caption_file,
    read_vqa,
    sample_data_dir,
    sample_split_files,
)
from qformer_cli.data.features import FeatureDataset, FeatureIndex
from qformer_cli.data.hf import Columns, hub_source, read_hub_samples
from qformer_cli.data.karpathy import TRAINING_SPLITS
from qformer_cli.data.loader import ImageTransform
from qformer_cli.data.mixture import MixtureSampler
from qformer_cli.data.shards import (
    expand_source,
    is_shard_source,
    is_tar_source,
    read_shard_source,
)
from qformer_cli.data.streams import ListStream, Stream, StreamingTrainingSet, TarStream
from qformer_cli.embedded import resolve_embedded_path
from qformer_cli.errors import UsageError
from qformer_cli.models.backbones import qformer_vocabulary
from qformer_cli.models.config import BackboneConfig, QFormerConfig
from qformer_cli.pretrained import image_transform_config
from qformer_cli.runtime import Ranks

# A run directory's resolved config (RunConfig.to_dict(); usable as --config). Runs written
# before it had this name called it config.json, the name a checkpoint's metadata keeps.
RUN_CONFIG = "run_config.json"
LEGACY_RUN_CONFIG = "config.json"


def write_resolved_config(out_dir: Path, config: RunConfig) -> None:
    (out_dir / RUN_CONFIG).write_text(json.dumps(config.to_dict(), indent=1))


def data_root(data: DataConfig) -> Path:
    return resolve_embedded_path(data.root) if data.root else sample_data_dir()


def read_caption_samples(data: DataConfig, bad: BadSampleLog) -> list[Sample]:
    """Training captions, one sample per caption: COCO captions JSON, LAVIS's Karpathy train
    list, Karpathy's ``dataset_*.json`` (its train + restval images), a caption table, or
    webdataset shards / parquet (:mod:`qformer_cli.data.shards`). With ``data.sources``, each
    source's samples in turn, tagged with its path."""
    if not data.sources:
        return _read_training_source(data.train, data, bad)
    return [
        replace(sample, source=source["path"])
        for source in mixture_sources(data)
        for sample in _read_training_source(source["path"], data, bad)
    ]


def data_columns(data: DataConfig) -> Columns:
    """``data.columns`` checked: which record fields hold the image, caption and image id."""
    unknown = set(data.columns) - {"image", "caption", "image_id"}
    if unknown:
        raise UsageError(f"data.columns: unknown key(s) {', '.join(sorted(unknown))}")
    return Columns(**data.columns)


def mixture_sources(data: DataConfig) -> list[dict[str, Any]]:
    """``data.sources`` checked: each a ``{"path", "weight"}`` mapping (weight default 1)."""
    sources = []
    for index, source in enumerate(data.sources):
        where = f"data.sources[{index}]"
        if not isinstance(source.get("path"), str) or not source["path"]:
            raise UsageError(f"{where}: needs a 'path' (any --data value)")
        unknown = set(source) - {"path", "weight"}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        weight = source.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
            raise UsageError(f"{where}.weight = {weight!r}: must be a number > 0")
        sources.append({"path": source["path"], "weight": float(weight)})
    if data.train:
        raise UsageError("give data.train (--data) once or data.sources, not both")
    return sources


def _read_training_source(train: str, data: DataConfig, bad: BadSampleLog) -> list[Sample]:
    if train and hub_source(train) is not None:
        samples = read_hub_samples(train, data_columns(data), bad)
        return one_caption_per_sample([s for s in samples if s.captions])
    if train and is_tar_source(train) and data.streaming:
        return []  # read by its stream while training (build_train_loader)
    if train and is_shard_source(train):
        return read_shard_source(str(resolve_embedded_path(train)), bad, data.columns)
    if train:
        path = resolve_embedded_path(train)
    else:
        path = sample_split_files("train", data_root(data)).karpathy
    image_root = resolve_embedded_path(data.image_root) if data.image_root else None
    samples = read_caption_file(path, image_root, karpathy_splits=TRAINING_SPLITS, bad=bad)
    samples = one_caption_per_sample(samples)
    if not samples:
        raise UsageError(f"{path}: no training captions")
    return samples


def read_vqa_training_samples(data: DataConfig, bad: BadSampleLog) -> list[Sample]:
    """VQAv2 question-answer pairs mixed into stage-2 training (none unless configured)."""
    if not data.vqa_questions:
        return []
    if not data.vqa_annotations:
        raise UsageError("data.vqa_questions needs data.vqa_annotations (the answers)")
    questions = resolve_embedded_path(data.vqa_questions)
    if data.vqa_images:
        image_dir = resolve_embedded_path(data.vqa_images)
    else:
        image_dir = questions.parent / "images" / "train"
    samples = read_vqa(questions, resolve_embedded_path(data.vqa_annotations), image_dir, bad=bad)
    return [sample for sample in samples if sample.answer]


def fitted_qformer_config(
    config: RunConfig, vision_width: int, tokenizer: Any = None
) -> QFormerConfig:
    """The preset's sizes fitted to the backbones: the image feature width, and the Q-Former
    tokenizer's vocabulary where the Q-Former embeds text (stage 1, an instruction-aware
    stage 2; None: it does not)."""
    vocabulary = qformer_vocabulary(tokenizer) if tokenizer is not None else {}
    return config.model.qformer_config().fitted_to_backbones(
        encoder_width=vision_width, **vocabulary
    )


def build_train_loader(
    config: RunConfig,
    samples: list[Sample],
    bad: BadSampleLog,
    ranks: Ranks,
    features: FeatureIndex | None = None,
) -> SampleLoader:
    """Shuffled, sharded batches of images, or of their cached encoder features; streamed
    with ``data.streaming``."""
    global_batch = config.train.batch_size
    if global_batch % ranks.world_size:
        raise UsageError(
            f"train.batch_size {global_batch} is not divisible by {ranks.world_size} processes"
        )
    if features is not None:
        dataset: SampleDataset | FeatureDataset = FeatureDataset(samples, features, bad)
    else:
        transform = build_transform(
            image_transform_config(config), train=config.data.augment, hflip=config.data.hflip
        )
        if config.data.streaming:
            return _stream_loader(config, samples, transform, bad, ranks)
        dataset = SampleDataset(
            samples, transform, bad_samples=bad, max_image_pixels=config.data.max_image_pixels
        )
    sampler = None
    if config.data.sources:  # samples come grouped by source, in data.sources' order
        sizes = Counter(sample.source for sample in samples)
        sources = mixture_sources(config.data)
        sampler = MixtureSampler(
            [sizes[source["path"]] for source in sources],
            [source["weight"] for source in sources],
            batch_size=global_batch // ranks.world_size,
            rank=ranks.rank,
            world_size=ranks.world_size,
            seed=config.train.seed,
            order=config.data.mixture_order,
        )
    return make_dataloader(
        dataset,
        batch_size=global_batch // ranks.world_size,
        shuffle=True,
        num_workers=config.data.num_workers,
        rank=ranks.rank,
        world_size=ranks.world_size,
        seed=config.train.seed,
        drop_last=True,
        sampler=sampler,
    )


def _stream_loader(
    config: RunConfig,
    samples: list[Sample],
    transform: ImageTransform,
    bad: BadSampleLog,
    ranks: Ranks,
) -> SampleLoader:
    """Batches of a streamed training set (``data.streaming``): tar shard sources read front to
    back, the others dealt from memory (:mod:`qformer_cli.data.streams`)."""
    data, train = config.data, config.train
    named = mixture_sources(data) if data.sources else [{"path": data.train, "weight": 1.0}]
    streams: list[Stream] = []
    for index, source in enumerate(named):
        path = source["path"]
        common = {"index": index, "seed": train.seed}
        if path and is_tar_source(path):
            files = expand_source(str(resolve_embedded_path(path)))
            streams.append(TarStream(files, path, buffer=data.shuffle_buffer, **common))
        else:
            own = [s for s in samples if s.source == (path if data.sources else "")]
            streams.append(ListStream(own, path or "the embedded default", **common))
    dataset = StreamingTrainingSet(
        streams,
        [source["weight"] for source in named],
        transform,
        batch_size=train.batch_size // ranks.world_size,
        nominal_batches=(train.max_steps + 1) * train.grad_accum,
        rank=ranks.rank,
        world_size=ranks.world_size,
        workers=data.num_workers,
        seed=train.seed,
        order=data.mixture_order,
        max_image_pixels=data.max_image_pixels,
        bad_samples=bad,
    )
    return make_dataloader(
        dataset,
        batch_size=dataset.batch_size,
        num_workers=data.num_workers,
        rank=ranks.rank,
        seed=train.seed,
    )


def trained_vision(saved_run: dict) -> tuple[BackboneConfig, int] | None:
    """The vision encoder spec and ``data.image_size`` a checkpoint's recorded run config was
    trained with (None when it records no model section)."""
    if "model" not in saved_run:
        return None
    vision = from_dict(BackboneConfig, saved_run["model"]["vision"], "model.vision")
    return vision, int(saved_run.get("data", {}).get("image_size", 0))
