"""Web-scale caption formats, read map-style: webdataset ``.tar`` shards (as img2dataset writes
them: ``KEY.jpg`` with ``KEY.txt`` or ``KEY.json`` holding the caption) and parquet files (an
image column of encoded bytes or paths, and a caption column).

A shard set is indexed once (each member's offset and size, read from the tar headers without
reading the images), so its samples have a fixed order: the training sampler shards them across
ranks without duplicates or gaps, and ``--resume`` continues at the sample after the last one
trained, exactly as for JSON files. Images are read from the shard when loaded (in the
DataLoader's workers).

``--data`` names shards with a glob (``shards/*.tar``) or a brace range
(``shards/{00000..00127}.tar``, as img2dataset numbers them; quote it from the shell).
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from qformer_cli.data.hf import pick_column
from qformer_cli.data.json_files import shown
from qformer_cli.data.sample import (
    IMAGE_EXTENSIONS,
    BadSampleLog,
    Sample,
    ShardMember,
    raise_or_skip,
)
from qformer_cli.errors import DataError

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
CAPTION_EXTENSIONS = (".txt", ".json")
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "url", "path")
PARQUET_CAPTION_COLUMNS = ("caption", "text", "txt")


def is_shard_source(source: str) -> bool:
    """A ``.tar`` file, glob or brace range, or a ``.parquet`` file or glob."""
    return source.endswith((".tar", ".parquet"))


def is_tar_source(source: str) -> bool:
    """Webdataset shards: a ``.tar`` file, glob or brace range (streamable)."""
    return source.endswith(".tar")


def expand_source(source: str) -> list[Path]:
    """The files a ``--data`` value names: brace ranges expanded (zero-padded as written),
    globs matched, sorted."""
    match = _BRACE_RANGE.search(source)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        names = [
            source[: match.start()] + str(number).zfill(width) + source[match.end() :]
            for number in range(int(first), int(last) + 1)
        ]
        return [path for name in names for path in expand_source(name)]
    if any(char in source for char in "*?["):
        return sorted(Path(path) for path in glob.glob(source))
    return [Path(source)]


def read_shard_source(
    source: str, bad: BadSampleLog | None = None, columns: dict[str, str] | None = None
) -> list[Sample]:
    """One sample per caption of a webdataset shard set or parquet file(s), in file order;
    ``columns`` (``data.columns``) names a parquet file's image / caption / image_id columns
    when they are not the usual ones."""
    files = expand_source(source)
    missing = [path for path in files if not path.is_file()]
    if not files or missing:
        raise DataError(
            f"{source}: no such file {shown(missing[0]) if missing else '(none match)'}"
        )
    if source.endswith(".parquet"):
        return [sample for path in files for sample in _parquet_samples(path, bad, columns or {})]
    return [sample for path in files for sample in _shard_samples(path, bad)]


def _shard_samples(shard: Path, bad: BadSampleLog | None) -> list[Sample]:
    """A tar shard's samples: members grouped by key (the name before the first dot)."""
    images: dict[str, ShardMember] = {}
    captions: dict[str, ShardMember] = {}
    try:
        with tarfile.open(shard, "r:") as archive:  # uncompressed: headers only, data skipped
            for member in archive:
                if not member.isfile():
                    continue
                key, dot, extension = member.name.partition(".")
                extension = dot + extension.lower()
                place = ShardMember(shard, member.offset_data, member.size)
                if extension in IMAGE_EXTENSIONS:
                    images[key] = place
                elif extension in CAPTION_EXTENSIONS:
                    captions.setdefault(key, place)  # .txt before .json when both exist
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"{shown(shard)}: not a readable tar shard ({error})") from None
    samples = []
    for key, image in images.items():
        where = f"{shown(shard)}: {key}"
        try:
            caption = _caption_text(captions.get(key), where)
        except DataError as error:
            raise_or_skip(bad, error, "missing caption")
            continue
        samples.append(
            Sample(
                image=image,
                image_id=key,
                captions=(caption,),
                origin=where,
                file=f"{shard.name}/{key}",
            )
        )
    return samples


def _caption_text(member: ShardMember | None, where: str) -> str:
    return shard_caption(None if member is None else member.read(), where)


def shard_caption(raw: bytes | None, where: str) -> str:
    """The caption in a sample's ``.txt`` or ``.json`` member (None: it has neither); a
    :class:`DataError` naming ``where`` when it is missing, unreadable or empty."""
    if raw is None:
        raise DataError(f"{where}: no .txt or .json caption")
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            text = str(json.loads(text).get("caption") or "")
        except (json.JSONDecodeError, AttributeError):
            raise DataError(f"{where}: unreadable .json caption") from None
    if not text.strip():
        raise DataError(f"{where}: empty caption")
    return text.strip()


def _parquet_samples(path: Path, bad: BadSampleLog | None, named: dict[str, str]) -> list[Sample]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises many kinds for a bad file
        raise DataError(f"{shown(path)}: not a readable parquet file ({error})") from None
    columns = table.column_names
    image_column = pick_column(columns, named.get("image"), PARQUET_IMAGE_COLUMNS)
    caption_column = pick_column(columns, named.get("caption"), PARQUET_CAPTION_COLUMNS)
    id_column = pick_column(columns, named.get("image_id"), ("image_id",))
    if image_column is None or caption_column is None:
        raise DataError(
            f"{shown(path)}: needs an image column ({', '.join(PARQUET_IMAGE_COLUMNS)}) and a "
            f"caption column ({', '.join(PARQUET_CAPTION_COLUMNS)}); it has {', '.join(columns)}"
        )
    ids = table.column(id_column).to_pylist() if id_column else None
    samples = []
    images, captions = (table.column(name).to_pylist() for name in (image_column, caption_column))
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        where = f"{shown(path)}: row {index}"
        try:
            source = _parquet_image(image, path, where)
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{where}: empty caption")
        except DataError as error:
            raise_or_skip(bad, error, "missing field")
            continue
        image_id = ids[index] if ids is not None else f"{path.name}:{index}"
        file = str(source) if isinstance(source, Path) else f"{path.name}:{index}"
        samples.append(
            Sample(
                image=source,
                image_id=image_id,
                captions=(caption.strip(),),
                origin=where,
                file=file,
            )
        )
    return samples


def _parquet_image(value: Any, path: Path, where: str) -> bytes | Path:
    """Encoded bytes (a binary column, or ``datasets``' ``{"bytes", "path"}`` struct) or a
    path relative to the parquet file's folder."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, str) and value:
        return path.parent / value
    raise DataError(f"{where}: no image")
