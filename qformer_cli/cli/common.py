"""What every ``qformer`` command shares: the Typer app, the common options, error handling
and printing.

Conventions shared by every subcommand: ``--config FILE`` and repeatable ``--set key=value``;
``--json`` prints the final result as one JSON object on stdout (tables and progress go to
stderr then); ``--debug`` shows tracebacks. Exit codes: 0 success, 1 runtime or data error,
2 usage or configuration error.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from qformer_cli import __version__
from qformer_cli.errors import QformerError

try:  # recent typer vendors click, and raises its own copies of click's exceptions
    from typer._click import exceptions as click_exceptions
except ImportError:  # typer that uses the click package
    from click import exceptions as click_exceptions  # type: ignore[no-redef]
NO_ARGS_IS_HELP = getattr(click_exceptions, "NoArgsIsHelpError", ())

if TYPE_CHECKING:  # the config module is imported by the commands that need it
    from qformer_cli.config import RunConfig


class OneLineUsageErrors(TyperGroup):
    """click's usage errors (a bad flag, a value out of its range) as our other errors are: one
    line on stderr, ``error: ...`` with where to find help, exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            returned = super().main(*args, standalone_mode=False, **kwargs)
        except click_exceptions.UsageError as error:
            if isinstance(error, NO_ARGS_IS_HELP):  # bare `qformer`: the help, as click shows it
                error.show()
                sys.exit(error.exit_code)
            where = error.ctx.command_path if error.ctx is not None else "qformer"
            _print_error(f"{error.format_message()} (see {where} -h)", "error")
            sys.exit(error.exit_code)
        except click_exceptions.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except typer.Abort:
            _print_error("interrupted", "stopped")
            sys.exit(130)
        sys.exit(returned if isinstance(returned, int) else 0)  # typer.Exit(code) returns code


app = typer.Typer(
    cls=OneLineUsageErrors,
    name="qformer",
    help="Train, evaluate and export BLIP-2 Q-Formers.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="YAML config file, or a shipped config's name (tiny, blip2_vitg_opt2.7b, ...; "
        "see configs/). Default: tiny, the embedded default.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.lr=2e-4 (repeatable)."),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Output directory (default: runs/<command>-<timestamp>)."),
]


def embedded_default(key: str) -> str:
    """How a flag's help states a config-backed default: the config key and its value in the
    embedded default (configs/tiny.yaml, used when there is no --config)."""
    from qformer_cli.config import load_config

    value: Any = load_config(None)
    for part in key.split("."):
        value = getattr(value, part)
    shown = repr(value) if isinstance(value, str) else value
    return f"Default: the config's {key} ({shown} in the embedded default)."


SeedOption = Annotated[
    int | None, typer.Option("--seed", help=f"Random seed. {embedded_default('train.seed')}")
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device", help="auto | cpu | cuda | cuda:N (auto: a CUDA GPU when usable, else cpu)."
    ),
]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="auto | fp32 | bf16 | fp16 (autocast; master weights stay fp32; auto: bf16 where "
        "the GPU or CPU computes it natively, else fp32). " + embedded_default("train.precision"),
    ),
]
MaxStepsOption = Annotated[
    int | None,
    typer.Option(
        "--max-steps",
        help="Stop after N steps (0: train.epochs). " + embedded_default("train.max_steps"),
    ),
]
BatchSizeOption = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Global batch size (all processes). " + embedded_default("train.batch_size"),
    ),
]
VisionModelOption = Annotated[
    str | None,
    typer.Option(
        "--vision-model",
        help="Frozen vision encoder: hub id or path. " + embedded_default("model.vision.model"),
    ),
]
TrainDataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="Training captions: COCO JSON, a LAVIS Karpathy list, dataset_coco.json, a JSONL / "
        "CSV table with image, caption columns, webdataset shards ('shards/{00000..00127}.tar' "
        "or a glob) or parquet. Twice or more: a mixture, one source per batch (weights: "
        "data.sources). Default: the config's data.train (the embedded default: sample_data's "
        "train split).",
    ),
]
SkipBadOption = Annotated[
    bool,
    typer.Option(
        "--skip-bad-samples",
        help="Skip unreadable or missing images and malformed entries, count them and list them "
        "in <out>/skipped.json (default: stop at the first, naming it).",
    ),
]
FeaturesOption = Annotated[
    Path | None,
    typer.Option(
        "--features",
        help="Train on a feature cache from `qformer extract-features` instead of the images "
        "(no augmentation; the vision encoder is not loaded).",
    ),
]
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the training step (compiles for minutes once; H100: 1.6x faster "
        "stage-1 steps, see BENCHMARKS.md).",
    ),
]
MaxNonfiniteOption = Annotated[
    int | None,
    typer.Option(
        "--max-nonfinite-steps",
        help="Stop (exit 1) after this many non-finite steps in a row (0: never; default 5).",
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress lines (errors and results only).")
]
ResumeOption = Annotated[
    str | None,
    typer.Option("--resume", help="auto (newest good checkpoint of --out / the latest run) | DIR."),
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="--out holds an earlier run: remove its checkpoints and metrics and start afresh "
        "(without it, such an --out is refused).",
    ),
]


def _print_error(message: str, label: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"{label}: {message}", markup=False)


def _fail(message: str, code: int, label: str = "error") -> None:
    _print_error(message, label)
    raise typer.Exit(code)


def _removing_empty_out_dirs_on_exit(command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``command``; if it raises (a refusal, a failure, an exit), the output directories it
    created and left empty are removed, so a refused command leaves no ``runs/<command>-<time>``."""
    try:
        return command(*args, **kwargs)
    except BaseException:
        # Only runtime.make_out_dir creates output directories; not imported means none were
        # created (and an error path need not import torch to find that out).
        runtime = sys.modules.get("qformer_cli.runtime")
        if runtime is not None:
            runtime.remove_empty_out_dirs()
        raise


def handles_errors(command: F) -> F:
    """Turn expected errors into one line on stderr and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            return _removing_empty_out_dirs_on_exit(command, *args, **kwargs)
        except typer.Exit:
            raise
        except QformerError as exc:
            if debug:
                raise
            _fail(str(exc), exc.exit_code, exc.label)
        except KeyboardInterrupt:
            _fail("interrupted", 130, "stopped")
        except Exception as exc:
            if debug:
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"{type(exc).__name__}: {first_line} (rerun with --debug for details)", 1)

    return wrapper  # type: ignore[return-value]


def output_console(as_json: bool) -> Console:
    """Tables go to stdout, or to stderr when stdout carries the JSON result."""
    return Console(stderr=as_json)


def print_json(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result, default=str) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qformer {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Train, evaluate and export BLIP-2 Q-Formers."""


def data_flags(data: list[str] | None) -> dict[str, Any]:
    """``--data`` once: ``data.train``; twice or more: ``data.sources`` with equal weights."""
    if not data:
        return {}
    if len(data) == 1:
        return {"data.train": data[0]}
    return {"data.sources": [{"path": path, "weight": 1.0} for path in data]}


def training_flags(
    max_steps: int | None,
    batch_size: int | None,
    precision: str | None,
    seed: int | None,
    skip_bad_samples: bool,
) -> dict[str, Any]:
    """The flags every training command has, as config keys."""
    return {
        "train.max_steps": max_steps,
        "train.batch_size": batch_size,
        "train.precision": precision,
        "train.seed": seed,
        "data.skip_bad_samples": skip_bad_samples or None,
    }


def given_keys(overrides: list[str] | None, flags: dict[str, Any]) -> set[str]:
    """The config keys the command line sets: ``--set`` keys and the flags given."""
    given = {text.split("=", 1)[0].strip() for text in overrides or []}
    return given | {key for key, value in flags.items() if value is not None}


def flag_overrides(**flags: Any) -> list[str]:
    """Dedicated flags as ``--set`` overrides (applied after the config file and --set)."""
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]


def finish(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_location(model: Path | None) -> Path | None:
    """``--model`` (or ``--init``) as a local path: ``RUN:best`` is the run's best validated
    checkpoint. A Hugging Face hub id (``owner/name``) that is not a local path is fetched with
    ``huggingface_hub`` (or found in its cache), as ``from_pretrained`` fetches backbones: the
    commands then read the snapshot like any local directory."""
    if model is None:
        return None
    from qformer_cli.checkpoint import best_of

    model = best_of(model)
    if Path(model).exists() or not _HUB_ID.match(str(model)):
        return model
    from huggingface_hub import snapshot_download

    from qformer_cli.errors import UsageError, first_line

    try:
        return Path(snapshot_download(str(model)))
    except Exception as error:  # offline, unknown id, no access: one line
        raise UsageError(
            f"--model {model}: no such file or folder, and not fetched from the Hugging Face "
            f"hub ({first_line(error)})"
        ) from None


def require_inputs(**paths: Path | None) -> None:
    """Refuse a path option naming nothing (exit 2), before any work: ``caption_file=PATH``
    checks ``--caption-file``."""
    from qformer_cli.errors import UsageError

    for name, path in paths.items():
        if path is not None and not Path(path).exists():
            raise UsageError(f"--{name.replace('_', '-')} {path}: no such file or folder")


def load_run_config(
    command: str, config: str | None, overrides: list[str] | None, flags: dict[str, Any]
) -> RunConfig:
    """``--config`` (with its ``per_command`` settings for ``command``), then ``--set``, then
    the command's dedicated flags."""
    from qformer_cli.config import load_config

    return load_config(config, [*(overrides or []), *flag_overrides(**flags)], command)


def progress_report(label: str, quiet: bool) -> Any:
    """A :class:`~qformer_cli.progress.ProgressReport` on stderr for a job of unknown size yet
    (the inference loops pass (done, total) to its ``counter``)."""
    from qformer_cli.progress import ProgressReport

    return ProgressReport(Console(stderr=True), label, 0, quiet=quiet)


def print_metrics(console: Console, metrics: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in metrics.items():
        if isinstance(value, float | int):
            table.add_row(name, f"{value:.4f}")
    for name, reason in metrics.get("skipped", {}).items():
        table.add_row(name, f"skipped: {reason}")
    console.print(table)
