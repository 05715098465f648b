"""One stage-1 step on 2 ranks x B/2 equals one step on B samples in one process.

``tests/distributed_step.py`` runs the step; here it runs once as a plain process and once under
``torchrun`` with 2 CPU processes (gloo, DDP, ``hardest`` negatives so nothing is random), and the
losses and every parameter's gradient must agree to fp32 tolerance. This checks what the
single-process tests cannot: the autograd-aware feature gather, ITC targets offset by rank, hard
negatives mined across ranks, ITM pairs built from other ranks' texts and images, and DDP's
gradient averaging.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
STEP_SCRIPT = REPO_ROOT / "tests" / "distributed_step.py"
TIMEOUT_S = 120
LOSS_KEYS = ("loss.itc", "loss.itm", "loss.itg", "loss.total")
# Self-attention and cross-attention key biases get an exactly-zero gradient in any
# transformer: a bias added to every key shifts all of a query's scores equally, and softmax
# ignores that. Every other gradient must be non-trivial for the comparison to mean anything.
ZERO_GRAD_SUFFIX = "attention.key.bias"
# Torchrun's and the process group's environment, which must not leak into the 1-process run.
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Two processes share few cores; one thread each avoids oversubscription (and is faster).
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(command: list[str]) -> subprocess.CompletedProcess:
    """``command`` in the repository with the test environment; fails the test unless it exits 0."""
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=step_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def world_size_of(path: Path) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("world_size", "?")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun`` with 2 local CPU processes on a free port: ``args`` are a script or
    ``-m module`` and its arguments."""
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *args,
        ]
    )


def assert_same_step(single_path: Path, other_path: Path, loss_keys: tuple[str, ...]) -> None:
    """Same losses and, parameter by parameter, the same gradients (fp32 tolerance)."""
    single = load_file(str(single_path))
    other = load_file(str(other_path))
    assert single.keys() == other.keys(), "different parameters received gradients"

    for key in loss_keys:
        assert other[key].item() == pytest.approx(single[key].item(), rel=1e-5), key

    grads = sorted(key for key in single if key.startswith("grad."))
    assert len(grads) > 100  # every parameter of the tiny Stage1Model got one (127 today)
    for key in grads:
        assert torch.isfinite(single[key]).all(), key
    mismatched = {
        key: (other[key] - single[key]).abs().max().item()
        for key in grads
        if not torch.allclose(other[key], single[key], atol=1e-6, rtol=1e-4)
    }
    assert not mismatched, (
        f"{len(mismatched)} of {len(grads)} gradients differ from the 1-process full-batch step "
        f"(max abs difference per parameter): {mismatched}"
    )


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    single_path = tmp_path / "single.safetensors"
    ddp_path = tmp_path / "ddp.safetensors"
    run([sys.executable, str(STEP_SCRIPT), str(single_path)])
    torchrun(str(STEP_SCRIPT), str(ddp_path))
    # Guards against a launcher that silently ran two independent 1-process jobs.
    assert world_size_of(single_path) == "1"
    assert world_size_of(ddp_path) == "2"
    single = load_file(str(single_path))
    for key in (key for key in single if key.startswith("grad.")):
        if not key.endswith(ZERO_GRAD_SUFFIX):
            assert single[key].abs().max() > 1e-6, f"{key}: trivial gradient"
    assert_same_step(single_path, ddp_path, LOSS_KEYS)


@pytest.mark.slow
def test_accumulated_micro_batches_keep_the_whole_batch_itc(tmp_path: Path) -> None:
    """ITC with its features cached across micro-batches: 2 micro-batches in 1 process, and
    2 ranks x 2 micro-batches, give the full batch's ITC loss and gradients exactly."""
    single_path = tmp_path / "single.safetensors"
    run([sys.executable, str(STEP_SCRIPT), str(single_path), "--itc-only"])
    accumulated = tmp_path / "accumulated.safetensors"
    run([sys.executable, str(STEP_SCRIPT), str(accumulated), "--itc-only", "--micro-batches", "2"])
    assert_same_step(single_path, accumulated, ("loss.itc",))
    both = tmp_path / "ranks_and_micro_batches.safetensors"
    torchrun(str(STEP_SCRIPT), str(both), "--itc-only", "--micro-batches", "2")
    assert world_size_of(both) == "2"
    assert_same_step(single_path, both, ("loss.itc",))
