"""The vision encoder in training: frozen (pre-training), or fine-tuned with the Q-Former.

With ``train.vision_lr > 0`` (the paper's fine-tuning for captioning, VQA and retrieval) the
tower is held in fp32 and trained with the Q-Former: the batch then carries pixels, and
:class:`VisionInFront` runs the tower inside the objective's forward, under autocast and
autograd (and DDP, which then averages its gradients too). Its parameters are an optimizer group
of their own, at ``vision_lr`` times the schedule's factor, optionally decayed layer by layer.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)

from qformer_cli import checkpoint
from qformer_cli.config import RunConfig, TrainConfig
from qformer_cli.errors import UsageError
from qformer_cli.models.backbones import VisionEncoder, build_vision_encoder
from qformer_cli.pretrained import checkpoint_vision
from qformer_cli.runtime import PRECISION_DTYPES, autocast


def load_vision(config: RunConfig, device: torch.device, init: Path | None = None) -> VisionEncoder:
    """The vision encoder a stage trains against: the configured tower, with the weights of an
    ``init`` checkpoint that fine-tuned it; frozen and held in the training precision, or, with
    ``train.vision_lr > 0``, trained and held in fp32."""
    trains = config.train.trains_vision
    dtype = torch.float32 if trains else PRECISION_DTYPES[config.train.precision]
    if init is not None and (init / checkpoint.VISION_WEIGHTS).is_file():
        vision = checkpoint_vision(config, init, dtype)
    else:
        vision = build_vision_encoder(config.model.vision, dtype=dtype)
    if trains:
        vision.unfreeze()
        if config.train.vision_checkpointing:
            blocks = {id(block) for block in transformer_blocks(vision.model)}
            apply_activation_checkpointing(vision.model, check_fn=lambda m: id(m) in blocks)
    return vision.to(device)


def transformer_blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's transformer blocks, input to output: its longest ``ModuleList`` of modules of
    one class (``_no_split_modules`` also names embeddings and attention inside the blocks)."""
    lists = [
        list(module)
        for module in tower.modules()
        if isinstance(module, nn.ModuleList) and len({type(child) for child in module}) == 1
    ]
    if not lists:
        raise UsageError(f"{type(tower).__name__}: no list of transformer blocks found")
    return max(lists, key=len)


def carried_vision(vision: VisionEncoder | None, init: Path | None) -> VisionEncoder | None:
    """The encoder whose weights a run's checkpoints must carry: one it trains, or one an
    ``init`` checkpoint fine-tuned (frozen here, still not the configured tower's weights)."""
    if vision is None:
        return None
    inherited = init is not None and (init / checkpoint.VISION_WEIGHTS).is_file()
    return vision if vision.trains or inherited else None


@torch.no_grad()
def image_features(
    vision: VisionEncoder, pixel_values: torch.Tensor, device: torch.device, precision: str
) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, C) frozen features, run once per batch without autograd."""
    dtype = next(vision.parameters()).dtype
    with autocast(device, precision):
        return vision(pixel_values.to(device=device, dtype=dtype))


def batch_images(
    vision: VisionEncoder, pixel_values: torch.Tensor, device: torch.device, precision: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch's (image_embeds, pixel_values): frozen features computed now, or, for a trained
    encoder, the pixels that :class:`VisionInFront` encodes in the forward pass."""
    if vision.trains:
        return None, pixel_values.to(device)
    return image_features(vision, pixel_values, device, precision), None


class VisionInFront(nn.Module):
    """A stage's objective with the trained vision encoder in front: a batch's ``pixel_values``
    (B, 3, H, W) become its ``image_embeds`` (B, N, C) inside the forward pass."""

    def __init__(self, vision: VisionEncoder, objective: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.objective = objective

    def forward(self, batch: Any) -> Any:
        features = self.vision(batch.pixel_values)
        return self.objective(replace(batch, image_embeds=features, pixel_values=None))


def vision_param_groups(vision: VisionEncoder, config: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups for a trained tower: ``lr_scale`` (of the schedule's lr) is
    ``vision_lr / lr`` times ``vision_layer_decay ** depth``, where block i of L has depth
    L - i, what comes before the first block (embeddings, a pre-norm) L + 1 and what follows
    the last block 0 (LAVIS's layer-wise decay for ViTs); no weight decay on biases and norms."""
    blocks = transformer_blocks(vision.model)
    depth_of: dict[int, int] = {}  # id(param) -> depth
    for index, block in enumerate(blocks):
        for param in block.parameters():
            depth_of[id(param)] = len(blocks) - index
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    outside = len(blocks) + 1  # parameters before the first block (registration order), then 0
    for name, param in vision.model.named_parameters():
        if id(param) in depth_of:
            outside = 0
        if not param.requires_grad:
            continue
        depth = depth_of.get(id(param), outside)
        no_decay = param.ndim < 2 or "norm" in name
        groups.setdefault((depth, no_decay), []).append(param)
    base = (config.vision_lr or 0.0) / config.lr
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else config.weight_decay,
            "lr_scale": base * config.vision_layer_decay**depth,
        }
        for (depth, no_decay), params in sorted(groups.items())
    ]


def describe_vision_training(vision: VisionEncoder, config: TrainConfig) -> str:
    count = sum(p.numel() for p in vision.model.parameters() if p.requires_grad)
    decay = f", layer decay {config.vision_layer_decay:g}" if config.vision_layer_decay < 1 else ""
    recompute = ", activations recomputed" if config.vision_checkpointing else ""
    return (
        f"vision encoder trained: {count:,} parameters in fp32 at lr {config.vision_lr or 0:g}"
        f"{decay}{recompute}"
    )
