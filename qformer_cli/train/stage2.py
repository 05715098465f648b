"""Stage 2: the Q-Former's queries become a soft visual prompt for a frozen LLM.

Decoder-only LLMs see ``[soft prompt; prompt + caption + "\\n"]`` and learn the caption, with the
soft prompt, the text prompt and padding masked out of the labels. Encoder-decoder LLMs
(FlanT5-style) get ``[soft prompt; prompt + prefix]`` in the encoder and the suffix as the
decoder target, the caption split at a random word (the paper's prefix language modelling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qformer_cli import checkpoint
from qformer_cli.config import RunConfig
from qformer_cli.data import BadSampleLog, Sample
from qformer_cli.data.instructions import caption_instruction, question_instruction
from qformer_cli.data.tables import read_instruction_table
from qformer_cli.embedded import resolve_embedded_path
from qformer_cli.errors import CheckpointError, UsageError
from qformer_cli.inference.generate import instructed_soft_prompt
from qformer_cli.models.backbones import (
    LanguageModel,
    build_language_model,
    load_llm_tokenizer,
    load_qformer_tokenizer,
    resolve_model_name,
    same_backbone,
)
from qformer_cli.models.blip2 import Stage2Model, soft_prompt_inputs
from qformer_cli.models.convert import LoadReport, load_external_weights
from qformer_cli.pretrained import image_transform_config
from qformer_cli.runtime import PRECISION_DTYPES, Ranks
from qformer_cli.train.common import (
    build_train_loader,
    fitted_qformer_config,
    read_caption_samples,
    read_vqa_training_samples,
    trained_vision,
)
from qformer_cli.train.loop import StageRecipe
from qformer_cli.train.sharding import checkpoint_activations, describe, shard_frozen_lm
from qformer_cli.train.validation import Validator, best_metric, stage2_validator
from qformer_cli.train.vision import (
    VisionInFront,
    batch_images,
    carried_vision,
    describe_vision_training,
    load_vision,
)


@dataclass
class Stage2Batch:
    """Frozen image features and, per sample, a given text prompt and the text to learn.

    Captions are learned after the caption prompt (and, for encoder-decoder LLMs, split at a
    random word: ``split_target``); VQA pairs learn the answer after "Question: ... Answer:".
    """

    image_embeds: torch.Tensor | None  # (B, N, C) vision features (None: from pixel_values)
    prompts: list[str]
    targets: list[str]
    split_target: list[bool]
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W) for a trained encoder (VisionInFront)

    @classmethod
    def captions(cls, image_embeds: torch.Tensor, captions: list[str], prompt: str) -> Stage2Batch:
        count = len(captions)
        return cls(image_embeds, [prompt] * count, list(captions), [True] * count)


@dataclass
class Stage2Losses:
    lm: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.lm

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"lm": self.lm}


def prompt_and_target(
    sample: Sample, caption_prompt: str, vqa_prompt: str, templates: bool
) -> tuple[str, str]:
    """What a training sample gives the LLM, and what it learns: an instruction and its
    response; a question (in ``vqa_prompt``) and its answer; or the caption prompt and the
    caption. ``templates``: questions and captions as instructions from the built-in templates."""
    if sample.instruction is not None:
        return sample.instruction, sample.answer or ""
    if sample.question is not None:
        prompt = question_instruction(sample) if templates else vqa_prompt.format(sample.question)
        return prompt, sample.answer or ""
    return caption_instruction(sample) if templates else caption_prompt, sample.captions[0]


def read_stage2_samples(config: RunConfig, bad: BadSampleLog) -> list[Sample]:
    """Stage 2's training samples: the captions (unless ``data.captions`` is off), the VQA
    questions and the instruction table, each where configured."""
    data = config.data
    samples = read_caption_samples(data, bad) if data.captions else []
    samples += read_vqa_training_samples(data, bad)
    if data.instructions:
        samples += read_instruction_table(resolve_embedded_path(data.instructions), bad)
    if not samples:
        raise UsageError(
            "data.captions is off and there are no VQA questions or instructions to train on"
        )
    return samples


def split_for_prefix_lm(caption: str, generator: torch.Generator) -> tuple[str, str]:
    """(prefix, suffix) at a random word boundary; the suffix keeps at least one word."""
    words = caption.split()
    if len(words) < 2:
        return "", caption
    cut = int(torch.randint(0, len(words), (1,), generator=generator))
    return " ".join(words[:cut]), " ".join(words[cut:])


def join_prompt(prompt: str, text: str) -> str:
    return f"{prompt} {text}".strip() if prompt else text


class PromptedLM(nn.Module):
    """The frozen LLM reading ``[soft prompt; token embeddings]``: the embedding lookup and the
    LLM in one module, so that FSDP can shard all of the LLM's weights as one unit."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm  # frozen: requires_grad False, eval mode

    def forward(
        self,
        soft_prompt: torch.Tensor,  # (B, Q, D)
        input_ids: torch.Tensor,  # (B, T) the (encoder) text after the soft prompt
        attention_mask: torch.Tensor,  # (B, T)
        labels: torch.Tensor,  # (B, Q + T) decoder-only; (B, T') decoder targets otherwise
    ) -> torch.Tensor:
        embeds, full_mask = soft_prompt_inputs(self.llm, soft_prompt, input_ids, attention_mask)
        # No KV cache in training: nothing reads it, and a block recomputed by activation
        # checkpointing would append its keys/values a second time.
        output = self.llm(
            inputs_embeds=embeds, attention_mask=full_mask, labels=labels, use_cache=False
        )
        return output.loss


class Stage2Objective(nn.Module):
    """Language-modelling loss of the frozen LLM given the soft visual prompt."""

    def __init__(
        self,
        bridge: Stage2Model,
        llm: LanguageModel,
        tokenizer,
        *,
        max_text_len: int,
        generator: torch.Generator | None = None,
        qformer_tokenizer=None,
    ) -> None:
        super().__init__()
        self.bridge = bridge
        self.qformer_tokenizer = qformer_tokenizer  # an instruction-aware bridge's
        self.prompted_lm = PromptedLM(llm.model)
        self.family = llm.family
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.generator = generator or torch.Generator()

    def train(self, mode: bool = True) -> Stage2Objective:
        super().train(mode)
        self.prompted_lm.eval()  # frozen: no dropout in the LLM, as in BLIP-2
        return self

    def forward(self, batch: Stage2Batch) -> Stage2Losses:
        soft_prompt = instructed_soft_prompt(  # (B, Q, D)
            self.bridge, batch.image_embeds, batch.prompts, self.qformer_tokenizer
        )
        if self.family == "decoder-only":
            return Stage2Losses(self._decoder_only_loss(soft_prompt, batch))
        return Stage2Losses(self._encoder_decoder_loss(soft_prompt, batch))

    def _tokens(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokenizer.padding_side = "right"
        encoded = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def _decoder_only_loss(self, soft_prompt: torch.Tensor, batch: Stage2Batch) -> torch.Tensor:
        texts = [
            join_prompt(prompt, target) + "\n"
            for prompt, target in zip(batch.prompts, batch.targets, strict=True)
        ]
        input_ids, mask = self._tokens(texts, soft_prompt.device)
        labels = input_ids.masked_fill(mask == 0, -100)
        for row, prompt in enumerate(batch.prompts):
            # the text prompt (with BOS) is given, not learned
            labels[row, : len(self.tokenizer(prompt).input_ids) if prompt else 0] = -100
        query_labels = torch.full(soft_prompt.shape[:2], -100, device=labels.device)
        labels = torch.cat([query_labels, labels], dim=1)  # (B, Q + T): queries are not learned
        return self.prompted_lm(soft_prompt, input_ids, mask, labels)

    def _encoder_decoder_loss(self, soft_prompt: torch.Tensor, batch: Stage2Batch) -> torch.Tensor:
        encoder_texts, decoder_texts = [], []
        for prompt, target, split in zip(
            batch.prompts, batch.targets, batch.split_target, strict=True
        ):
            prefix, suffix = split_for_prefix_lm(target, self.generator) if split else ("", target)
            encoder_texts.append(join_prompt(prompt, prefix))
            decoder_texts.append(suffix)
        encoder_ids, encoder_mask = self._tokens(encoder_texts, soft_prompt.device)
        target_ids, target_mask = self._tokens(decoder_texts, soft_prompt.device)
        labels = target_ids.masked_fill(target_mask == 0, -100)
        return self.prompted_lm(soft_prompt, encoder_ids, encoder_mask, labels)


# --------------------------------------------------------------------------------------------
# The recipe


def _is_our_checkpoint(path: Path) -> bool:
    """A run or checkpoint directory of this package (not a transformers/LAVIS weight file)."""
    return (path / checkpoint.MANIFEST).is_file() or bool(checkpoint.list_checkpoints(path))


def own_checkpoint(init: Path | None) -> Path | None:
    """The checkpoint directory of an ``--init`` run or checkpoint of this package (None for
    no init or an external weight file)."""
    if init is None or not _is_our_checkpoint(Path(init)):
        return None
    return checkpoint.resolve_checkpoint(Path(init))


def _touched(given: set[str], key: str) -> bool:
    """Whether the command line set ``key`` or a key below it."""
    return any(name == key or name.startswith(f"{key}.") for name in given)


def inherit_init_vision(config: RunConfig, init: Path | None, given: set[str]) -> RunConfig:
    """Stage 2 ``--init RUN``: the vision encoder and image size that RUN was trained with.

    The Q-Former learned to read one encoder's features of images under one transform; another
    encoder (the default, say) would feed it features it has never seen. Settings from a config
    file yield to the run's; ones ``given`` on the command line (``--vision-model``,
    ``--set model.vision.*``, ``--set data.image_size``) must agree with it or are refused.
    """
    if init is None or not _is_our_checkpoint(Path(init)):
        return config
    directory = checkpoint.resolve_checkpoint(Path(init))
    recorded = trained_vision(checkpoint.load_meta(directory).run)
    if recorded is None:
        return config
    vision, image_size = recorded
    if _touched(given, "model.vision") and not same_backbone(config.model.vision, vision):
        raise UsageError(
            f"--vision-model/model.vision ({config.model.vision.model or 'from config'}) is not "
            f"the vision encoder {directory} was trained on ({vision.model}): stage 2 --init "
            "uses that one; drop the option"
        )
    if _touched(given, "data.image_size") and config.data.image_size != image_size:
        trained = image_size or "the encoder's own"
        raise UsageError(
            f"data.image_size {config.data.image_size} is not the image size {directory} was "
            f"trained with ({trained}): stage 2 --init uses that one; drop the option"
        )
    config.model.vision = vision
    config.data.image_size = image_size
    return config


def init_bridge(bridge: Stage2Model, path: Path) -> LoadReport:
    """Q-Former weights from a stage-1 checkpoint (text parts dropped) or an external file."""
    if _is_our_checkpoint(Path(path)):
        directory = checkpoint.resolve_checkpoint(Path(path))
        weights = checkpoint.load_weights(directory)
        own = bridge.state_dict()
        report = LoadReport()
        for key, value in weights.items():
            if key not in own:
                report.ignored.append(key)  # stage-1 text parts and heads
                continue
            if own[key].shape != value.shape:  # e.g. stage 1 read a vision encoder of another width
                raise CheckpointError(
                    f"{directory}: {key} is {tuple(value.shape)} there but "
                    f"{tuple(own[key].shape)} in this stage-2 model (other model.qformer or "
                    "model.vision settings than the run it comes from)"
                )
            own[key].copy_(value)
            report.loaded.append(key)
        report.missing = [key for key in own if key not in weights]
        return report
    return load_external_weights(bridge, Path(path))


def _save_llm_memory(
    config: RunConfig,
    objective: Stage2Objective,
    device: torch.device,
    ranks: Ranks,
    report: Callable[[str], None],
) -> None:
    """Activation checkpointing, then FSDP2 sharding of the frozen LLM, as configured."""
    llm = objective.prompted_lm.llm
    checkpointed = checkpoint_activations(llm) if config.train.activation_checkpointing else 0
    sharded = 0
    if config.train.fsdp:
        sharded = shard_frozen_lm(objective, objective.prompted_lm, llm, device)
    if checkpointed or sharded:
        report(describe(ranks, sharded, checkpointed))


def build_stage2_recipe(
    config: RunConfig,
    device: torch.device,
    ranks: Ranks,
    report: Callable[[str], None],
    init: Path | None = None,
) -> StageRecipe:
    dtype = PRECISION_DTYPES[config.train.precision]
    vision = load_vision(config, device, own_checkpoint(init))
    if vision.trains:
        report(describe_vision_training(vision, config.train))
    llm = build_language_model(config.model.llm, dtype=dtype)
    llm.model.to(device)
    tokenizer = load_llm_tokenizer(config.model.llm.model)
    instruct = config.model.instruction_aware
    # an instruction-aware Q-Former embeds the prompt: its vocabulary is its tokenizer's
    qformer_tokenizer = load_qformer_tokenizer(config.model.bert) if instruct else None
    qformer_config = fitted_qformer_config(config, vision.hidden_size, qformer_tokenizer)
    torch.manual_seed(config.train.seed)
    bridge = Stage2Model(
        qformer_config,
        llm.embedding_dim,
        config.model.llm_proj_init_std,
        instruction_aware=instruct,
    )
    bert = Path(resolve_model_name(config.model.bert))
    source = init or bert
    if instruct and init is not None:  # the text parts a plain stage-2 run has not: from BERT
        load_external_weights(bridge, bert)
        loaded = init_bridge(bridge, source)
        from_bert = f"; {len(loaded.missing)} more from {config.model.bert}" * bool(loaded.missing)
        report(f"Q-Former init from {source}: {len(loaded.loaded)} tensors{from_bert}")
    else:
        loaded = init_bridge(bridge, source)
        report(f"Q-Former init from {source}: {loaded.summary()}")
    bridge.to(device)

    bad = BadSampleLog(skip=config.data.skip_bad_samples)
    samples = read_stage2_samples(config, bad)
    loader = build_train_loader(config, samples, bad, ranks)
    generator = torch.Generator().manual_seed(config.train.seed + ranks.rank)
    objective = Stage2Objective(
        bridge,
        llm,
        tokenizer,
        max_text_len=config.model.max_text_len,
        generator=generator,
        qformer_tokenizer=qformer_tokenizer,
    )

    _save_llm_memory(config, objective, device, ranks, report)

    caption_prompt = config.generate.prompt
    vqa_prompt = config.data.vqa_prompt
    templates = bool(config.data.instruction_templates)

    def prepare(batch) -> Stage2Batch:
        features, pixels = batch_images(vision, batch.images, device, config.train.precision)
        texts = [prompt_and_target(s, caption_prompt, vqa_prompt, templates) for s in batch.samples]
        return Stage2Batch(
            features,
            [prompt for prompt, _ in texts],
            [target for _, target in texts],
            [not s.answer for s in batch.samples],  # captions are split for prefix LM
            pixel_values=pixels,
        )

    return StageRecipe(
        name="stage2",
        objective=VisionInFront(vision, objective) if vision.trains else objective,
        vision=carried_vision(vision, own_checkpoint(init)),
        trainable=bridge,
        prepare=prepare,
        loader=loader,
        checkpoint_meta=checkpoint.CheckpointMeta(
            stage=2,
            qformer=qformer_config,
            run=config.to_dict(),
            llm_family=llm.family,
            llm_embedding_dim=llm.embedding_dim,
        ),
        generators={"prefix_split": generator},
        validate=_validator(config, vision, bridge, llm, tokenizer, qformer_tokenizer)
        if config.train.eval_every
        else None,
        best_metric=best_metric(2, config),
    )


def _validator(
    config: RunConfig,
    vision: Any,
    bridge: Stage2Model,
    llm: LanguageModel,
    tokenizer: Any,
    qformer_tokenizer: Any,
) -> Validator:
    """Caption CIDEr with the parts being trained, as `caption` would run them."""
    from qformer_cli.pretrained import Stage2Pipeline

    pipeline = Stage2Pipeline(
        vision=vision,
        bridge=bridge,
        llm=llm,
        tokenizer=tokenizer,
        image_transform=image_transform_config(config),
        directory=Path("."),
        prompt=config.generate.prompt,
        qformer_tokenizer=qformer_tokenizer,
    )
    return stage2_validator(pipeline, config)
