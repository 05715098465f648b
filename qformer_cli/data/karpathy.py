"""Karpathy-split caption JSON, in both layouts people have.

As LAVIS ships it for COCO and Flickr30k (lists, one file per split):

- train: ``[{"caption": str, "image": "val2014/COCO_val2014_...jpg", "image_id": ...}]``, one
  entry per caption;
- val / test: ``[{"image": ..., "caption": [str, ...]}]``, one entry per image (the image id is
  then the number at the end of the file name, as LAVIS derives it).

As Karpathy published it (``dataset_coco.json``, ``dataset_flickr30k.json``: one file, every
split): ``{"images": [{"filepath": "val2014", "filename": ..., "split": "train" | "restval" |
"val" | "test", "sentences": [{"raw": str, ...}], "cocoid": int}], "dataset": ...}``; the
image id is ``cocoid`` (Flickr30k: the file name's number). Training reads the ``train`` and
``restval`` splits (as LAVIS's COCO training set), evaluation the ``test`` split.
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


TRAINING_SPLITS = ("train", "restval")
EVALUATION_SPLITS = ("test",)


def is_original_karpathy(payload: object) -> bool:
    """Karpathy's own layout: an object whose ``images`` carry ``sentences`` (COCO captions
    JSON has ``annotations`` instead)."""
    if not isinstance(payload, dict) or "annotations" in payload:
        return False
    images = payload.get("images")
    return isinstance(images, list) and any(
        isinstance(image, dict) and "sentences" in image for image in images[:10]
    )


def read_original_karpathy(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    splits: tuple[str, ...],
    bad: BadSampleLog | None = None,
) -> list[Sample]:
    """One sample per image of ``splits`` with all its ``sentences[].raw`` captions; image files
    at ``image_root/filepath/filename`` (default root: the JSON file's folder)."""
    images = require_list(read_json(path), path, "images")
    root = Path(image_root) if image_root is not None else Path(path).parent
    samples = []
    for index, entry in enumerate(images):
        where = entry_label(path, "image", index, entry, "cocoid")
        try:
            if require_field(entry, "split", where, str) in splits:
                samples.append(_original_sample(entry, where, root))
        except DataError as error:
            raise_or_skip(bad, error, "missing field")
    if not samples:
        raise DataError(f"{path}: no images in the {' / '.join(splits)} split")
    return samples


def _original_sample(entry: dict, where: str, root: Path) -> Sample:
    name = require_field(entry, "filename", where, str)
    folder = entry.get("filepath", "")
    sentences = require_field(entry, "sentences", where, list)
    captions = tuple(
        require_field(sentence, "raw", f"{where}: sentence {k}", str).strip()
        for k, sentence in enumerate(sentences)
    )
    if not captions or not all(captions):
        raise DataError(f"{where}: an empty caption")
    image_id = entry.get("cocoid")
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        image_id = image_id_from_name(name)
    file = f"{folder}/{name}" if isinstance(folder, str) and folder else name
    return Sample(image=root / file, image_id=image_id, captions=captions, origin=where, file=file)


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
    return Sample(
        image=root / image, image_id=image_id, captions=captions, origin=where, file=image
    )
