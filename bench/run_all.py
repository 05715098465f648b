"""Every benchmark in one run, one table each: what ``make bench`` runs.

    python -m bench.run_all [--quick] [--device cuda] [--format markdown] [--only stage1_step]

The machine's fp32 / bf16 matmul rate is measured once first (and again at the end, to show
how much the machine drifted meanwhile). A benchmark that crashes is reported and skipped; the
exit code is then 1. Benchmarks are never part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run_all.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    frozen_backbones,
    generation,
    loader,
    onnx_backend,
    qformer_forward,
    stage1_step,
)
from bench.common import (
    PRECISION_DTYPES,
    BenchOptions,
    Machine,
    Table,
    add_common_args,
    matmul_rate,
    measure_machine,
    options_from_args,
    print_header,
    print_table,
)

Benchmark = Callable[[Machine, BenchOptions, int], list[Table]]
BENCHMARKS: dict[str, Benchmark] = {
    "qformer_forward": qformer_forward.run,
    "stage1_step": stage1_step.run,
    "frozen_backbones": frozen_backbones.run,
    "generation": generation.run,
    "onnx_backend": onnx_backend.run,
    "loader": loader.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.only.split(","))) - set(BENCHMARKS)
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
    return args


def run_one(name: str, machine: Machine, options: BenchOptions, batch_size: int) -> bool:
    """Print one benchmark's tables; False (with the traceback printed) if it crashed."""
    started = time.perf_counter()
    try:
        tables = BENCHMARKS[name](machine, options, batch_size)
    except Exception:
        print(f"**{name} FAILED**\n\n```")
        traceback.print_exc(file=sys.stdout)
        print("```\n", flush=True)
        return False
    for table in tables:
        print_table(table, options.table_format)
    print(f"_{name}: {time.perf_counter() - started:.0f} s_\n", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = options_from_args(args)
    machine = measure_machine(options.device, options.quick)
    print_header(machine, "qformer_cli benchmarks")
    selected = [name for name in BENCHMARKS if not args.only or name in args.only.split(",")]
    failed = [name for name in selected if not run_one(name, machine, options, args.batch_size)]
    rates = ", ".join(
        f"{precision} {matmul_rate(options.device, dtype) / 1e9:,.0f} GFLOP/s"
        for precision, dtype in PRECISION_DTYPES.items()
    )
    print(f"Matmul rate measured again at the end (drift check): {rates}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
