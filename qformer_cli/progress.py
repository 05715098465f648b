"""Progress on stderr, for people and for logs.

On a terminal: a rich progress bar redrawn in place. Elsewhere (stderr redirected to a file, a
SLURM or nohup log) a bar would print nothing until the end, so a plain line is printed at the
first update, then at most every ``QFORMER_PROGRESS_EVERY_S`` seconds (default 30), and at the
end. Either way the counter and ETA come first, so an 80-column screen cuts only the status.
``quiet`` prints nothing.
"""

from __future__ import annotations

import os
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column

PROGRESS_EVERY_ENV = "QFORMER_PROGRESS_EVERY_S"
COUNTER_AND_ETA_WIDTH = 32  # "step 12000/25000 ETA 0:00:00 " and the column gaps
BAR_WIDTH = 16
FULL_STATUS_WIDTH = 64  # the longest status (stage 1's losses, lr, img/s, MFU): before the bar
DEFAULT_EVERY_S = 30.0


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_EVERY_ENV, DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressReport:
    """``label done/total``, ETA and a status text; use as a context manager or call
    :meth:`start` / :meth:`stop`."""

    def __init__(self, console: Console, label: str, total: int, *, quiet: bool = False) -> None:
        self.console = console
        self.label = label
        self.total = total
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task: object = None
        self.every_s = _every_s()
        self.started = 0.0
        self.start_count = 0  # a resumed run starts part-way: ETA from this run's rate only
        self.last_line = float("-inf")
        self.printed = -1  # the count the last plain line showed
        self.count = 0
        self.status = ""

    def start(self, completed: int = 0) -> ProgressReport:
        self.started = time.perf_counter()
        self.start_count = self.count = completed
        if self.quiet or not self.console.is_terminal:
            return self
        # rich squeezes every column of a line too wide; so the status (the last column) gets
        # a width that leaves the counter and ETA whole, and the bar only a wide screen
        status_width = self.console.width - COUNTER_AND_ETA_WIDTH
        columns: list[ProgressColumn] = [
            TextColumn(self.label),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        if status_width >= FULL_STATUS_WIDTH + BAR_WIDTH + 1:
            columns.append(BarColumn(bar_width=BAR_WIDTH))
            status_width -= BAR_WIDTH + 1
        status = Column(no_wrap=True, overflow="ellipsis", max_width=max(status_width, 8))
        columns.append(TextColumn("{task.fields[status]}", table_column=status))
        self.bar = Progress(*columns, console=self.console)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, completed=completed, status="")
        return self

    def update(self, completed: int, status: str = "", total: int | None = None) -> None:
        self.count, self.status = completed, status
        self.total = self.total if total is None else total
        if self.bar is not None:
            self.bar.update(
                self.task,  # type: ignore[arg-type]
                completed=completed,
                total=self.total,
                status=status,
            )
        elif not self.quiet and time.perf_counter() - self.last_line >= self.every_s:
            self._print_line()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif not self.quiet and self.printed != self.count:
            self._print_line()  # the final state, unless the last line showed it
        self.quiet = True  # stopped: further updates print nothing

    def counter(self, done: int, total: int) -> None:
        """``update`` for the inference loops' ``progress`` hook: (done, total)."""
        self.update(done, total=total)

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.started
        done = self.count - self.start_count
        if done <= 0 or elapsed <= 0:
            return "?"
        return clock((self.total - self.count) * elapsed / done)

    def _print_line(self) -> None:
        self.last_line, self.printed = time.perf_counter(), self.count
        line = f"{self.label} {self.count}/{self.total} ETA {self._eta()} {self.status}"
        self.console.print(line.rstrip(), markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> ProgressReport:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
