"""Run a training stage end to end: output dir, resume, the loop, plots and the summary."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qformer_cli import checkpoint
from qformer_cli.config import RunConfig
from qformer_cli.errors import CheckpointError
from qformer_cli.losses import Ranks
from qformer_cli.train.common import make_out_dir, write_resolved_config
from qformer_cli.train.loop import StageRecipe, Trainer, init_distributed
from qformer_cli.train.preflight import check_before_loading
from qformer_cli.train.progress import TrainingProgress, plot_losses, summary_table

RecipeBuilder = Callable[[RunConfig, torch.device, Ranks, Callable[[str], None]], StageRecipe]


def newest_run(command: str, runs: Path = Path("runs")) -> Path | None:
    candidates = sorted(runs.glob(f"{command}-*")) if runs.is_dir() else []
    return candidates[-1] if candidates else None


def resolve_resume(
    resume: str | None, out: Path | None, command: str, warn: Callable[[str], None]
) -> tuple[Path | None, Path | None]:
    """(output dir, checkpoint to resume from) for ``--resume auto|DIR`` and ``--out``."""
    if resume is None:
        return out, None
    if resume == "auto":
        run_dir = out or newest_run(command)
        if run_dir is None or not run_dir.exists():
            warn("--resume auto: no earlier run found; starting fresh")
            return out, None
        found = checkpoint.newest_good_checkpoint(run_dir, warn)
        if found is None:
            warn(f"--resume auto: no complete checkpoint in {run_dir}; starting fresh")
        return run_dir, found
    found = checkpoint.resolve_checkpoint(Path(resume))
    if not (found / checkpoint.TRAIN_STATE).is_file():
        raise CheckpointError(f"{found}: has no training state to resume from")
    return out or found.parent.parent, found


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` for the block, then the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train_stage(
    command: str,
    build: RecipeBuilder,
    config: RunConfig,
    *,
    out: Path | None,
    resume: str | None,
    device_choice: str,
    console: Console,
) -> dict[str, Any]:
    with deterministic_algorithms(config.train.deterministic):
        ranks, device = init_distributed(device_choice)
        torch.manual_seed(config.train.seed)
        is_main = ranks.rank == 0

        def report(message: str) -> None:
            if is_main:
                # soft_wrap: a path in a message stays on one line, whatever the terminal width
                console.print(message, markup=False, highlight=False, soft_wrap=True)

        out_dir, resume_from = resolve_resume(resume, out, command, report)
        out_dir = make_out_dir(out_dir, command)
        check_before_loading(command, config, out_dir, resume_from)
        if is_main:
            write_resolved_config(out_dir, config)
        recipe = build(config, device, ranks, report)
        progress = TrainingProgress(console, enabled=is_main)
        trainer = Trainer(recipe, config.train, out_dir, device, ranks, progress)
        if resume_from is not None:
            report(f"resuming from {resume_from}")
        result = trainer.run(resume_from)
        history = result.pop("history")
        if is_main:
            plot_losses(history, out_dir / "loss.png", f"qformer {command}")
            console.print(summary_table(history))
        last = history[-1] if history else {}
        first = history[0] if history else {}
        return {
            "out_dir": str(out_dir),
            "final_checkpoint": result["final_checkpoint"],
            "steps": result["steps"],
            "first": {k: v for k, v in first.items() if k not in ("step", "epoch")},
            "last": {k: v for k, v in last.items() if k not in ("step", "epoch")},
            "loss_plot": str(out_dir / "loss.png"),
            "bad_samples": recipe.loader.bad_samples.summary(),
        }
