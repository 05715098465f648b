"""One stage-1 training step at BLIP-2 sizes: ITC + ITM + ITG, forward + backward + AdamW.

``Stage1Model(qformer_preset("blip2"))`` on random ViT-g-shaped encoder output (B, 257, 1408),
B=8 captions of 32 random tokens ([CLS] first; [DEC] = 30522), hardest negatives (deterministic).
Variants, timed interleaved: fp32 with the reuse of issue #4 (image K/V shared by ITC and ITM,
ITG reusing the queries' K/V), fp32 without it, and bf16 autocast with it. FLOPs are counted
over forward + backward with FlopCounterMode; the AdamW step is timed but adds no matmul FLOPs.
With ``--lavis-python`` (``make bench-lavis`` gives it), LAVIS 1.0.2's ``Blip2Qformer`` step at
the same sizes, batch, threads and precision (fp32) is a fourth variant, timed in the same
interleaved rounds: it runs in its own environment's process (``bench/lavis_worker.py``), and
each of its steps is timed here around the request, as ours are.

    python -m bench.stage1_step [--quick] [--device cuda] [--batch-size 8] [--lavis-python PY]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/stage1_step.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import (
    FLOP_NOTE,
    BenchOptions,
    Column,
    Machine,
    Table,
    Target,
    add_common_args,
    count_flops,
    measure_machine,
    measured_row,
    options_from_args,
    peak_memory_gib,
    print_header,
    print_table,
    progress,
    rates_note,
    result_columns,
    timeit_with_rates,
)
from bench.kernels import count_kernels, kernel_note
from qformer_cli.config import TrainConfig
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.config import qformer_preset
from qformer_cli.runtime import autocast
from qformer_cli.train.loop import build_optimizer
from qformer_cli.train.stage1 import Stage1Batch, Stage1Objective

IMAGE_TOKENS = 257  # ViT-g/14 at 224 px
VISION_WIDTH = 1408  # EVA ViT-g
TEXT_LEN = 32
CLS_ID = 101  # bert-base-uncased [CLS]
DEC_ID = 30522  # [DEC], appended to bert-base-uncased's 30522 tokens (vocab 30523)
FIRST_PLAIN_TOKEN = 1000  # below are [PAD], [unusedN], [CLS], ...: keep random text ordinary

REUSE, NO_REUSE, BF16 = "ours, reuse", "ours, no reuse", "ours, reuse, bf16 autocast"
LAVIS = "LAVIS 1.0.2 Blip2Qformer"
LAVIS_WORKER = Path(__file__).resolve().parent / "lavis_worker.py"
VARIANTS = {REUSE: ("fp32", True), NO_REUSE: ("fp32", False), BF16: ("bf16", True)}


@dataclass
class Setup:
    model: Stage1Model
    optimizer: torch.optim.Optimizer
    batch: Stage1Batch


def make_batch(batch_size: int, device: torch.device) -> Stage1Batch:
    generator = torch.Generator().manual_seed(1)
    image_embeds = torch.randn(batch_size, IMAGE_TOKENS, VISION_WIDTH, generator=generator)
    shape = (batch_size, TEXT_LEN)
    input_ids = torch.randint(FIRST_PLAIN_TOKEN, DEC_ID, shape, generator=generator)
    input_ids[:, 0] = CLS_ID
    return Stage1Batch(
        image_embeds=image_embeds.to(device),  # (B, 257, 1408) frozen encoder output
        input_ids=input_ids.to(device),  # (B, 32)
        text_mask=torch.ones_like(input_ids).to(device),  # (B, 32): no padding
        image_ids=torch.arange(batch_size, device=device),  # all distinct images
    )


def build(device: torch.device, batch_size: int) -> Setup:
    """One model and one optimizer shared by every variant (the weights' values do not matter)."""
    torch.manual_seed(0)
    model = Stage1Model(qformer_preset("blip2")).to(device).train()
    return Setup(model, build_optimizer(model, TrainConfig()), make_batch(batch_size, device))


def objective(setup: Setup, reuse: bool) -> Stage1Objective:
    return Stage1Objective(setup.model, DEC_ID, mining="hardest", reuse=reuse)


def forward_backward(setup: Setup, reuse: bool, precision: str) -> None:
    with autocast(setup.batch.image_embeds.device, precision):
        losses = objective(setup, reuse)(setup.batch)
    losses.total.backward()


def train_step(setup: Setup, reuse: bool, precision: str) -> Callable[[], None]:
    def step() -> None:
        setup.optimizer.zero_grad(set_to_none=True)
        forward_backward(setup, reuse, precision)
        setup.optimizer.step()

    return step


def step_flops(setup: Setup, reuse: bool, precision: str) -> float:
    flops = count_flops(lambda: forward_backward(setup, reuse, precision))
    setup.optimizer.zero_grad(set_to_none=True)
    return flops


@torch.no_grad()
def reuse_loss_gap(setup: Setup) -> float:
    """Largest |loss difference| between reuse on and off, in eval mode (no dropout): the two
    variants must do the same math, only the amount of work may differ."""
    setup.model.eval()
    try:
        with_reuse = objective(setup, True)(setup.batch).as_dict()
        without = objective(setup, False)(setup.batch).as_dict()
    finally:
        setup.model.train()
    return max((with_reuse[k] - without[k]).abs().item() for k in with_reuse)


class LavisPeer:
    """LAVIS's stage-1 step in its own environment's python (``bench/lavis_worker.py``), one
    step per request over a pipe; ``step`` returns when the step is done."""

    def __init__(self, python: Path, batch_size: int, threads: int) -> None:
        if not Path(python).is_file():
            raise SystemExit(f"--lavis-python {python}: no such file (make lavis-env builds it)")
        command = [str(python), str(LAVIS_WORKER), f"--batch-size={batch_size}"]
        self.process = subprocess.Popen(
            [*command, f"--threads={threads}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._receive()
        self.flops_per_step: float = ready["flops_per_step"]
        self.versions: dict[str, str] = ready["versions"]

    def _receive(self) -> dict:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            code = self.process.wait()
            raise SystemExit(f"the LAVIS worker stopped (exit {code}); its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"the LAVIS worker: {reply['error']}")
        return reply

    def _request(self, command: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._receive()

    def step(self) -> None:
        self._request("step")

    def count_kernels(self) -> int:
        """Kernels of one of LAVIS's steps, counted in its process as ours are here."""
        return self._request("count")["kernels"]

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait(timeout=60)


def targets(rows: list[dict], device: torch.device) -> list[Target]:
    """The issue's goals for this benchmark (LAVIS's where it was measured, CPU's on CPU)."""
    row = {r["name"]: r for r in rows}
    speed = {name: r["images_per_s"] for name, r in row.items()}
    goals = [
        Target("ours reuse / ours no reuse, images/s", speed[REUSE] / speed[NO_REUSE], 1.25),
        Target("ours bf16 / ours fp32, images/s", speed[BF16] / speed[REUSE], 2.0),
    ]
    if LAVIS in speed:
        versus_lavis = speed[REUSE] / speed[LAVIS]
        goals.insert(0, Target("ours fp32 / LAVIS fp32, images/s", versus_lavis, 1.3))
    if device.type == "cuda":
        return [*goals, Target("bf16 MFU (an H100 goal)", row[BF16]["mfu"], 40, unit="%")]
    return [
        Target("fp32 GFLOP/image", row[REUSE]["gflop_per_image"], 185, False, " GFLOP"),
        Target("fp32 MFU", row[REUSE]["mfu"], 75, unit="%"),
        *goals,
    ]


def measure(
    setup: Setup, machine: Machine, options: BenchOptions, lavis: LavisPeer | None
) -> tuple[list[dict], Machine]:
    """Each variant's row (LAVIS's too when given), and the machine with the matmul rate timed
    alongside them."""
    device, images = options.device, setup.batch.input_ids.shape[0]
    steps = {name: train_step(setup, reuse, p) for name, (p, reuse) in VARIANTS.items()}
    progress("stage-1 step: counting FLOPs of each variant")
    flops = {name: step_flops(setup, reuse, p) for name, (p, reuse) in VARIANTS.items()}
    memory = {name: peak_memory_gib(step, device) for name, step in steps.items()}
    precisions = {name: p for name, (p, _) in VARIANTS.items()}
    if lavis:
        steps[LAVIS], flops[LAVIS], memory[LAVIS] = lavis.step, lavis.flops_per_step, None
        precisions[LAVIS] = "fp32"
    timings, during = timeit_with_rates(steps, options, machine)
    progress("stage-1 step: counting kernels of one more step of each variant")
    kernels = {name: count_kernels(steps[name], device) for name in VARIANTS}
    if lavis:
        kernels[LAVIS] = lavis.count_kernels()
    rows = [
        measured_row(name, p, timings[name], flops[name], images, during, memory[name])
        | {"kernels": kernels[name]}
        for name, p in precisions.items()
    ]
    return rows, during


def lavis_note(lavis: LavisPeer | None) -> str:
    if lavis is None:
        return "LAVIS not measured in this run (make bench-lavis measures it beside ours)"
    versions = ", ".join(f"{p} {v}" for p, v in lavis.versions.items())
    return (
        f"LAVIS measured in the same rounds, in its own process ({versions}): "
        "Blip2Qformer unmodified, bert-base weights random, encoder output given as the image, "
        "AdamW; the same threads, batch and sizes; timed here around each step request"
    )


def run(
    machine: Machine, options: BenchOptions, batch_size: int = 8, lavis_python: Path | None = None
) -> list[Table]:
    device = options.device
    lavis = None
    if lavis_python:
        if device.type != "cpu":
            raise SystemExit("--lavis-python: LAVIS is measured on CPU only (its venv's torch)")
        progress(f"stage-1 step: starting LAVIS's step in {lavis_python}")
        lavis = LavisPeer(lavis_python, batch_size, torch.get_num_threads())
    progress(f"stage-1 step: building Stage1Model (blip2) and AdamW on {device}")
    setup = build(device, batch_size)
    loss_gap = reuse_loss_gap(setup)
    try:
        rows, during = measure(setup, machine, options, lavis)
    finally:
        if lavis:
            lavis.close()
    reference = LAVIS if lavis else NO_REUSE
    gflop = {row["name"]: row["gflop_per_image"] for row in rows}
    saved = gflop[NO_REUSE] - gflop[REUSE]
    notes = [
        *(goal.line() for goal in targets(rows, device)),
        f"reuse saves {saved:.1f} GFLOP/image ({saved / gflop[NO_REUSE]:.0%}); losses with and "
        f"without reuse (eval mode) differ by at most {loss_gap:.1e}",
        f"one step = zero_grad + forward + backward + AdamW; median of {options.repeats} "
        f"interleaved steps after {options.warmup} warm-up; bf16 MFU against the bf16 rate",
        lavis_note(lavis),
        rates_note(machine, during),
        FLOP_NOTE,
        f"{kernel_note(device)}, after the timed ones",
    ]
    title = (
        f"Stage-1 training step (ITC+ITM+ITG), BLIP-2 sizes, B={batch_size}, "
        f"{IMAGE_TOKENS}x{VISION_WIDTH} image tokens, {TEXT_LEN} text tokens ({device.type})"
    )
    columns = [*result_columns(device, "ms / step"), Column("kernels / step", "kernels", "{:,}")]
    return [Table(title, columns, rows, reference, "images_per_s", notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--lavis-python",
        type=Path,
        default=None,
        help="python of an environment with salesforce-lavis 1.0.2 (make lavis-env): time "
        "LAVIS's step beside ours",
    )
    args = parser.parse_args(argv)
    options = options_from_args(args)
    machine = measure_machine(options.device, options.quick)
    print_header(machine, "Stage-1 step benchmark")
    for table in run(machine, options, args.batch_size, args.lavis_python):
        print_table(table, options.table_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
