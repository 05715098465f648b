"""Validation during training (``train.eval_every``): on a held-out caption file
(``data.val``, default the data root's val split), stage 1 is scored by ITC retrieval recall and
stage 2 by caption CIDEr. Each pass adds ``val_*`` metrics to ``metrics.jsonl``; the checkpoint
with the best ``train.keep_best_by`` is kept as ``checkpoints/best``.

BLIP-2's pre-training has no validation set, so stage 2 starts from stage 1's last checkpoint;
with one, ``--init RUN:best`` takes the best instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qformer_cli.config import RunConfig
from qformer_cli.data import BadSampleLog, Sample, sample_split_files
from qformer_cli.embedded import resolve_embedded_path
from qformer_cli.errors import UsageError

# The metric each stage keeps its best checkpoint by, unless train.keep_best_by names another.
DEFAULT_BEST_METRIC = {1: "val_r_mean", 2: "val_cider"}
STAGE_METRICS = {
    1: ("val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5", "val_r_mean"),
    2: ("val_cider", "val_bleu4"),
}
Validator = Callable[[], dict[str, float]]


def best_metric(stage: int, config: RunConfig) -> str:
    """``train.keep_best_by``, checked against what the stage's validation reports."""
    name = config.train.keep_best_by or DEFAULT_BEST_METRIC[stage]
    if name not in STAGE_METRICS[stage]:
        choices = ", ".join(STAGE_METRICS[stage])
        raise UsageError(f"train.keep_best_by {name!r}: stage {stage} reports {choices}")
    return name


def validation_samples(config: RunConfig) -> list[Sample]:
    """The held-out images with their captions (``data.val``, else the data root's val split),
    the first ``data.val_limit`` of them when set."""
    from qformer_cli.eval.retrieval import read_retrieval_samples
    from qformer_cli.train.common import data_root

    data = config.data
    if data.val:
        path = resolve_embedded_path(data.val)
    else:
        path = sample_split_files("val", data_root(data)).karpathy
    image_root = resolve_embedded_path(data.image_root) if data.image_root else None
    samples = read_retrieval_samples(
        Path(path), image_root, BadSampleLog(skip=data.skip_bad_samples)
    )
    return samples[: data.val_limit] if data.val_limit else samples


def stage1_validator(
    model: Any,  # Stage1Model
    vision: Any,  # VisionEncoder
    tokenizer: Any,
    config: RunConfig,
    device: torch.device,
) -> Validator:
    """ITC retrieval R@1/R@5 both ways (the mean of the four: ``val_r_mean``). The frozen
    encoder's features are computed once, at the first pass."""
    from qformer_cli.eval.retrieval import itc_similarity, load_retrieval_set, recall_at
    from qformer_cli.pretrained import image_transform_config

    samples = validation_samples(config)
    cached: list[Any] = []

    def validate() -> dict[str, float]:
        if not cached:
            cached.append(
                load_retrieval_set(
                    samples, vision, image_transform_config(config), tokenizer, device, 64
                )
            )
        data = cached[0]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            similarity = itc_similarity(model, data, 64).cpu()  # (images, texts)
        model.train(was_training)
        images = torch.arange(similarity.shape[0])
        is_match = data.text_to_image.cpu()[None, :] == images[:, None]  # (images, texts)
        image_to_text = recall_at(similarity, is_match)  # as eval-retrieval's ITC-only rows
        text_to_image = recall_at(similarity.t(), is_match.t())
        metrics = {
            "val_i2t_r1": image_to_text["R@1"],
            "val_i2t_r5": image_to_text["R@5"],
            "val_t2i_r1": text_to_image["R@1"],
            "val_t2i_r5": text_to_image["R@5"],
        }
        metrics["val_r_mean"] = sum(metrics.values()) / len(metrics)
        return metrics

    return validate


def stage2_validator(pipeline: Any, config: RunConfig) -> Validator:
    """Caption CIDEr (and BLEU-4) of the generated captions against the held-out captions,
    decoded with the run config's ``generate`` settings. ``pipeline`` is a
    :class:`~qformer_cli.pretrained.Stage2Pipeline` of the parts being trained."""
    from qformer_cli.eval.caption_metrics import score_captions
    from qformer_cli.inference.caption import caption_samples
    from qformer_cli.inference.generators import TorchGenerator

    samples = validation_samples(config)
    references = {sample.image_id: list(sample.captions) for sample in samples}
    generator = TorchGenerator(pipeline)
    settings = replace(config.generate)

    def validate() -> dict[str, float]:
        bridge = pipeline.bridge
        was_training = bridge.training
        bridge.eval()
        with torch.no_grad():
            rows, _ = caption_samples(generator, samples, settings, settings.prompt)
        bridge.train(was_training)
        predictions = {row["image_id"]: row["caption"] for row in rows}
        scores = score_captions(references, predictions, use_meteor=False, use_spice=False)
        return {"val_cider": scores.scores["CIDEr"], "val_bleu4": scores.scores["BLEU_4"]}

    return validate
