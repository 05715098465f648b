"""The ``qformer`` command line: parse options, build the config, call one function, print.

One module per family of commands: training (``train``), inference and evaluation over
files (``infer``), one image at a time (``ask``), export and conversion (``export``),
``info``; ``COMMANDS`` below registers them on the one Typer ``app``, in the order ``--help``
lists them. The work itself happens in the
library: ``qformer_cli.train``, ``qformer_cli.inference``, ``qformer_cli.export``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qformer_cli.cli import ask, export, infer, info, train
from qformer_cli.cli.common import app

__all__ = ["app", "main"]

COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("pretrain-stage1", train.pretrain_stage1),
    ("pretrain-stage2", train.pretrain_stage2),
    ("extract-features", train.extract_features),
    ("caption", infer.caption),
    ("eval-caption", infer.eval_caption),
    ("eval-vqa", infer.eval_vqa),
    ("ask", ask.ask),
    ("match", ask.match),
    ("export-onnx", export.export_onnx_command),
    ("convert", export.convert),
    ("eval-retrieval", infer.eval_retrieval),
    ("info", info.info),
]
for name, command in COMMANDS:
    app.command(name)(command)


def _quiet_libraries() -> None:
    """transformers' load-progress bars and advice would drown our one-line messages."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _passive_openmp_threads() -> None:
    """OpenMP threads that busy-wait make every op wait for a descheduled sibling when anything
    else runs on the machine: measured on 2 cores with one other busy process, a tiny stage-1
    step took 15 s with the default policy and 0.6 s with PASSIVE. Set before torch loads, by
    the command only: importing the library changes no environment variable."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    _passive_openmp_threads()
    _quiet_libraries()
    app()
