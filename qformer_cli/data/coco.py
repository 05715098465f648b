"""COCO-format caption files: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
"caption"}]}`` (the ground truth that caption metrics compare against)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qformer_cli.data.json_files import (
    check_unique_id,
    entry_label,
    require_field,
    require_list,
    require_text,
)
from qformer_cli.data.sample import BadSampleLog, Sample, raise_or_skip
from qformer_cli.data.tables import read_coco_captions_payload
from qformer_cli.errors import DataError


def read_coco_captions(
    path: str | Path, image_dir: str | Path | None = None, *, bad: BadSampleLog | None = None
) -> list[Sample]:
    """One sample per image, holding all of its captions in file order.

    ``image_dir`` holds the files named by ``file_name`` (default: the JSON file's folder).
    Images without captions are kept (with no captions); a caption for an unknown image id, or
    an entry missing a field, is a bad sample.
    """
    payload = read_coco_captions_payload(path)  # a caption table reads as COCO too
    image_dir = Path(image_dir) if image_dir is not None else Path(path).parent
    images = require_list(payload, path, "images")
    annotations = require_list(payload, path, "annotations")
    files: dict[int | str, tuple[str, str]] = {}  # image id -> (file_name, entry label)
    seen: dict[object, str] = {}
    for index, entry in enumerate(images):
        where = entry_label(path, "image", index, entry, "id")
        try:
            image_id = require_field(entry, "id", where, (int, str))
            check_unique_id(seen, image_id, where, "id")
            file_name = require_field(entry, "file_name", where, str)
        except DataError as error:
            raise_or_skip(bad, error, "missing field")
            continue
        files[image_id] = (file_name, where)
    captions = _captions_by_image(path, annotations, files, bad)
    return [
        Sample(
            image=image_dir / file_name,
            image_id=image_id,
            captions=tuple(captions.get(image_id, [])),
            origin=where,
            file=file_name,
        )
        for image_id, (file_name, where) in files.items()
    ]


def _captions_by_image(
    path: str | Path,
    annotations: list[object],
    files: dict[int | str, tuple[str, str]],
    bad: BadSampleLog | None,
) -> dict[int | str, list[str]]:
    captions: dict[int | str, list[str]] = {}
    for index, entry in enumerate(annotations):
        where = entry_label(path, "annotation", index, entry, "id")
        try:
            image_id = require_field(entry, "image_id", where, (int, str))
            caption = require_text(entry, "caption", where)
        except DataError as error:
            raise_or_skip(bad, error, "missing field")
            continue
        if image_id not in files:
            error = DataError(
                f"{where}: image_id {image_id!r} is not in 'images'{_typed(image_id, files)}"
            )
            raise_or_skip(bad, error, "unknown image")
            continue
        captions.setdefault(image_id, []).append(caption)
    return captions


def _typed(image_id: int | str, files: dict[int | str, Any]) -> str:
    """A hint when 'images' has the same id written as the other type (101 vs "101")."""
    other = next((key for key in files if str(key) == str(image_id)), None)
    if other is None:
        return ""
    return (
        f" (it has {other!r}: ids are matched by value and type, a {type(image_id).__name__} here)"
    )
