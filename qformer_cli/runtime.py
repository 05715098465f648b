"""What training, inference, evaluation and export share at run time: where this process sits
among the torchrun ranks, its device, autocast, and the output directories it creates.

Nothing here knows a command or a model; ``train/``, ``eval/``, ``export/`` and ``inference/``
import it, and it imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qformer_cli.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: ``rank`` of ``world_size`` (1 = no process group)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def init_distributed(device_choice: str) -> tuple[Ranks, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if device_choice not in DEVICE_CHOICES:
        raise UsageError(f"--device {device_choice}: choose {' | '.join(DEVICE_CHOICES)}")
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is usable here")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    ranks = Ranks.current()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return ranks, torch.device("cuda", local_rank)
    return ranks, torch.device("cpu")


def leave_distributed() -> None:
    """Leave the process group after a run every rank finished: the barrier keeps one rank from
    closing its connections while another still reduces; on an error the ranks do not meet, and
    torchrun tears them down instead."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


# --------------------------------------------------------------------------------------------
# Output directories

# The output directories (and parents) make_out_dir created in this process: a command refused
# after creating them removes the ones it left empty (remove_empty_out_dirs, via cli).
_created_out_dirs: list[Path] = []


def make_out_dir(out: Path | None, name: str) -> Path:
    """``--out`` or ``runs/<name>-<timestamp>``; refuses an unwritable location up front."""
    directory = out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    missing = [path for path in (directory, *directory.parents) if not path.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _created_out_dirs.extend(missing)
        probe = directory / f".write-test-{os.getpid()}"  # one per process: torchrun ranks
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"{directory}: output directory is not writable ({exc.strerror})"
        ) from None
    return directory


def remove_empty_out_dirs() -> None:
    """Remove the directories make_out_dir created that are still empty (a refused command)."""
    deepest_first = sorted(set(_created_out_dirs), key=lambda path: len(path.parts), reverse=True)
    _created_out_dirs.clear()
    for directory in deepest_first:
        with contextlib.suppress(OSError):  # not empty (or gone): left as it is
            directory.rmdir()


# A CPU without bf16/fp16 matrix hardware (AVX2 only, no AVX-512-BF16 or AMX) emulates them:
# measured on such a cloud CPU, a bf16 matmul ran at 1 GFLOP/s against 161 fp32, so training
# under --precision bf16 was ~100x slower. Below this fraction of the fp32 rate it is refused.
SLOW_PRECISION_FRACTION = 0.25
_PROBE_SIZE = 512  # small enough that an emulated bf16 product still takes well under a second


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = _PROBE_SIZE) -> float:
    """FLOP/s of a ``size``-cubed matmul in ``dtype`` on ``device``: one untimed warm-up, then
    the median of three timed products. Training's MFU divides by it (at 1024, or 8192 on a
    GPU); the slow-precision check compares two of them (at 512)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    timings = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - started)
    return 2 * size**3 / max(sorted(timings)[1], 1e-9)


def cpu_has_native_bf16() -> bool:
    """AVX-512-BF16 or AMX in this CPU's flags (Linux ``/proc/cpuinfo``; elsewhere: no)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_has_native_bf16() -> bool:
    """bf16 in the GPU's hardware (Ampere and later), not only emulated (a V100)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch, whose check was for the hardware alone
        return torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``precision`` with ``auto`` decided for ``device``, and why (one phrase). Decided from
    the hardware's features, not a timing, so every rank of a run decides alike."""
    if precision != "auto":
        return precision, "as given"
    if device.type == "cuda":
        if cuda_has_native_bf16():
            return "bf16", "this GPU computes bf16"
        return "fp32", "this GPU has no bf16 (it would be emulated)"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16", "this CPU has bf16 matrix instructions (AVX-512-BF16 or AMX)"
    return "fp32", f"no native bf16 on this {device.type} (a bf16 matmul would be emulated)"


def check_precision_speed(device: torch.device, precision: str) -> None:
    """Refuse a reduced precision that this CPU runs far slower than fp32 (see above)."""
    if device.type != "cpu" or precision == "fp32":
        return
    reduced = matmul_rate(device, PRECISION_DTYPES[precision])
    full = matmul_rate(device, torch.float32)
    if reduced < SLOW_PRECISION_FRACTION * full:
        raise UsageError(
            f"--precision {precision} on this CPU: {precision} matmuls run at "
            f"{reduced / 1e9:.1f} GFLOP/s against {full / 1e9:.1f} fp32 (no {precision} matrix "
            f"hardware), so training would be ~{full / reduced:.0f}x slower; use --precision "
            "fp32, or --set train.allow_slow_precision=true"
        )
