"""Karpathy-split JSON as LAVIS ships it for COCO and Flickr30k.

- train: ``[{"caption": str, "image": "val2014/COCO_val2014_...jpg", "image_id": ...}]``, one
  entry per caption;
- val / test: ``[{"image": ..., "caption": [str, ...]}]``, one entry per image (the image id is
  then the number at the end of the file name, as LAVIS derives it).
"""

from __future__ import annotations

from pathlib import Path

from qformer_cli.data.json_files import entry_label, read_json, require_field, require_list
from qformer_cli.data.sample import BadSampleLog, Sample, image_id_from_name, raise_or_skip
from qformer_cli.errors import DataError


def read_karpathy(
    path: str | Path, image_root: str | Path | None = None, *, bad: BadSampleLog | None = None
) -> list[Sample]:
    """One sample per entry; ``image`` paths are relative to ``image_root`` (default: the JSON
    file's folder)."""
    entries = require_list(read_json(path), path, None)
    root = Path(image_root) if image_root is not None else Path(path).parent
    samples = []
    for index, entry in enumerate(entries):
        where = entry_label(path, "entry", index, entry, "image_id")
        try:
            samples.append(_karpathy_sample(entry, where, root))
        except DataError as error:
            raise_or_skip(bad, error, "missing field")
    return samples


def _karpathy_sample(entry: object, where: str, root: Path) -> Sample:
    image = require_field(entry, "image", where, str)
    caption = require_field(entry, "caption", where, (str, list))
    captions = (caption,) if isinstance(caption, str) else tuple(caption)
    if not all(isinstance(c, str) for c in captions):
        raise DataError(f"{where}: field 'caption' should hold strings")
    if not captions or not all(c.strip() for c in captions):
        raise DataError(f"{where}: field 'caption' is empty")
    assert isinstance(entry, dict)  # checked by require_field
    image_id = entry.get("image_id")
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
        image_id = image_id_from_name(image)
    return Sample(image=root / image, image_id=image_id, captions=captions, origin=where)
