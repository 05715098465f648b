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

# Shown at the end of each command's --help.
EXAMPLES: dict[str, list[str]] = {
    "pretrain-stage1": [
        "qformer pretrain-stage1 --out runs/s1",
        "torchrun --nproc-per-node 8 -m qformer_cli pretrain-stage1 \\",
        "    --config blip2_stage1_vitg --data coco_karpathy_train.json --out runs/s1",
    ],
    "pretrain-stage2": [
        "qformer pretrain-stage2 --init runs/s1 --out runs/s2",
        "qformer pretrain-stage2 --init runs/s1 --llm facebook/opt-2.7b --data captions.jsonl",
    ],
    "finetune": [
        "qformer finetune --task caption --init runs/s2 --out runs/caption-ft",
        "qformer finetune --task instruct --init runs/s2 --instructions instructions.jsonl",
        "qformer finetune --task retrieval --init runs/s1 --config blip2_finetune_retrieval_coco",
    ],
    "extract-features": [
        "qformer extract-features --out features/ && qformer pretrain-stage1 --features features/",
    ],
    "caption": [
        "qformer caption --model runs/s2 --images ~/photos --skip-bad-samples",
        "qformer caption --model runs/s2 --annotations captions_val.json --num-beams 1",
    ],
    "eval-caption": [
        "qformer eval-caption --predictions captions.json --annotations captions_val.json",
    ],
    "eval-vqa": [
        "qformer eval-vqa --model runs/s2 --split val",
        "qformer eval-vqa --model runs/s2 --questions v2_Questions_val2014.json \\",
        "    --annotations v2_Annotations_val2014.json --images val2014/ --metric lavis",
    ],
    "ask": [
        'qformer ask --model runs/s2 --image photo.jpg "what colour is the car?"',
        'qformer ask --model runs/s2 --image photo.jpg --prompt "a photo of" --do-sample',
    ],
    "match": [
        'qformer match --model runs/s1 --image photo.jpg --text "a red car" --text "a cat"',
    ],
    "export-onnx": [
        "qformer export-onnx --model runs/s2 --out onnx/ && qformer caption --backend onnx \\",
        "    --model onnx/ --images ~/photos",
    ],
    "convert": [
        "qformer convert hf_blip2/ --model runs/s2 --to transformers",
        "qformer convert blip2_stage1.pth --model runs/s1 --to lavis",
    ],
    "eval-retrieval": [
        "qformer eval-retrieval --model runs/s1 --annotations coco_karpathy_test.json",
    ],
    "info": ["qformer info --config blip2_vitg_opt2.7b --json"],
}


def _epilog(name: str) -> str:
    # click rewraps help text except paragraphs that start with \b
    lines = "\n".join(f"  {line}" for line in EXAMPLES[name])
    return f"\b\nExamples:\n{lines}"


COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("pretrain-stage1", train.pretrain_stage1),
    ("pretrain-stage2", train.pretrain_stage2),
    ("finetune", train.finetune),
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
    app.command(name, epilog=_epilog(name))(command)


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
