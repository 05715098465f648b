"""What a user sees while training: a rich progress bar (rank 0 only), then plots and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

LOSS_KEYS = ("loss", "itc", "itm", "itg", "lm")


class TrainingProgress:
    """Step, losses, lr, images/s, ETA and MFU on stderr."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, total_steps: int, completed: int) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=completed, status=""
        )

    def update(self, step: int, row: dict[str, float]) -> None:
        if self.progress is None:
            return
        parts = [f"{key} {row[key]:.3f}" for key in LOSS_KEYS if key in row]
        parts.append(f"lr {row['lr']:.2e}")
        if "images_per_s" in row:
            parts.append(f"{row['images_per_s']:.1f} img/s")
        if "mfu" in row:
            parts.append(f"MFU {100 * row['mfu']:.0f}%")
        self.progress.update(self.task, completed=step, status=" ".join(parts))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def plot_losses(history: list[dict[str, float]], path: Path, title: str) -> None:
    """``loss.png``: every loss logged (the total and each objective) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [row["step"] for row in history]
    for key in LOSS_KEYS:
        if history and key in history[0]:
            axis.plot(steps, [row[key] for row in history], label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary_table(history: list[dict[str, float]]) -> Table:
    """First vs last logged value of each loss."""
    table = Table(title="Training summary")
    table.add_column("metric")
    table.add_column("first", justify="right")
    table.add_column("last", justify="right")
    if history:
        first, last = history[0], history[-1]
        for key in LOSS_KEYS:
            if key in first:
                table.add_row(key, f"{first[key]:.4f}", f"{last[key]:.4f}")
        if "images_per_s" in last:
            table.add_row("images/s", "", f"{last['images_per_s']:.1f}")
    return table
