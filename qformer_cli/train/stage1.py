"""One stage-1 step's objectives: ITC + ITM + ITG over a batch of frozen image features.

Work done once per batch and shared (``reuse=True``, the default):

* the image features' cross-attention keys/values (``ImageKV``) serve the ITC image pass and
  the ITM pass, whose 3B pairs index into them;
* the ITG pass reuses the queries' self-attention keys/values from the ITC image pass.

``reuse=False`` recomputes both, as a plain implementation does; ``bench/`` compares the two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qformer_cli import checkpoint
from qformer_cli.checkpoint import CheckpointMeta
from qformer_cli.config import RunConfig, Stage1Config
from qformer_cli.data import BadSampleLog, Sample
from qformer_cli.data.hard_negatives import HardNegativeIndex, read_hard_negatives
from qformer_cli.embedded import resolve_embedded_path
from qformer_cli.errors import CheckpointError, DataError, UsageError
from qformer_cli.losses import (
    ItcOutput,
    NegativeMining,
    common_width,
    gather_no_grad,
    gather_with_grad,
    global_sum,
    itc_loss,
    itg_loss,
    itg_targets,
    itm_loss,
    mine_hard_negatives,
    pad_width,
)
from qformer_cli.models.backbones import DEC_TOKEN, load_qformer_tokenizer, resolve_model_name
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.convert import load_external_weights
from qformer_cli.models.qformer import ImageKV, KeyValue
from qformer_cli.runtime import Ranks
from qformer_cli.train.common import (
    build_train_loader,
    fitted_qformer_config,
    read_caption_samples,
)
from qformer_cli.train.features import open_feature_cache
from qformer_cli.train.loop import StageRecipe
from qformer_cli.train.validation import best_metric, stage1_validator
from qformer_cli.train.vision import (
    VisionInFront,
    batch_images,
    carried_vision,
    describe_vision_training,
    load_vision,
)


@dataclass(frozen=True)
class ItcAccumulation:
    """The ITC features of every micro-batch of one optimizer step, computed once without
    gradients, so that each micro-batch's ITC still contrasts against the whole batch (as
    open_clip's gradient accumulation does). ``index`` is the micro-batch computed live."""

    image_feats: list[torch.Tensor]  # per micro-batch (b, Q, D), L2-normalized, no grad
    text_feats: list[torch.Tensor]  # per micro-batch (b, D)
    index: int


@dataclass(frozen=True)
class GivenNegatives:
    """ITM negatives chosen outside the objective (tests: the draws of a reference run), as
    global batch indices: ``image`` (B,) the negative image of each text, ``text`` (B,) the
    negative text of each image."""

    image: torch.Tensor
    text: torch.Tensor


@dataclass
class Stage1Batch:
    image_embeds: torch.Tensor | None  # (B, N, C) vision features (None: from pixel_values)
    input_ids: torch.Tensor  # (B, T), [CLS] first
    text_mask: torch.Tensor  # (B, T), 1 = real token
    image_ids: torch.Tensor  # (B,) int64; same id = same image (not a negative)
    # (B,) int64 caption fingerprints (caption_ids); same id = same text (not a negative either)
    text_ids: torch.Tensor | None = None
    itc_accumulation: ItcAccumulation | None = None  # set for gradient accumulation
    # ITG target tokens of the whole optimizer step (all ranks and micro-batches) over the
    # number of losses averaged into its gradient; None: this batch alone is the step.
    itg_tokens_per_loss: torch.Tensor | None = None
    given_negatives: GivenNegatives | None = None  # used instead of drawing ITM negatives
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W) for a trained encoder (VisionInFront)
    # stage1.itm_hard_negatives: rows whose caption has a listed negative, and its tokens
    listed_negatives: ListedNegatives | None = None


@dataclass(frozen=True)
class ListedNegatives:
    """The listed hard negative of each caption that has one (``stage1.itm_hard_negatives``),
    used as its image's ITM negative text instead of a drawn one."""

    listed: torch.Tensor  # (B,) bool: this row's caption has a listed negative
    input_ids: torch.Tensor  # (B, T') its tokens (rows without one: any text, unused)
    text_mask: torch.Tensor  # (B, T')


@dataclass
class Stage1Losses:
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor
    itm_weight: float = 1.0  # stage1.itm_weight

    @property
    def total(self) -> torch.Tensor:
        return self.itc + self.itm_weight * self.itm + self.itg  # BLIP-2: unweighted

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"itc": self.itc, "itm": self.itm, "itg": self.itg}


class Stage1Objective(nn.Module):
    """Wraps :class:`Stage1Model` so that one ``forward`` computes the three losses (and DDP,
    which hooks ``forward``, can wrap it). ``settings``: the ITC gradient, ITM negatives and
    temperature clamp (a resolved ``stage1`` config section; default: the tiny preset's, which
    are LAVIS's)."""

    def __init__(
        self,
        model: Stage1Model,
        dec_token_id: int,
        *,
        mining: NegativeMining = "sample",
        reuse: bool = True,
        settings: Stage1Config | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.dec_token_id = dec_token_id
        self.mining: NegativeMining = mining
        self.reuse = reuse
        self.settings = settings or Stage1Config().resolved("tiny")
        # Draws the uniforms of ``sample`` mining for the global batch; seeded alike on every
        # rank, which all draw the same count, so the negatives do not depend on the world size.
        self.generator: torch.Generator | None = None
        # The share of ITM negatives drawn uniformly (stage1.itm_negative_warmup), set before
        # each step by ``start_step``; a buffer, so that a compiled forward reads it as an input.
        device = next(model.parameters()).device
        self.register_buffer("uniform_share", torch.zeros((), device=device), persistent=False)

    def start_step(self, step: int) -> None:
        """Before optimizer step ``step`` (0-based): the uniform share of the ITM negatives,
        1 at step 0 falling linearly to 0 at ``itm_negative_warmup``."""
        warmup = self.settings.itm_negative_warmup
        if warmup:
            self.uniform_share.fill_(max(0.0, 1.0 - step / warmup))

    def forward(self, batch: Stage1Batch) -> Stage1Losses:
        ranks = Ranks.current()
        qformer = self.model.qformer
        image_kv = qformer.encode_image(batch.image_embeds)
        image_pass = qformer(image_kv=image_kv)  # ITC image side; keeps the queries' K/V
        image_feats = self.model.image_feats_from_queries(image_pass.query_output)
        text_feat = self.model.text_feat(batch.input_ids, batch.text_mask)
        if batch.itc_accumulation is None:
            itc = self._itc(image_feats, text_feat, self.model.temp, ranks)
        else:
            itc = self._accumulated_itc(image_feats, text_feat, batch.itc_accumulation, ranks)

        itm_logits = self._itm_logits(batch, image_kv, itc.sim_i2t, itc.sim_t2i, ranks)
        itg_logits = self._itg_logits(batch, image_pass.query_kv)
        tokens_per_loss = batch.itg_tokens_per_loss
        if tokens_per_loss is None:  # one batch per step: DDP averages R ranks' losses
            tokens_per_loss = global_sum(itg_targets(batch.text_mask), ranks) / ranks.world_size
        return Stage1Losses(
            itc=itc.loss,
            itm=itm_loss(itm_logits),
            itg=itg_loss(itg_logits, batch.input_ids, batch.text_mask, tokens_per_loss),
            itm_weight=self.settings.itm_weight,
        )

    def _itc(
        self, image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor, ranks: Ranks
    ) -> ItcOutput:
        return itc_loss(
            image_feats,
            text_feat,
            temp,
            ranks,
            gradient=self.settings.itc_gradient,
            temperature_clamp=self.settings.temperature_range,
        )

    @torch.no_grad()
    def accumulate(self, batches: list[Stage1Batch]) -> list[Stage1Batch]:
        """The micro-batches of one step, each carrying every micro-batch's ITC features and
        the ITG normalizer of the whole step (the trainer averages the J micro-batches' losses
        and DDP the R ranks' gradients: J * R losses share the step's target tokens)."""
        image_feats = [self.model.image_feats(b.image_embeds) for b in batches]
        text_feats = [self.model.text_feat(b.input_ids, b.text_mask) for b in batches]
        ranks = Ranks.current()
        local_targets = torch.stack([itg_targets(b.text_mask) for b in batches]).sum()
        tokens_per_loss = global_sum(local_targets, ranks) / (ranks.world_size * len(batches))
        return [
            replace(
                b,
                itc_accumulation=ItcAccumulation(image_feats, text_feats, index),
                itg_tokens_per_loss=tokens_per_loss,
            )
            for index, b in enumerate(batches)
        ]

    def _accumulated_itc(
        self,
        image_feats: torch.Tensor,
        text_feat: torch.Tensor,
        accumulation: ItcAccumulation,
        ranks: Ranks,
    ) -> ItcOutput:
        """ITC over all J micro-batches, with gradients through this one's features only.

        Summed over the J micro-batches, the gradients equal those of one batch of J times the
        size: each pass sends this micro-batch's features the full loss's gradient (the trainer
        divides every micro-batch's loss by J, so it is scaled by J here) and the temperature
        1/J of its gradient. ITM then mines negatives within this micro-batch only: its rows
        and, on every rank, its columns of the similarity matrices.
        """
        count, index = len(accumulation.image_feats), accumulation.index
        size = image_feats.shape[0]
        all_image = torch.cat(
            [image_feats if k == index else f for k, f in enumerate(accumulation.image_feats)]
        )  # (J*b, Q, D)
        all_text = torch.cat(
            [text_feat if k == index else f for k, f in enumerate(accumulation.text_feats)]
        )  # (J*b, D)
        temp = self.model.temp
        temp = temp.detach() + (temp - temp.detach()) / count  # same value, 1/J of the gradient
        full = self._itc(all_image, all_text, temp, ranks)
        loss = full.loss.detach() + count * (full.loss - full.loss.detach())
        rows = slice(index * size, (index + 1) * size)
        per_rank = torch.arange(ranks.world_size, device=image_feats.device)[:, None] * count
        columns = (per_rank + index) * size + torch.arange(size, device=image_feats.device)
        columns = columns.flatten()  # (R*b,) this micro-batch's samples on every rank
        return ItcOutput(
            loss, full.sim_i2t[rows][:, columns].detach(), full.sim_t2i[rows][:, columns].detach()
        )

    def _itm_logits(
        self,
        batch: Stage1Batch,
        image_kv: ImageKV,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        ranks: Ranks,
    ) -> torch.Tensor:
        """(3B, 2) ITM logits for [positive; negative image; negative text] pairs."""
        size = batch.input_ids.shape[0]
        local = torch.arange(size, device=batch.input_ids.device)
        positive_index = local + ranks.rank * size
        if batch.given_negatives is None:
            mine = self._mine(batch, positive_index, ranks)
            negative_image = mine(sim_t2i)  # (B,) global index of a hard negative image per text
            negative_text = mine(sim_i2t)  # (B,) global index of a hard negative text per image
        else:
            negative_image = batch.given_negatives.image
            negative_text = batch.given_negatives.text

        # Each rank pads its captions to its own longest: gather at the global longest width
        # (one collective; what one process pads the whole batch to), padding being masked.
        width = common_width(batch.input_ids.shape[1], ranks, batch.input_ids.device)
        local_ids = pad_width(batch.input_ids, width, self.model.qformer.config.pad_token_id)
        local_mask = pad_width(batch.text_mask, width)
        all_ids = gather_no_grad(local_ids, ranks)  # (G, width)
        all_masks = gather_no_grad(local_mask, ranks)
        negative_ids, negative_mask = all_ids[negative_text], all_masks[negative_text]
        if batch.listed_negatives is not None:
            pad = self.model.qformer.config.pad_token_id
            negative_ids, negative_mask = _with_listed(
                negative_ids, negative_mask, batch.listed_negatives, pad
            )
            local_ids = pad_width(local_ids, negative_ids.shape[1], pad)
            local_mask = pad_width(local_mask, negative_ids.shape[1])
        input_ids = torch.cat([local_ids, local_ids, negative_ids])
        text_mask = torch.cat([local_mask, local_mask, negative_mask])
        pair_kv = self._pair_image_kv(batch, image_kv, negative_image, local, ranks)
        return self.model.itm_logits(pair_kv, input_ids, text_mask)

    def _mine(self, batch: Stage1Batch, positive_index: torch.Tensor, ranks: Ranks):
        all_image_ids = gather_no_grad(batch.image_ids, ranks)
        all_text_ids = None if batch.text_ids is None else gather_no_grad(batch.text_ids, ranks)

        def mine(similarity: torch.Tensor) -> torch.Tensor:
            uniforms = None
            if self.mining == "sample":  # one per sample of the global batch; this rank's rows
                uniforms = self._uniforms(similarity.shape[1], similarity.device)[positive_index]
            return mine_hard_negatives(
                similarity,
                batch.image_ids,
                all_image_ids,
                positive_index,
                self.mining,
                uniforms,
                text_ids=batch.text_ids,
                all_text_ids=all_text_ids,
                negatives=self.settings.itm_negatives,
                uniform_share=self.uniform_share if self.settings.itm_negative_warmup else None,
            )

        return mine

    def _uniforms(self, count: int, device: torch.device) -> torch.Tensor:
        """(count,) float64 uniforms in [0, 1) from the negatives' generator (the global RNG
        without one); generators live on the training device."""
        generator = self.generator
        on = generator.device if generator is not None else device
        return torch.rand(count, generator=generator, dtype=torch.float64, device=on).to(device)

    def _pair_image_kv(
        self,
        batch: Stage1Batch,
        image_kv: ImageKV,
        negative_image: torch.Tensor,
        local: torch.Tensor,
        ranks: Ranks,
    ) -> ImageKV:
        """Image K/V for the 3B ITM pairs, images ordered [positive; negative; positive]."""
        qformer = self.model.qformer
        if ranks.world_size == 1:
            if self.reuse:
                return image_kv.index_select(torch.cat([local, negative_image, local]))
            images = batch.image_embeds
            negatives = images.index_select(0, negative_image)  # deterministic: ImageKV's why
            return qformer.encode_image(torch.cat([images, negatives, images]))
        # Negatives may live on other ranks: gather the features and encode only the B chosen
        # ones here, rather than gathering every rank's K/V. Frozen features need no gradient;
        # a trained encoder's get it back on the rank that computed them (as LAVIS gathers).
        images = batch.image_embeds
        gather = gather_with_grad if images.requires_grad else gather_no_grad
        negatives = qformer.encode_image(gather(images, ranks).index_select(0, negative_image))
        if self.reuse:
            return ImageKV.cat([image_kv, negatives, image_kv])
        fresh = qformer.encode_image(batch.image_embeds)
        return ImageKV.cat([fresh, negatives, qformer.encode_image(batch.image_embeds)])

    def _itg_logits(self, batch: Stage1Batch, query_kv: list[KeyValue]) -> torch.Tensor:
        """(B, T, V) LM logits of the [DEC]-prefixed text, causal, seeing all queries."""
        decoder_ids = batch.input_ids.clone()
        decoder_ids[:, 0] = self.dec_token_id
        if self.reuse:
            return self.model.itg_logits(decoder_ids, batch.text_mask, past_query_kv=query_kv)
        image_kv = self.model.qformer.encode_image(batch.image_embeds)
        return self.model.itg_logits(decoder_ids, batch.text_mask, image_kv=image_kv)


def _with_listed(
    drawn_ids: torch.Tensor, drawn_mask: torch.Tensor, listed: ListedNegatives, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) negative texts: the listed negative on the rows that have one, else the drawn
    one; both padded (with ``pad``) to the wider of the two."""
    width = max(drawn_ids.shape[1], listed.input_ids.shape[1])
    ids = torch.where(
        listed.listed[:, None],
        pad_width(listed.input_ids, width, pad),
        pad_width(drawn_ids, width, pad),
    )
    mask = torch.where(
        listed.listed[:, None], pad_width(listed.text_mask, width), pad_width(drawn_mask, width)
    )
    return ids, mask


# --------------------------------------------------------------------------------------------
# The stage-1 recipe: model, tokenizer, frozen encoder, data -> the shared training loop.


def caption_ids(captions: list[str], device: torch.device) -> torch.Tensor:
    """(B,) int64 fingerprints of the caption texts, equal on every rank for equal texts.

    Synthetic and templated data sets (and real ones: "a man riding a wave on a surfboard")
    caption different images word for word alike; such a pair is not an ITM negative.
    """
    digests = [hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest() for text in captions]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], device=device)


def tokenize(tokenizer, texts: list[str], max_len: int, device: torch.device) -> tuple:
    encoded = tokenizer(
        texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt"
    )
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def image_number(sample: Sample) -> int:
    """A number naming the sample's image, equal for its captions on every rank (ITC does not
    take another caption of the same image as a negative); from its source and id, so that
    streamed samples need no index of the whole set and equal ids of two sources differ."""
    digest = hashlib.blake2b(f"{sample.source}\0{sample.image_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def read_hard_negative_index(config: RunConfig) -> HardNegativeIndex | None:
    """``stage1.itm_hard_negatives``'s pairs, by image file name and caption (None: unset)."""
    if not config.stage1.itm_hard_negatives:
        return None
    path = resolve_embedded_path(config.stage1.itm_hard_negatives)
    return HardNegativeIndex(read_hard_negatives(path))


@dataclass
class ListedNegativeTally:
    """Streamed training captions seen and those with a listed negative, on this rank."""

    seen: int = 0
    matched: int = 0

    def check(self, path: str, device: torch.device, ranks: Ranks) -> None:
        """After a streamed run: refused (exit 1; its checkpoints stay) when no caption it read,
        on any rank, was listed: it trained as if ``stage1.itm_hard_negatives`` were unset."""
        counts = torch.tensor([self.seen, self.matched], device=device)
        if ranks.world_size > 1:
            torch.distributed.all_reduce(counts)
        seen, matched = (int(n) for n in counts.tolist())
        if seen and not matched:
            raise DataError(
                f"{path}: none of the {seen} training captions this run streamed is listed "
                "(matched by image file name and caption text): it trained as if "
                "stage1.itm_hard_negatives were unset; its checkpoints are kept"
            )


def describe_listed_negatives(
    index: HardNegativeIndex, samples: list[Sample], config: RunConfig
) -> str:
    """How many training captions have a listed negative, for the log. A file that lists none
    of them is refused: the run would train as if the setting were unset (streamed captions are
    only known as they are read: ``ListedNegativeTally`` checks those after the run)."""
    path = config.stage1.itm_hard_negatives
    if config.data.streaming:
        return f"ITM negative texts: {len(index)} captions listed in {path}, matched as read"
    matched = sum(index.of(sample, sample.captions[0]) is not None for sample in samples)
    if not matched:
        raise DataError(
            f"{path}: none of its {len(index)} listed captions is a training caption "
            "(matched by image file name and caption text)"
        )
    return f"ITM negative texts: {matched} of {len(samples)} training captions listed in {path}"


def batch_listed_negatives(
    negatives: HardNegativeIndex | None,
    samples: list[Sample],
    captions: list[str],
    tokenize_texts: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    tally: ListedNegativeTally,
) -> ListedNegatives | None:
    """The batch's listed negatives, one per caption that has one (None: none configured)."""
    if negatives is None:
        return None
    found = [negatives.of(s, c) for s, c in zip(samples, captions, strict=True)]
    tally.seen += len(found)
    tally.matched += sum(text is not None for text in found)
    input_ids, text_mask = tokenize_texts([text or "" for text in found])
    listed = torch.tensor([text is not None for text in found], device=input_ids.device)
    return ListedNegatives(listed, input_ids, text_mask)


def _init_stage1(model: Stage1Model, config: RunConfig, init: Path | None) -> str:
    """Load the initial weights: a stage-1 checkpoint's (all of them: fine-tuning), else BERT's
    for the Q-Former (pre-training); returns what was loaded, for the log."""
    if init is None:
        loaded = load_external_weights(model, Path(resolve_model_name(config.model.bert)))
        return f"Q-Former init from {config.model.bert}: {loaded.summary()}"
    saved = checkpoint.load_meta(init)
    if saved.stage != 1:
        raise UsageError(f"{init}: a stage-{saved.stage} checkpoint; stage 1 starts from stage 1")
    weights = checkpoint.load_weights(init)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{init}: weights do not fit this stage-1 model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    return f"stage-1 init from {init}: all {len(weights)} tensors"


def build_stage1_recipe(
    config: RunConfig,
    device: torch.device,
    ranks: Ranks,
    report: Callable[[str], None],
    init: Path | None = None,
) -> StageRecipe:
    """Stage 1 from BERT, or (``init``: a stage-1 checkpoint directory) from a stage-1 run."""
    init = checkpoint.resolve_checkpoint(Path(init)) if init is not None else None
    # read first: a bad file fails before any model loads
    hard_negative_index = read_hard_negative_index(config)
    # A feature cache is checked first (configs only), and then no encoder is loaded at all.
    cache = open_feature_cache(config) if config.data.features else None
    bad = BadSampleLog(skip=config.data.skip_bad_samples)
    samples = read_caption_samples(config.data, bad)
    tally = ListedNegativeTally()
    if hard_negative_index is not None:
        report(describe_listed_negatives(hard_negative_index, samples, config))
    tokenizer = load_qformer_tokenizer(config.model.bert)
    vision = None if cache else load_vision(config, device, init)
    if vision is not None and vision.trains:
        report(describe_vision_training(vision, config.train))
    vision_width = cache.encoder_width if cache else vision.hidden_size
    qformer_config = fitted_qformer_config(config, vision_width, tokenizer)
    torch.manual_seed(config.train.seed)
    model = Stage1Model(qformer_config, head_init=config.stage1.head_init)
    report(_init_stage1(model, config, init))
    model.to(device)

    loader = build_train_loader(config, samples, bad, ranks, features=cache)
    if cache:
        report(f"training on cached features from {cache.directory} ({cache.dtype}; no images)")
    # The same seed on every rank: each draws the global batch's uniforms (see _mine).
    generator = torch.Generator(device=device).manual_seed(config.train.seed)
    objective = Stage1Objective(
        model, tokenizer.convert_tokens_to_ids(DEC_TOKEN), settings=config.stage1
    )
    objective.generator = generator

    def tokenize_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(tokenizer, texts, config.model.max_text_len, device)

    def prepare(batch) -> Stage1Batch:
        input_ids, text_mask = tokenize_texts(batch.captions)
        ids = torch.tensor([image_number(s) for s in batch.samples], device=device)
        pixels = None
        if vision is None:  # (B, N, C) cached features
            features = batch.images.to(device)
        else:
            features, pixels = batch_images(vision, batch.images, device, config.train.precision)
        return Stage1Batch(
            features,
            input_ids,
            text_mask,
            ids,
            caption_ids(batch.captions, device),
            pixel_values=pixels,
            listed_negatives=batch_listed_negatives(
                hard_negative_index, batch.samples, batch.captions, tokenize_texts, tally
            ),
        )

    def save_tokenizer(directory: Path) -> None:
        tokenizer.save_pretrained(directory / "tokenizer")

    validate = None
    if config.train.eval_every:  # (preflight refused it with a feature cache: vision is loaded)
        validate = stage1_validator(model, vision, tokenizer, config, device)

    def check_result() -> None:
        if hard_negative_index is not None and config.data.streaming:
            tally.check(config.stage1.itm_hard_negatives, device, ranks)

    trains = vision is not None and vision.trains
    return StageRecipe(
        name="stage1",
        objective=VisionInFront(vision, objective) if trains else objective,
        vision=carried_vision(vision, init),
        trainable=model,
        prepare=prepare,
        loader=loader,
        checkpoint_meta=CheckpointMeta(stage=1, qformer=qformer_config, run=config.to_dict()),
        save_extra=save_tokenizer,
        accumulate=objective.accumulate,
        generators={"negatives": generator},
        start_step=objective.start_step,
        validate=validate,
        best_metric=best_metric(1, config),
        check_result=check_result,
    )
