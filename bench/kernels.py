"""Kernels per call, counted with torch's profiler: what a launch-bound step is made of.

On CUDA: every GPU activity the profiler records (kernels, memcpy, memset). On CPU there are no
launches to count, so the count is of the aten operators that do the work: the leaves of the
operator tree (an op that calls no other aten op), less those that only make views or allocate
(``NO_WORK_OPS``), which a GPU also runs without a kernel.

Imports only torch: ``bench/lavis_worker.py`` counts LAVIS's step the same way, in LAVIS's own
environment.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

NO_WORK_OPS = frozenset(
    "aten::" + name
    for name in (
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "reshape",
        "as_strided",
        "alias",
        "expand",
        "t",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "narrow",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "detach",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "empty",
        "empty_like",
        "empty_strided",
    )
)


def kernel_counts(fn: Callable[[], object], device: torch.device) -> Counter[str]:
    """Kernels of one call of ``fn`` by name (see the module's docstring for what counts)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = profiler.events()
    if device.type == "cuda":
        return Counter(e.name for e in events if e.device_type == DeviceType.CUDA)
    return Counter(
        e.name
        for e in events
        if e.name.startswith("aten::")
        and e.name not in NO_WORK_OPS
        and not any(child.name.startswith("aten::") for child in e.cpu_children)
    )


def count_kernels(fn: Callable[[], object], device: torch.device) -> int:
    return sum(kernel_counts(fn, device).values())


def kernel_note(device: torch.device) -> str:
    """What ``count_kernels`` counted on ``device``, for a table's notes."""
    if device.type == "cuda":
        return "kernels / step: torch.profiler, GPU activities (kernels, memcpy, memset), one step"
    return (
        "kernels / step: torch.profiler, the aten ops that do work (leaves of the op tree, views "
        "and allocations left out; bench/kernels.py), one step"
    )
