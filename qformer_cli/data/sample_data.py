"""The shipped synthetic world's files by split and backbone, so commands can default to it.

Its folder is :func:`qformer_cli.embedded.sample_data_dir`: ``$QFORMER_SAMPLE_DATA`` when set,
else the copy installed with the package, else the source tree's ``sample_data/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qformer_cli.embedded import sample_data_dir
from qformer_cli.errors import UsageError

SPLITS = ("train", "val", "test")
BACKBONES = ("vision", "opt", "t5", "bert")


@dataclass(frozen=True)
class SplitFiles:
    """One split's files in every format (``coco_captions`` is None for train)."""

    split: str
    root: Path  # Karpathy "image" paths are relative to it
    image_dir: Path  # COCO "file_name"s and VQA image ids resolve here
    karpathy: Path
    coco_captions: Path | None
    vqa_questions: Path
    vqa_annotations: Path
    scenes: Path  # ground-truth objects per image
    hard_negatives: Path  # captions with one attribute swapped (SugarCrepe layout)


def sample_split_files(split: str, root: Path | None = None) -> SplitFiles:
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    root = root or sample_data_dir()
    return SplitFiles(
        split=split,
        root=root,
        image_dir=root / "images" / split,
        karpathy=root / f"karpathy_{split}.json",
        coco_captions=None if split == "train" else root / f"captions_{split}.json",
        vqa_questions=root / f"vqa_{split}_questions.json",
        vqa_annotations=root / f"vqa_{split}_annotations.json",
        scenes=root / f"scenes_{split}.json",
        hard_negatives=root / f"hard_negatives_{split}.json",
    )


def sample_backbone_dir(name: str, root: Path | None = None) -> Path:
    """``sample_data/backbones/{vision,opt,t5,bert}``: transformers model folders."""
    if name not in BACKBONES:
        raise UsageError(f"unknown sample backbone '{name}' (choose from {', '.join(BACKBONES)})")
    return (root or sample_data_dir()) / "backbones" / name
