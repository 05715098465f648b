"""Shared benchmark plumbing: the machine and its matmul rate, timing, FLOP counting, tables.

Each benchmark times its variants *interleaved* (one run of each, then the next round), so
slow drift on a shared machine hits every variant alike, and reports the median per variant.
MFU is always against the rate this machine's own dense matmul reaches in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qformer_cli.flops import count_flops as package_count_flops

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Command-line options shared by every benchmark


@dataclass
class BenchOptions:
    device: torch.device
    warmup: int  # untimed runs per variant before timing
    repeats: int  # timed runs per variant; the median is reported
    quick: bool
    table_format: str  # "rich" (terminal) or "markdown" (for BENCHMARKS.md)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per variant (default 5; --quick 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs per variant (default 2; --quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs: a smoke test, noisy")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--format", dest="table_format", choices=["rich", "markdown"], default="rich"
    )


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU is usable here")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return BenchOptions(device, max(0, warmup), max(1, repeats), args.quick, args.table_format)


# --------------------------------------------------------------------------------------------
# Timing


def progress(message: str) -> None:
    """Progress on stderr, so that stdout holds only the tables (and can be pasted as is)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timeit(
    fn: Callable[[], object],
    warmup: int,
    repeats: int,
    device: torch.device | None = None,
) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    return statistics.median(_time_once(fn, device) for _ in range(max(1, repeats)))


@dataclass
class Timing:
    samples: list[float]  # seconds per call

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how noisy the machine was for this variant."""
        return (max(self.samples) - min(self.samples)) / self.median


def timeit_interleaved(
    fns: dict[str, Callable[[], object]], options: BenchOptions
) -> dict[str, Timing]:
    """Time several variants side by side: warm each up, then run the rounds A, B, C, A, B, ..."""
    progress(f"warm-up: {options.warmup} run(s) of each of {len(fns)} variants")
    for fn in fns.values():
        for _ in range(options.warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(options.repeats):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, options.device))
        times = ", ".join(f"{name} {s[-1]:.3f} s" for name, s in samples.items())
        progress(f"round {round_index + 1}/{options.repeats}: {times}")
    return {name: Timing(times) for name, times in samples.items()}


def peak_memory_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call of ``fn`` (None on CPU: no per-call counter)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


# --------------------------------------------------------------------------------------------
# FLOP counting


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (torch's FlopCounterMode, plus CPU attention)."""
    return package_count_flops(fn)[0]


FLOP_NOTE = (
    "FLOPs: torch FlopCounterMode; attention on CPU (which it counts as 0) added with torch's "
    "own SDPA formulas"
)


# --------------------------------------------------------------------------------------------
# The machine


def matmul_probe(
    device: torch.device, dtype: torch.dtype, products: int = 1
) -> tuple[Callable[[], None], float]:
    """``products`` dense square matmuls as one call: (the call, its FLOPs).

    Same sizes as ``qformer_cli.train.loop.measure_matmul_flops`` (1024 on CPU, 8192 on GPU), so
    MFU here and in the training logs is against the same yardstick.
    """
    size = 1024 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def call() -> None:
        for _ in range(products):
            torch.mm(a, b)

    return call, 2 * size**3 * products


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 20) -> float:
    """Achievable dense matmul FLOP/s: median over ``repeats`` products (a shared machine is
    noisy, hence more than the training loop's few)."""
    call, flops = matmul_probe(device, dtype)
    return flops / timeit(call, warmup=3, repeats=repeats, device=device)


def timeit_with_rates(
    fns: dict[str, Callable[[], object]], options: BenchOptions, machine: Machine
) -> tuple[dict[str, Timing], Machine]:
    """Time ``fns`` interleaved with bursts of matmuls, one burst per precision per round.

    On a shared machine the load changes between the start and the end of a benchmark; MFU
    against the matmul rate of the same rounds stays meaningful where a rate measured once at
    the start would not. Returns the timings of ``fns`` and ``machine`` with those rates.
    """
    products = 8 if options.device.type == "cpu" else 20  # ~0.1-0.5 s per burst
    probes = {
        f"matmul {p}": matmul_probe(options.device, dtype, products)
        for p, dtype in PRECISION_DTYPES.items()
    }
    timings = timeit_interleaved({**fns, **{k: call for k, (call, _) in probes.items()}}, options)
    rates = {p: probes[f"matmul {p}"][1] / timings[f"matmul {p}"].median for p in PRECISION_DTYPES}
    measured = {name: timings[name] for name in fns}
    return measured, dataclasses.replace(machine, matmul_flops=rates)


def rates_note(at_start: Machine, during: Machine) -> str:
    def gflops(machine: Machine) -> str:
        return ", ".join(f"{p} {r / 1e9:,.0f}" for p, r in machine.matmul_flops.items())

    return (
        f"MFU against the matmul rate timed in the same rounds: {gflops(during)} GFLOP/s "
        f"(at the start: {gflops(at_start)})"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


@dataclass
class Machine:
    device: torch.device
    device_name: str  # the GPU's name, or the CPU model on CPU
    cpu_model: str
    cores: int
    threads: int  # torch intra-op threads
    torch_version: str
    transformers_version: str
    matmul_flops: dict[str, float] = field(default_factory=dict)  # "fp32"/"bf16" -> FLOP/s

    def peak(self, precision: str) -> float:
        return self.matmul_flops[precision]

    def describe(self) -> str:
        rates = ", ".join(f"{p} {r / 1e9:,.0f} GFLOP/s" for p, r in self.matmul_flops.items())
        where = f"{self.device_name}, " if self.device.type == "cuda" else ""
        return (
            f"{where}CPU {self.cpu_model} ({self.cores} cores, torch threads {self.threads}) | "
            f"torch {self.torch_version} | transformers {self.transformers_version} | "
            f"python {platform.python_version()} | measured matmul: {rates}"
        )


def measure_machine(device: torch.device, quick: bool = False) -> Machine:
    """Versions, cores and the fp32 / bf16 matmul rates, measured now on ``device``."""
    repeats = 10 if quick else 30
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return Machine(
        device=device,
        device_name=name,
        cpu_model=_cpu_model(),
        cores=_usable_cores(),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        transformers_version=_transformers_version(),
        matmul_flops={p: matmul_rate(device, d, repeats) for p, d in PRECISION_DTYPES.items()},
    )


def print_header(machine: Machine, title: str) -> None:
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])  # keeps `-m bench.x`
    command = " ".join(shlex.quote(arg) for arg in [os.path.basename(argv[0]), *argv[1:]])
    print(f"# {title}\n")
    print(f"- date: {stamp}")
    print(f"- command: `{command}`")
    print(f"- machine: {machine.describe()}\n")


# --------------------------------------------------------------------------------------------
# Results: tables, ratios and targets


@dataclass
class Target:
    """One goal from the issue, e.g. "bf16 / fp32 images/s >= 1.8"."""

    what: str
    value: float
    bound: float
    at_least: bool = True  # False: the value must stay at or below ``bound``
    unit: str = "×"

    def line(self) -> str:
        met = self.value >= self.bound if self.at_least else self.value <= self.bound
        sign = "≥" if self.at_least else "≤"
        verdict = "met" if met else f"MISSED by {abs(self.value / self.bound - 1):.1%}"
        return (
            f"{self.what}: {self.value:.2f}{self.unit} "
            f"(target {sign} {self.bound:g}{self.unit}): {verdict}"
        )


@dataclass
class Column:
    header: str
    key: str
    fmt: str = "{:.2f}"


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]  # each has "name" plus the columns' keys (None / absent: "-")
    reference: str | None = None  # the row every ratio divides by
    ratio_key: str | None = None  # a higher-is-better metric, e.g. "images_per_s"
    notes: list[str] = field(default_factory=list)

    def ratio(self, row: dict[str, Any]) -> str:
        if self.reference is None or self.ratio_key is None:
            return "-"
        base = next(r for r in self.rows if r["name"] == self.reference)[self.ratio_key]
        value = row.get(self.ratio_key)
        if value is None or not base:
            return "-"
        return f"{value / base:.2f}×"

    def header(self) -> list[str]:
        ratio = [f"× {self.reference}"] if self.reference else []
        return ["", *(c.header for c in self.columns), *ratio]

    def cells(self) -> list[list[str]]:
        rows = []
        for row in self.rows:
            values = [_format(row.get(c.key), c.fmt) for c in self.columns]
            ratio = [self.ratio(row)] if self.reference else []
            rows.append([row["name"], *values, *ratio])
        return rows


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value) if isinstance(value, int | float) else str(value)


def print_table(table: Table, table_format: str) -> None:
    if table_format == "rich" and _print_rich(table):
        return
    _print_markdown(table)


def _print_rich(table: Table) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:
        return False
    rich_table = RichTable(title=table.title, title_justify="left")
    for index, header in enumerate(table.header()):
        rich_table.add_column(header, justify="left" if index == 0 else "right", no_wrap=True)
    for cells in table.cells():
        rich_table.add_row(*cells)
    console = Console(width=max(160, Console().width))  # not squeezed into 80 when piped
    console.print(rich_table)
    for note in table.notes:
        console.print(f"  - {note}", highlight=False, markup=False)
    console.print()
    return True


def _print_markdown(table: Table) -> None:
    header = table.header()
    print(f"### {table.title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for cells in table.cells():
        print("| " + " | ".join(cells) + " |")
    print()
    for note in table.notes:
        print(f"- {note}")
    print(flush=True)


def mfu(flops: float, seconds: float, machine: Machine, precision: str) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the measured matmul rate for ``precision``."""
    return flops / seconds / machine.peak(precision)


def measured_row(
    name: str,
    precision: str,
    timing: Timing,
    flops: float,
    images: int,
    machine: Machine,
    peak_gib: float | None = None,
) -> dict[str, Any]:
    """One table row from a timed variant: ``flops`` per call, ``images`` per call."""
    return {
        "name": name,
        "precision": precision,
        "ms": timing.median * 1e3,
        "spread": timing.spread * 100,
        "images_per_s": images / timing.median,
        "gflop_per_image": flops / images / 1e9,
        "mfu": mfu(flops, timing.median, machine, precision) * 100,
        "peak_gib": peak_gib,
    }


def throughput_rows(
    timings: dict[str, Timing], reference: str, items: int, same: str, prefix: str = ""
) -> list[dict[str, Any]]:
    """Rows of end-to-end variants timed side by side: seconds and items/s per call, speed as a
    ratio to the ``reference`` variant, and whether the variants' outputs were the same."""
    return [
        {
            "name": f"{prefix}{name}",
            "seconds": timing.median,
            "items_per_s": items / timing.median,
            "ratio": timings[reference].median / timing.median,
            "same": same,
        }
        for name, timing in timings.items()
    ]


def result_columns(device: torch.device, time_header: str) -> list[Column]:
    """The columns every timed table shows (peak memory only where it can be measured: CUDA)."""
    columns = [
        Column("precision", "precision", "{}"),
        Column(time_header, "ms", "{:,.1f}"),
        Column("spread %", "spread", "{:.0f}"),
        Column("images/s", "images_per_s", "{:.2f}"),
        Column("GFLOP/image", "gflop_per_image", "{:.1f}"),
        Column("MFU %", "mfu", "{:.0f}"),
    ]
    if device.type == "cuda":
        columns.append(Column("peak GiB", "peak_gib", "{:.2f}"))
    return columns
