"""A folder of images (what ``caption`` reads when it is given a directory)."""

from __future__ import annotations

from pathlib import Path

from qformer_cli.data.json_files import shown
from qformer_cli.data.sample import IMAGE_EXTENSIONS, Sample, ids_from_names, image_id_from_name
from qformer_cli.errors import DataError


def read_image_folder(folder: str | Path, *, recursive: bool = True) -> list[Sample]:
    """One sample per image file (by extension), sorted by path. Image ids are the numbers at
    the end of the file names when every file has a distinct one (COCO-style names), else the
    paths relative to ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{shown(folder)}: image folder not found")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        looked_for = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"{shown(folder)}: no images found (looked for {looked_for})")
    relative = [p.relative_to(folder).as_posix() for p in files]
    ids = ids_from_names(relative)
    return [
        Sample(image=path, image_id=image_id, origin=f"{shown(folder)}: {name}", file=name)
        for path, image_id, name in zip(files, ids, relative, strict=True)
    ]


def image_file_sample(path: Path) -> Sample:
    """One image file as a sample: its id from its name, as :func:`read_image_folder` names
    ids, and its name as the file results show."""
    return Sample(image=path, image_id=image_id_from_name(path), origin=str(path), file=path.name)
