"""``qformer info``: parameters, FLOPs and memory of a configuration."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from qformer_cli.cli.common import (
    ConfigOption,
    DebugOption,
    JsonOption,
    SetOption,
    handles_errors,
    output_console,
    print_json,
)

# --------------------------------------------------------------------------------------------
# qformer info


def _format_count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def _info_tables(report: dict[str, Any]) -> list[Table]:
    params = Table(title="Parameters")
    for column in ("component", "parameters", "trainable", "frozen"):
        params.add_column(column, justify="left" if column == "component" else "right")
    for name, row in report["parameters"].items():
        params.add_row(
            name, f"{row['parameters']:,}", f"{row['trainable']:,}", f"{row['frozen']:,}"
        )
    for stage, row in report["totals"].items():
        params.add_row(
            f"[b]{stage} total[/b]",
            "",
            _format_count(row["trainable"]),
            _format_count(row["frozen"]),
        )

    flops = Table(title="Forward FLOPs per sample")
    flops.add_column("component")
    flops.add_column("GFLOP", justify="right")
    for name, value in report["forward_flops_per_sample"].items():
        if name != "image_tokens":
            flops.add_row(name, f"{value / 1e9:,.2f}")

    memory = Table(title="Memory: weights + grads + AdamW state (activations excluded), GiB")
    memory.add_column("precision")
    for column in ("inference", "stage1_training", "stage2_training"):
        memory.add_column(column, justify="right")
    for precision, row in report["memory_bytes"].items():
        memory.add_row(precision, *(f"{value / 2**30:,.2f}" for value in row.values()))
    return [params, flops, memory]


@handles_errors
def info(
    config: ConfigOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Parameters, FLOPs and memory of a configuration (built on the meta device: no weights)."""
    from qformer_cli.config import load_config
    from qformer_cli.info import describe

    report = describe(load_config(config, overrides, "info").model)
    if as_json:
        print_json(report)
        return
    console = output_console(as_json)
    for table in _info_tables(report):
        console.print(table)
