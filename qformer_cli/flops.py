"""FLOP counting: torch's FlopCounterMode, with attention counted on CPU too.

FlopCounterMode has formulas for the CUDA SDPA kernels but not for the CPU flash kernel, so on
CPU every attention would count as 0 FLOPs. torch's own SDPA formulas are registered for the CPU
kernels, so a model using SDPA is counted like one with explicit attention matmuls (LAVIS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(
        grad_out_shape, query_shape, key_shape, value_shape
    )


def cpu_sdpa_formulas() -> dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward_flops
    return formulas


def count_flops(fn: Callable[[], object]) -> tuple[float, Any]:
    """(FLOPs of one call of ``fn``, its return value)."""
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_formulas()) as counter:
        result = fn()
    return float(counter.get_total_flops()), result
