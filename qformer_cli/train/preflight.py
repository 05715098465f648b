"""Checks that refuse a training run before any backbone loads: exit 2 and one line each.

Loading a ViT-g and an LLM takes minutes; a run that cannot finish (a missing backbone, a
checkpoint of the other stage or vocabulary, a disk too full for one checkpoint) should say so
first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qformer_cli import checkpoint
from qformer_cli.config import RunConfig
from qformer_cli.data.hf import hub_source
from qformer_cli.data.shards import expand_source, is_shard_source
from qformer_cli.embedded import resolve_embedded_path
from qformer_cli.errors import UsageError
from qformer_cli.info import count
from qformer_cli.models.backbones import (
    build_language_model,
    build_vision_encoder,
    check_language_model_kind,
    check_vision_image_size,
    check_vision_kind,
    load_qformer_tokenizer,
    resolve_model_name,
    same_backbone,
)
from qformer_cli.models.blip2 import Stage1Model, Stage2Model
from qformer_cli.train.common import data_columns, mixture_sources, trained_vision
from qformer_cli.train.validation import best_metric

# What one checkpoint holds per trainable parameter: fp32 weights + AdamW's two fp32 moments.
CHECKPOINT_BYTES_PER_TRAINABLE = 12


def check_before_loading(
    stage: int, run_name: str, config: RunConfig, out_dir: Path, resume_from: Path | None
) -> None:
    """Refuse, before any weights load, a run that would fail later; ``run_name`` names the run
    in messages."""
    _check_stage_options(stage, config)
    _check_data_files(config)
    _check_backbones(stage, config)
    # built once on the meta device, read by both the resume and the free-disk checks
    llm_width = llm_embedding_width(config) if stage == 2 else None
    if resume_from is not None:
        _check_resume_checkpoint(run_name, stage, config, resume_from, llm_width)
    _check_free_disk(stage, config, out_dir, llm_width)


def _check_stage_options(stage: int, config: RunConfig) -> None:
    if config.data.features and stage != 1:
        raise UsageError("data.features (--features) is a stage-1 option: stage 2 reads images")
    if config.train.fsdp and stage != 2:
        raise UsageError("train.fsdp (--fsdp) shards stage 2's frozen LLM: a stage-2 option")
    if config.train.fsdp and not torch.distributed.is_initialized():
        raise UsageError("--fsdp needs several processes: launch with torchrun")
    if stage == 2 and config.data.sources and config.data.vqa_questions:
        raise UsageError(
            "data.sources do not mix with stage 2's data.vqa_questions yet: "
            "--set data.vqa_questions='' or train on one source"
        )
    if config.data.sources:
        mixture_sources(config.data)  # each {path, weight}, and not with data.train
    data_columns(config.data)
    if config.data.streaming:
        _check_streaming(stage, config)
    if config.train.trains_vision:
        _check_vision_training(stage, config)
    if stage == 1 and (config.data.instructions or config.data.instruction_templates):
        raise UsageError("data.instructions / instruction_templates are stage-2 data")
    if config.train.eval_every:
        best_metric(stage, config)  # a name the stage reports
        if config.data.features:
            raise UsageError("train.eval_every needs the vision encoder: not with --features")


def _check_vision_training(stage: int, config: RunConfig) -> None:
    """A trained vision encoder (train.vision_lr) runs in the step, on the images."""
    if config.data.features:
        raise UsageError("train.vision_lr trains the vision encoder: not with a feature cache")
    if stage == 1 and config.train.grad_accum > 1:
        raise UsageError(
            "train.vision_lr with train.grad_accum > 1 is not supported in stage 1 (its shared "
            "ITC features would need the encoder's graph of every micro-batch)"
        )
    if config.train.fsdp:
        raise UsageError("train.vision_lr with --fsdp is not supported yet")


def _check_streaming(stage: int, config: RunConfig) -> None:
    """A streamed set has no length and reads images (qformer_cli/data/streams.py)."""
    if not config.train.max_steps:
        raise UsageError("data.streaming: a stream has no epochs; set train.max_steps")
    if config.data.features:
        raise UsageError("data.streaming reads images: not with a feature cache (--features)")
    if stage == 2 and config.data.vqa_questions:
        raise UsageError(
            "data.streaming does not stream stage 2's data.vqa_questions: "
            "--set data.vqa_questions='' or data.streaming=false"
        )


def _check_data_files(config: RunConfig) -> None:
    """Every data file the config names exists: a missing one is a usage error (exit 2)."""
    data = config.data
    named = {
        "data.train (--data)": data.train,
        "data.vqa_questions": data.vqa_questions,
        "data.vqa_annotations": data.vqa_annotations,
        "data.val": data.val,
        "data.instructions": data.instructions,
    }
    for index, source in enumerate(data.sources):
        named[f"data.sources[{index}]"] = str(source.get("path") or "")
    for key, value in named.items():
        if not value or hub_source(value) is not None:  # a datasets source: read, not a file
            continue
        if is_shard_source(value):  # a glob or brace range: every file it names
            files = expand_source(str(resolve_embedded_path(value)))
            missing = [path for path in files if not path.is_file()] or ([] if files else [value])
            if missing:
                raise UsageError(f"{key} {value}: no such file {missing[0]}")
        elif not resolve_embedded_path(value).is_file():
            raise UsageError(f"{key} {value}: no such file")
    folders = {"data.image_root": data.image_root, "data.features (--features)": data.features}
    for key, value in folders.items():
        if value and not resolve_embedded_path(value).is_dir():
            raise UsageError(f"{key} {value}: no such folder")


def _check_backbones(stage: int, config: RunConfig) -> None:
    """Every local backbone path exists (``resolve_model_name`` raises for one that does not)
    and is of the right kind, judged from its config before any weights load."""
    for spec in (config.model.vision, config.model.llm) if stage == 2 else (config.model.vision,):
        resolve_model_name(spec.model)
    resolve_model_name(config.model.bert)
    if not config.data.features:  # a feature cache replaces the vision encoder
        check_vision_kind(config.model.vision)
        check_vision_image_size(config.model.vision, config.data.image_size)
    if stage == 2:
        check_language_model_kind(config.model.llm)


def llm_embedding_width(config: RunConfig) -> int:
    """Width of the configured LLM's token embeddings (the stage-2 projection's output)."""
    return build_language_model(config.model.llm, meta=True).embedding_dim


def _check_resume_checkpoint(
    run_name: str, stage: int, config: RunConfig, directory: Path, llm_width: int | None
) -> None:
    saved = checkpoint.load_meta(directory)
    if saved.stage != stage:
        raise UsageError(
            f"{directory}: a stage-{saved.stage} checkpoint; {run_name} resumes stage {stage}"
        )
    _check_resume_vision(directory, config, saved.run)
    if stage == 2:  # the bridge's projection is as wide as the LLM's token embeddings
        saved_width = saved.llm_embedding_dim
        if llm_width != saved_width:
            raise UsageError(
                f"{directory}: trained for an LLM with {saved_width}-wide token embeddings, but "
                f"model.llm ({config.model.llm.model}) has {llm_width}"
            )
    if stage == 1:  # the stage-1 Q-Former embeds the tokenizer's vocabulary
        vocab = len(load_qformer_tokenizer(resolve_model_name(config.model.bert)))
        saved_vocab = saved.qformer.vocab_size
        if vocab != saved_vocab:
            raise UsageError(
                f"{directory}: trained with a {saved_vocab}-token vocabulary, but the tokenizer "
                f"of model.bert ({config.model.bert}) has {vocab} tokens"
            )


def _check_resume_vision(directory: Path, config: RunConfig, saved_run: dict) -> None:
    """A run resumes on the vision encoder and image size it was trained on, not the defaults
    (e.g. a stage-2 run started with --init from a stage-1 run on another encoder)."""
    recorded = trained_vision(saved_run)
    if recorded is None:
        return
    trained, image_size = recorded
    if not same_backbone(config.model.vision, trained):
        raise UsageError(
            f"{directory}: trained on the vision encoder {trained.model} "
            f"(architecture {trained.architecture or 'auto'}, config {trained.config}), but "
            f"model.vision is {config.model.vision.model} (architecture "
            f"{config.model.vision.architecture or 'auto'}, config {config.model.vision.config}): "
            f"resume with --vision-model {trained.model} and its settings"
        )
    if config.data.image_size != image_size:
        raise UsageError(
            f"{directory}: trained with data.image_size {image_size}, but it is "
            f"{config.data.image_size} now: resume with --set data.image_size={image_size}"
        )


def trainable_parameters(stage: int, config: RunConfig, llm_width: int | None = None) -> int:
    """The stage's trainable parameter count, from shapes alone (meta device, no weights);
    stage 2 builds the LLM for its embedding width unless ``llm_width`` is given."""
    vision = build_vision_encoder(config.model.vision, meta=True)
    qformer_config = config.model.qformer_config().fitted_to_backbones(
        encoder_width=vision.hidden_size
    )
    # a trained vision encoder (train.vision_lr) is checkpointed with its optimizer state too
    trained_vision = count(vision) if config.train.trains_vision else 0
    with torch.device("meta"):
        if stage == 1:
            model: torch.nn.Module = Stage1Model(qformer_config)
        else:
            width = llm_width if llm_width is not None else llm_embedding_width(config)
            model = Stage2Model(
                qformer_config, width, instruction_aware=config.model.instruction_aware
            )
    return count(model) + trained_vision


def free_disk_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _check_free_disk(stage: int, config: RunConfig, out_dir: Path, llm_width: int | None) -> None:
    needed = trainable_parameters(stage, config, llm_width) * CHECKPOINT_BYTES_PER_TRAINABLE
    free = free_disk_bytes(out_dir)
    if free < needed:
        raise UsageError(
            f"{out_dir}: {free / 1e6:.1f} MB free, but one checkpoint needs about "
            f"{needed / 1e6:.1f} MB (trainable parameters x {CHECKPOINT_BYTES_PER_TRAINABLE} "
            "bytes: weights + optimizer state)"
        )
