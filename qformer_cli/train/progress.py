"""What a user sees while training: a rich progress bar (rank 0 only), then plots and a summary."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from qformer_cli.progress import ProgressReport

LOSS_KEYS = ("loss", "itc", "itm", "itg", "lm")


class TrainingProgress:
    """Step, ETA, losses, lr, images/s and MFU on stderr (rank 0 only): a bar on a terminal,
    periodic plain lines in a log (see :mod:`qformer_cli.progress`)."""

    def __init__(self, console: Console, enabled: bool = True, quiet: bool = False) -> None:
        self.console = console
        self.enabled = enabled and not quiet
        self.report: ProgressReport | None = None

    def start(self, total_steps: int, completed: int) -> None:
        if self.enabled:
            self.report = ProgressReport(self.console, "step", total_steps).start(completed)

    def update(self, step: int, row: dict[str, float]) -> None:
        if self.report is not None:
            self.report.update(step, status_text(row))

    def stop(self) -> None:
        if self.report is not None:
            self.report.stop()
            self.report = None


def status_text(row: dict[str, float]) -> str:
    """E.g. "itc 1.23 itm 0.69 itg 3.21 lr 1.0e-04 3.4 img/s MFU 45%": each objective's loss
    (the total only when there is one), short enough for 80 columns after "step N/M ETA t"."""
    objectives = [key for key in LOSS_KEYS[1:] if key in row] or ["loss"]
    parts = [f"{key} {row[key]:.2f}" for key in objectives if key in row]
    parts.append(f"lr {row['lr']:.1e}")
    if "images_per_s" in row:
        parts.append(f"{row['images_per_s']:.1f} img/s")
    if "mfu" in row:
        parts.append(f"MFU {100 * row['mfu']:.0f}%")
    return " ".join(parts)


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
    axis.legend(loc="upper left")
    validated = [row for row in history if any(key.startswith("val_") for key in row)]
    if validated:  # train.eval_every: the validation metrics on their own scale, dashed
        right = axis.twinx()
        for key in (key for key in validated[-1] if key.startswith("val_")):
            right.plot(
                [row["step"] for row in validated],
                [row[key] for row in validated],
                "--o",
                label=key,
            )
        right.set_ylabel("validation")
        right.legend(loc="upper right")
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
