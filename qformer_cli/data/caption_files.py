"""Any caption file, by its layout: COCO captions JSON, Karpathy's own ``dataset_*.json``,
LAVIS's Karpathy lists, or a JSONL / CSV caption table; the one entry point training and
retrieval read captions through."""

from __future__ import annotations

from pathlib import Path

from qformer_cli.data.coco import read_coco_captions
from qformer_cli.data.json_files import read_json
from qformer_cli.data.karpathy import is_original_karpathy, read_karpathy, read_original_karpathy
from qformer_cli.data.sample import BadSampleLog, Sample
from qformer_cli.data.tables import is_table


def read_caption_file(
    path: str | Path,
    image_root: str | Path | None,
    *,
    karpathy_splits: tuple[str, ...],
    bad: BadSampleLog | None = None,
) -> list[Sample]:
    """One sample per image (per caption for LAVIS's training lists); ``karpathy_splits``
    chooses the images of a Karpathy ``dataset_*.json``, which holds every split."""
    if is_table(path):
        return read_coco_captions(path, image_root, bad=bad)
    payload = read_json(path)
    if is_original_karpathy(payload):
        return read_original_karpathy(path, image_root, splits=karpathy_splits, bad=bad)
    if isinstance(payload, dict):
        return read_coco_captions(path, image_root, bad=bad)
    return read_karpathy(path, image_root, bad=bad)
