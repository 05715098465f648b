"""One stage-1 step on a fixed batch, single-process or under ``torchrun`` (gloo, CPU).

Usage::

    python tests/distributed_step.py OUT.safetensors                       # 1 process, batch B
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_step.py OUT.safetensors
    python tests/distributed_step.py OUT.safetensors --itc-only --micro-batches 2
    python tests/distributed_step.py OUT.safetensors --itc-gradient lavis

``--micro-batches J`` splits each rank's share into J micro-batches trained with gradient
accumulation (``Stage1Objective.accumulate``); ``--itc-only`` backpropagates the ITC loss alone,
the one loss accumulation keeps equal to the whole batch's (ITM mines within a micro-batch).

Every process builds the same tiny :class:`Stage1Model` and the same global batch of
``GLOBAL_BATCH`` samples from fixed seeds; rank ``r`` of ``R`` keeps the contiguous rows
``r*B/R .. (r+1)*B/R``, because the losses gather features in rank order and offset the ITC
targets by ``rank * B/R``. After one forward + backward (through DDP when distributed), rank 0
writes the losses (averaged over ranks) and every parameter's gradient (DDP-averaged) to OUT
with ``safetensors``. ``tests/test_distributed.py`` compares the two runs.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from qformer_cli.config import Stage1Config, qformer_preset
from qformer_cli.losses import Ranks
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.train.stage1 import Stage1Batch, Stage1Objective

GLOBAL_BATCH = 8
IMAGE_TOKENS = 6
TEXT_LEN = 10
VOCAB_SIZE = 512  # the tiny preset's; the last id plays [DEC]
DEC_TOKEN_ID = VOCAB_SIZE - 1
CLS_TOKEN_ID = 1
PAD_TOKEN_ID = 0
# Real tokens per sample. Each half (a rank's share with 2 ranks) sums to the same count (34),
# so the token-mean ITG loss of each rank has the same weight as in the single-process mean.
TEXT_LENGTHS = (10, 7, 9, 8, 8, 10, 6, 10)
# Samples 1 and 5 show the same image from different ranks (cross-rank masking of ITM
# negatives), samples 6 and 7 the same image on one rank. Their features differ, as two
# augmentations of one image would, so no similarity ties make the hardest negative ambiguous.
IMAGE_IDS = (0, 1, 2, 3, 4, 1, 5, 5)
MODEL_SEED = 0
DATA_SEED = 1234


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


def local_slice(batch: Stage1Batch, ranks: Ranks) -> Stage1Batch:
    """Rank ``r``'s contiguous share: the rows the gathers place at ``r*B/R .. (r+1)*B/R``."""
    if GLOBAL_BATCH % ranks.world_size:
        raise ValueError(f"batch {GLOBAL_BATCH} does not split over {ranks.world_size} ranks")
    size = GLOBAL_BATCH // ranks.world_size
    rows = slice(ranks.rank * size, (ranks.rank + 1) * size)
    return Stage1Batch(
        image_embeds=batch.image_embeds[rows],
        input_ids=batch.input_ids[rows],
        text_mask=batch.text_mask[rows],
        image_ids=batch.image_ids[rows],
    )


def split(batch: Stage1Batch, count: int) -> list[Stage1Batch]:
    size = batch.input_ids.shape[0] // count
    return [
        Stage1Batch(
            image_embeds=batch.image_embeds[k * size : (k + 1) * size],
            input_ids=batch.input_ids[k * size : (k + 1) * size],
            text_mask=batch.text_mask[k * size : (k + 1) * size],
            image_ids=batch.image_ids[k * size : (k + 1) * size],
        )
        for k in range(count)
    ]


def forward_backward(
    model: nn.Module, objective: Stage1Objective, batch: Stage1Batch, micro: int, itc_only: bool
) -> dict[str, torch.Tensor]:
    """Loss values (averaged over micro-batches) after backward, as the trainer's step does."""
    batches = split(batch, micro)
    if micro > 1:
        batches = objective.accumulate(batches)
    totals: dict[str, torch.Tensor] = {}
    for micro_batch in batches:
        losses = model(micro_batch)
        # ITC alone, with the other losses at weight 0 so DDP still sees every parameter used
        loss = losses.itc + 0 * (losses.itm + losses.itg) if itc_only else losses.total
        (loss / micro).backward()
        values = {**losses.as_dict(), "total": losses.total}
        for key, value in values.items():
            totals[f"loss.{key}"] = totals.get(f"loss.{key}", 0) + value.detach() / micro
    return totals


def run_step(
    out_path: str, micro: int = 1, itc_only: bool = False, itc_gradient: str = "full"
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
    # distinct negatives: the hardest negative then skips same-image samples across ranks
    settings = Stage1Config(itc_gradient=itc_gradient, itm_negatives="distinct").resolved("tiny")
    objective = Stage1Objective(
        Stage1Model(config), DEC_TOKEN_ID, mining="hardest", settings=settings
    )
    # Wrapped the way train/loop.py wraps it (no find_unused_parameters), so a parameter the
    # step leaves unused would show up here as an un-averaged gradient.
    model: nn.Module = (
        nn.parallel.DistributedDataParallel(objective) if world_size > 1 else objective
    )

    batch = local_slice(global_batch(config.encoder_width), ranks)
    values = forward_backward(model, objective, batch, micro, itc_only)
    if world_size > 1:
        # Each rank's loss is a mean over its own equal share, so the mean over ranks is the
        # global-batch mean the single process computes.
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
    parser.add_argument("--itc-only", action="store_true")
    parser.add_argument("--itc-gradient", choices=["lavis", "full"], default="full")
    args = parser.parse_args()
    run_step(args.out, args.micro_batches, args.itc_only, args.itc_gradient)
