"""Run a training stage end to end: output dir, resume, the loop, plots and the summary."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from qformer_cli import checkpoint
from qformer_cli.config import RunConfig
from qformer_cli.errors import CheckpointError, UsageError
from qformer_cli.runtime import (
    Ranks,
    check_precision_speed,
    init_distributed,
    leave_distributed,
    make_out_dir,
    resolve_precision,
)
from qformer_cli.train.common import LEGACY_RUN_CONFIG, RUN_CONFIG, write_resolved_config
from qformer_cli.train.loop import StageRecipe, Trainer
from qformer_cli.train.preflight import check_before_loading
from qformer_cli.train.progress import TrainingProgress, plot_losses, summary_table

RecipeBuilder = Callable[[RunConfig, torch.device, Ranks, Callable[[str], None]], StageRecipe]


def newest_run(run_name: str, runs: Path = Path("runs")) -> Path | None:
    candidates = sorted(runs.glob(f"{run_name}-*")) if runs.is_dir() else []
    return candidates[-1] if candidates else None


def resolve_resume(
    resume: str | None, out: Path | None, run_name: str, warn: Callable[[str], None]
) -> tuple[Path | None, Path | None]:
    """(output dir, checkpoint to resume from) for ``--resume auto|DIR`` and ``--out``."""
    if resume is None:
        return out, None
    if resume == "auto":
        run_dir = out or newest_run(run_name)
        if run_dir is None or not run_dir.exists():
            warn("--resume auto: no earlier run found; starting fresh")
            return out, None
        found = checkpoint.newest_good_checkpoint(run_dir, warn)
        if found is None:
            warn(f"--resume auto: no complete checkpoint in {run_dir}; starting fresh")
        return run_dir, found
    if not Path(resume).exists():
        raise UsageError(f"--resume {resume}: no such folder (or give --resume auto)")
    found = checkpoint.resolve_checkpoint(Path(resume))
    if not (found / checkpoint.TRAIN_STATE).is_file():
        raise CheckpointError(f"{found}: has no training state to resume from")
    return out or found.parent.parent, found


# What marks a directory as holding an earlier training run, and everything a run writes at
# the top of its --out: --overwrite removes these and nothing else (never a user's own files).
RUN_MARKERS = ("metrics.jsonl", f"{checkpoint.CHECKPOINTS}/step-*")
RUN_OUTPUTS = (
    *RUN_MARKERS,
    f"{checkpoint.CHECKPOINTS}/.step-*.tmp",  # a checkpoint being written when a run died
    "loss.png",
    RUN_CONFIG,
    LEGACY_RUN_CONFIG,  # an earlier version's run_config.json
)
# The same for a feature cache written by extract-features.
FEATURE_MARKERS = ("index.json", "shard-*.safetensors")
FEATURE_OUTPUTS = (*FEATURE_MARKERS, ".index.json.tmp", ".shard-*.safetensors.tmp")


def _matching(directory: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in patterns for path in directory.glob(pattern)})


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


RUN_ADVICE = (
    "continue it with --resume auto, or start afresh with --overwrite (removes its checkpoints "
    "and metrics)"
)
FEATURE_ADVICE = "write elsewhere, or replace it with --overwrite (removes its index and shards)"


def refuse_earlier_run(
    directory: Path,
    *,
    markers: tuple[str, ...] = RUN_MARKERS,
    what: str = "run",
    advice: str = RUN_ADVICE,
) -> None:
    """Refuse an output directory that holds an earlier run (``markers``).

    Writing a new run over an old one would leave the old checkpoints behind, and a later
    ``--model DIR`` would pick the newest of them: the old model.
    """
    found = _matching(directory, markers)
    if found:
        names = ", ".join(str(path.relative_to(directory)) for path in found[:3])
        more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
        raise UsageError(f"{directory}: holds an earlier {what} ({names}{more}); {advice}")


def remove_earlier_run(
    directory: Path, *, is_main: bool, outputs: tuple[str, ...] = RUN_OUTPUTS
) -> None:
    """``--overwrite``: the main process removes the earlier run's files (``outputs``, nothing
    else) while the other processes wait, so that none starts writing before they are gone."""
    if is_main:
        _remove(_matching(directory, outputs))
        checkpoints = directory / checkpoint.CHECKPOINTS
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def feature_out_dir(out: Path, *, overwrite: bool, is_main: bool) -> Path:
    """extract-features' ``--out``: created, and refused (or, with ``overwrite``, cleared) when it
    holds an earlier cache, whose extra shards a smaller new cache would otherwise leave behind."""
    directory = make_out_dir(out, "features")
    if overwrite:
        remove_earlier_run(directory, is_main=is_main, outputs=FEATURE_OUTPUTS)
    else:
        refuse_earlier_run(
            directory, markers=FEATURE_MARKERS, what="feature cache", advice=FEATURE_ADVICE
        )
    return directory


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` for the block, then the previous setting.

    On CUDA, cuBLAS is deterministic only with a fixed workspace, which torch then requires
    (it raises at the first matmul otherwise): set here unless the user chose one."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def settle_precision(
    config: RunConfig, device: torch.device, report: Callable[[str], None]
) -> None:
    """Decide ``train.precision: auto`` for ``device`` in ``config`` (the run config then
    records what ran), and say so."""
    if config.train.precision != "auto":
        return
    config.train.precision, why = resolve_precision("auto", device)
    report(f"precision auto: {config.train.precision} ({why})")


def train_stage(
    run_name: str,
    stage: int,
    build: RecipeBuilder,
    config: RunConfig,
    *,
    out: Path | None,
    resume: str | None,
    device_choice: str,
    console: Console,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``stage`` with the recipe ``build`` makes; ``run_name`` names the default output
    directory (``runs/<run_name>-<time>``), the one ``--resume auto`` looks for, and messages.
    ``quiet``: no progress lines."""
    if overwrite and resume is not None:
        raise UsageError("--overwrite starts afresh and --resume continues a run: give one of them")
    with deterministic_algorithms(config.train.deterministic):
        ranks, device = init_distributed(device_choice)
        torch.manual_seed(config.train.seed)
        is_main = ranks.rank == 0

        def report(message: str) -> None:
            if is_main:
                # soft_wrap: a path in a message stays on one line, whatever the terminal width
                console.print(message, markup=False, highlight=False, soft_wrap=True)

        out_dir, resume_from = resolve_resume(resume, out, run_name, report)
        out_dir = make_out_dir(out_dir, run_name)
        # --out given to start a run (the default runs/<run_name>-<time> is new)
        fresh_in_given_dir = out is not None and resume is None
        if fresh_in_given_dir and not overwrite:
            refuse_earlier_run(out_dir)
        check_before_loading(stage, run_name, config, out_dir, resume_from)
        settle_precision(config, device, report)
        if not config.train.allow_slow_precision:
            check_precision_speed(device, config.train.precision)
        if fresh_in_given_dir and overwrite:  # only once the run passed every check
            remove_earlier_run(out_dir, is_main=is_main)
        recipe = build(config, device, ranks, report)
        if is_main:  # after build: a run refused for its data or model leaves no run config
            write_resolved_config(out_dir, config)
        progress = TrainingProgress(console, enabled=is_main, quiet=quiet)
        trainer = Trainer(recipe, config.train, out_dir, device, ranks, progress)
        if resume_from is not None:
            report(f"resuming from {resume_from} (its weights replace the initialisation above)")
        result = trainer.run(resume_from)
        history = result.pop("history")
        if is_main:
            plot_losses(history, out_dir / "loss.png", f"qformer {run_name}")
            console.print(summary_table(history))
        bad_samples = recipe.loader.bad_samples
        if is_main:
            bad_samples.write_records(out_dir / "skipped.json")
        if recipe.check_result is not None:
            recipe.check_result()
        last = history[-1] if history else {}
        first = history[0] if history else {}
        leave_distributed()
        return {
            "out_dir": str(out_dir),
            "final_checkpoint": result["final_checkpoint"],
            "steps": result["steps"],
            "first": {k: v for k, v in first.items() if k not in ("step", "epoch")},
            "last": {k: v for k, v in last.items() if k not in ("step", "epoch")},
            "loss_plot": str(out_dir / "loss.png"),
            **bad_samples.result_fields(),
        }
