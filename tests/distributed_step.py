"""One stage-1 step on a fixed batch, single-process or under ``torchrun`` (gloo, CPU).

Usage::

    python tests/distributed_step.py OUT.safetensors                       # 1 process, batch B
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_step.py OUT.safetensors
    python tests/distributed_step.py OUT.safetensors --no-itm --micro-batches 2
    python tests/distributed_step.py OUT.safetensors --itc-gradient lavis

``--micro-batches J`` splits the global batch into J micro-batches trained with gradient
accumulation (``Stage1Objective.accumulate``); ``--no-itm`` backpropagates ITC and ITG only,
the losses accumulation keeps equal to the whole batch's (ITM mines within a micro-batch).

Every process builds the same tiny :class:`Stage1Model` and the same global batch of
``GLOBAL_BATCH`` samples from fixed seeds, and takes its part the way the trainer's sampler
deals it: each micro-batch of the global batch is split into R contiguous parts, rank ``r``
keeping the r-th (the losses gather in rank order and offset the ITC targets by rank). Captions
have unequal lengths, and each rank pads its micro-batches to their own longest caption, as the
tokenizer does, so ranks hold different widths and numbers of ITG target tokens. ITM negatives
are drawn with the default ``sample`` mining from a generator seeded alike on every rank.
After one forward + backward (through DDP when distributed), rank 0 writes the losses
(averaged over ranks) and every parameter's gradient (DDP-averaged) to OUT with
``safetensors``. ``tests/train/test_distributed.py`` compares the runs.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from qformer_cli.config import Stage1Config
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.config import qformer_preset
from qformer_cli.runtime import Ranks
from qformer_cli.train.stage1 import Stage1Batch, Stage1Objective

GLOBAL_BATCH = 8
IMAGE_TOKENS = 6
TEXT_LEN = 10
VOCAB_SIZE = 512  # the tiny preset's; the last id plays [DEC]
DEC_TOKEN_ID = VOCAB_SIZE - 1
CLS_TOKEN_ID = 1
PAD_TOKEN_ID = 0
# Real tokens per sample, unequal in every split the tests use: with 2 ranks the halves hold
# 30 and 17 ITG targets and pad to widths 10 and 6; with 2 micro-batches on 2 ranks, widths
# 10, 9, 6, 6 (a plain per-rank token mean would weigh the ranks' tokens unequally).
TEXT_LENGTHS = (10, 7, 9, 8, 6, 5, 6, 4)
# Samples 1 and 5 show the same image from different ranks (cross-rank masking of ITM
# negatives), samples 6 and 7 the same image on one rank. Their features differ, as two
# augmentations of one image would, so no similarity ties make the hardest negative ambiguous.
IMAGE_IDS = (0, 1, 2, 3, 4, 1, 5, 5)
MODEL_SEED = 0
DATA_SEED = 1234
NEGATIVES_SEED = 7


def global_batch(encoder_width: int) -> Stage1Batch:
    """The fixed global batch, identical on every rank."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    image_embeds = torch.randn(GLOBAL_BATCH, IMAGE_TOKENS, encoder_width, generator=generator)
    # Ordinary tokens avoid the special ids (pad 0, [CLS] 1, [DEC] last).
    input_ids = torch.randint(5, DEC_TOKEN_ID, (GLOBAL_BATCH, TEXT_LEN), generator=generator)
    input_ids[:, 0] = CLS_TOKEN_ID
    positions = torch.arange(TEXT_LEN)[None, :]
    text_mask = (positions < torch.tensor(TEXT_LENGTHS)[:, None]).long()
    input_ids = input_ids.masked_fill(text_mask == 0, PAD_TOKEN_ID)
    return Stage1Batch(
        image_embeds=image_embeds,
        input_ids=input_ids,
        text_mask=text_mask,
        image_ids=torch.tensor(IMAGE_IDS, dtype=torch.long),
    )


def rows_of(batch: Stage1Batch, rows: slice) -> Stage1Batch:
    """Rows ``rows`` of ``batch``, padded to their own longest caption (as tokenized alone)."""
    width = int(batch.text_mask[rows].sum(dim=1).max())
    return Stage1Batch(
        image_embeds=batch.image_embeds[rows],
        input_ids=batch.input_ids[rows, :width],
        text_mask=batch.text_mask[rows, :width],
        image_ids=batch.image_ids[rows],
    )


def local_micro_batches(batch: Stage1Batch, ranks: Ranks, micro: int) -> list[Stage1Batch]:
    """This rank's micro-batches: the r-th contiguous part of each of the global batch's
    ``micro`` micro-batches (what the sampler deals rank r from each global batch)."""
    if GLOBAL_BATCH % (ranks.world_size * micro):
        raise ValueError(f"batch {GLOBAL_BATCH} does not split into {ranks.world_size} x {micro}")
    size = GLOBAL_BATCH // (ranks.world_size * micro)
    starts = [(k * ranks.world_size + ranks.rank) * size for k in range(micro)]
    return [rows_of(batch, slice(start, start + size)) for start in starts]


def forward_backward(
    model: nn.Module, objective: Stage1Objective, batches: list[Stage1Batch], no_itm: bool
) -> dict[str, torch.Tensor]:
    """Loss values (averaged over micro-batches) after backward, as the trainer's step does."""
    micro = len(batches)
    if micro > 1:
        batches = objective.accumulate(batches)
    totals: dict[str, torch.Tensor] = {}
    for micro_batch in batches:
        losses = model(micro_batch)
        # ITM at weight 0 (DDP still sees every parameter used)
        loss = losses.itc + losses.itg + 0 * losses.itm if no_itm else losses.total
        (loss / micro).backward()
        values = {**losses.as_dict(), "total": losses.total}
        for key, value in values.items():
            totals[f"loss.{key}"] = totals.get(f"loss.{key}", 0) + value.detach() / micro
    return totals


def run_step(
    out_path: str, micro: int = 1, no_itm: bool = False, itc_gradient: str = "full"
) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    ranks = Ranks.current()

    # Dropout off: the two runs would otherwise draw different masks.
    config = qformer_preset(
        "tiny", vocab_size=VOCAB_SIZE, hidden_dropout=0.0, attention_dropout=0.0
    )
    torch.manual_seed(MODEL_SEED)
    # distinct negatives: same-image samples are skipped across ranks too
    settings = Stage1Config(itc_gradient=itc_gradient, itm_negatives="distinct").resolved("tiny")
    objective = Stage1Objective(
        Stage1Model(config), DEC_TOKEN_ID, mining="sample", settings=settings
    )
    objective.generator = torch.Generator().manual_seed(NEGATIVES_SEED)  # alike on every rank
    # Wrapped the way train/loop.py wraps it (no find_unused_parameters), so a parameter the
    # step leaves unused would show up here as an un-averaged gradient.
    model: nn.Module = (
        nn.parallel.DistributedDataParallel(objective) if world_size > 1 else objective
    )

    batches = local_micro_batches(global_batch(config.encoder_width), ranks, micro)
    values = forward_backward(model, objective, batches, no_itm)
    if world_size > 1:
        # Each rank's loss is its share of the global loss times R (ITC and ITM: a mean over
        # its equally many rows; ITG: its token sum over the global count / R), so the mean
        # over ranks is the global-batch loss the single process computes (as the trainer logs).
        for value in values.values():
            dist.all_reduce(value)
            value /= world_size
    # Names from the unwrapped objective, so both runs write the same keys.
    for name, param in objective.named_parameters():
        if param.grad is not None:
            values[f"grad.{name}"] = param.grad.detach()
    if ranks.rank == 0:
        tensors = {key: value.contiguous().clone() for key, value in values.items()}
        save_file(tensors, out_path, metadata={"world_size": str(world_size)})
    if world_size > 1:
        dist.barrier()  # nobody tears the group down while another rank still reduces
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--no-itm", action="store_true")
    parser.add_argument("--itc-gradient", choices=["lavis", "full"], default="full")
    args = parser.parse_args()
    run_step(args.out, args.micro_batches, args.no_itm, args.itc_gradient)
