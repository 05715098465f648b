"""Progress where people look: a training run with stderr in a log file (SLURM, nohup) prints
plain progress lines that fit 80 columns; --quiet prints none."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.tiny_runs import stage1_command, subprocess_env

PROGRESS_LINE = re.compile(r"^step (\d+)/(\d+) ETA (\?|\d+:\d\d) itc [\d.]+ itm [\d.]+ itg [\d.]+ ")


def _train_into_log(out: Path, log: Path, *extra: str) -> list[str]:
    with log.open("w") as stderr:  # a file, as `2> log` gives it: not a terminal
        subprocess.run(
            stage1_command(out, "--max-steps", "6", *extra),
            env=subprocess_env(QFORMER_PROGRESS_EVERY_S="0"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            check=True,
            timeout=300,
        )
    return log.read_text().splitlines()


def test_training_into_a_log_file_prints_progress_lines(tmp_path: Path) -> None:
    lines = _train_into_log(tmp_path / "run", tmp_path / "log")
    progress = [PROGRESS_LINE.match(line) for line in lines]
    steps = [int(match.group(1)) for match in progress if match]
    assert steps == [1, 2, 3, 4, 5, 6], lines
    assert all(int(match.group(2)) == 6 for match in progress if match)
    assert all(len(line) <= 80 for line, match in zip(lines, progress, strict=True) if match)
    assert "img/s" in lines[[i for i, m in enumerate(progress) if m][-1]]


def test_quiet_training_prints_no_progress(tmp_path: Path) -> None:
    lines = _train_into_log(tmp_path / "run", tmp_path / "log", "--quiet")
    assert not [line for line in lines if PROGRESS_LINE.match(line)]


def test_on_an_80_column_terminal_the_counter_and_eta_stay_whole() -> None:
    import io

    from rich.console import Console

    from qformer_cli.progress import ProgressReport
    from qformer_cli.train.progress import status_text

    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    report = ProgressReport(console, "step", 25000).start(0)
    row = {"itc": 1.23, "itm": 0.69, "itg": 3.21, "lr": 1e-4, "images_per_s": 3.4, "mfu": 0.45}
    report.update(12000, status_text(row))
    report.stop()
    last = screen.getvalue().replace("\r", "\n").splitlines()[-2]
    assert "step 12000/25000 ETA" in last and "itc 1.23" in last
    assert len(last.replace("\x1b[2K", "")) <= 80
