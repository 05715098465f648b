"""Memory for a large frozen LLM in stage 2: FSDP2 sharding and activation checkpointing.

The LLM is frozen, so it has no gradients or optimizer state; what it costs is its weights and
the activations that backward needs to carry gradients through it to the soft prompt.

- ``--fsdp`` shards the LLM's weights across the processes with FSDP2
  (``torch.distributed.fsdp.fully_shard``): one unit per transformer block (the classes the model
  names in ``_no_split_modules``) and one for the rest (embeddings, final norm, LM head), each
  all-gathered just before it runs and freed after. The small trainable bridge stays replicated
  under DDP, which is told to leave the sharded weights alone.
- ``--activation-checkpointing`` recomputes each LLM block's activations in backward instead of
  keeping them (torch's non-reentrant checkpointing; transformers' own switch only acts in train
  mode, and the frozen LLM runs in eval mode).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from qformer_cli.errors import UsageError
from qformer_cli.runtime import Ranks


def block_classes(llm: nn.Module) -> tuple[type[nn.Module], ...]:
    """The LLM's transformer block classes (what transformers never splits across devices)."""
    names = set(getattr(llm, "_no_split_modules", None) or [])
    classes = {type(module) for module in llm.modules() if type(module).__name__ in names}
    if not classes:
        raise UsageError(
            f"{type(llm).__name__} names no transformer block classes (_no_split_modules): "
            "cannot shard or checkpoint it block by block"
        )
    return tuple(classes)


def checkpoint_activations(llm: nn.Module) -> int:
    """Recompute every block's activations in backward; returns how many blocks were wrapped."""
    classes = block_classes(llm)
    apply_activation_checkpointing(llm, check_fn=lambda module: isinstance(module, classes))
    return sum(isinstance(module, classes) for module in llm.modules())


def shard_frozen_lm(
    owner: nn.Module, prompted_lm: nn.Module, llm: nn.Module, device: torch.device
) -> int:
    """Shard ``prompted_lm`` (a child of ``owner`` that holds ``llm`` and runs its embedding
    lookup) with FSDP2 across all processes: a unit per block of ``llm``, then the rest. DDP on
    ``owner`` then skips those parameters and buffers. Returns the number of sharded blocks."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    classes = block_classes(llm)
    blocks = [module for module in prompted_lm.modules() if isinstance(module, classes)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(prompted_lm, mesh=mesh)
    prefix = next(name for name, module in owner.named_modules() if module is prompted_lm)
    ignored = [f"{prefix}.{name}" for name, _ in prompted_lm.named_parameters()]
    ignored += [f"{prefix}.{name}" for name, _ in prompted_lm.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(owner, ignored)
    return len(blocks)


def describe(ranks: Ranks, sharded_blocks: int, checkpointed_blocks: int) -> str:
    parts = []
    if sharded_blocks:
        parts.append(f"LLM sharded with FSDP2 over {ranks.world_size} processes "
                     f"({sharded_blocks} blocks + the rest)")  # fmt: skip
    if checkpointed_blocks:
        parts.append(f"activation checkpointing on {checkpointed_blocks} LLM blocks")
    return "; ".join(parts)
