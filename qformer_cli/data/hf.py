"""Any ``datasets`` source: a hub id, or local parquet / JSON(L) / CSV files, an imagefolder, or
webdataset ``.tar`` shards, read with ``datasets`` (streaming by default, so shards are read
lazily and split across ranks and DataLoader workers by ``datasets`` itself).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from qformer_cli.data.loader import BadSample
from qformer_cli.data.sample import IMAGE_EXTENSIONS, ImageSource, Sample
from qformer_cli.errors import DataError

# Column names tried in order when a column is not named explicitly.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "sentences")
IMAGE_ID_COLUMNS = ("image_id", "id", "__key__")
BUILDER_BY_EXTENSION = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tar": "webdataset",
}


@dataclass(frozen=True)
class Columns:
    """Which record fields hold what; ``None`` means "the first of the usual names present"."""

    image: str | None = None
    caption: str | None = None
    question: str | None = "question"
    answers: str | None = "answers"
    image_id: str | None = None


def local_builder(source: str) -> tuple[str, dict[str, Any]] | None:
    """The ``datasets`` builder and arguments for a local file, folder or glob (None: a hub id)."""
    path = Path(source)
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
    elif path.is_file():
        files = [source]
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file())
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
            return "imagefolder", {"data_dir": source}
    else:
        return None
    for extension, builder in BUILDER_BY_EXTENSION.items():
        matching = [f for f in files if Path(f).suffix.lower() == extension]
        if matching:
            return builder, {"data_files": matching}
    raise DataError(f"{source}: no parquet, json, csv, tar or image files found")


def open_hf_dataset(
    source: str, *, split: str = "train", streaming: bool = True, name: str | None = None
) -> Any:
    """``datasets.load_dataset`` for ``source``. Local files are read as split ``split``, except
    an imagefolder, which is read whole. Image columns are left undecoded so that a corrupt image
    is one bad sample, not a crash inside ``datasets``."""
    import datasets

    builder = local_builder(source)
    try:
        if builder is None:
            dataset = datasets.load_dataset(source, name, split=split, streaming=streaming)
        elif builder[0] == "imagefolder":
            dataset = datasets.load_dataset(
                "imagefolder", split="train", streaming=streaming, **builder[1]
            )
        else:
            files = {split: builder[1]["data_files"]}
            dataset = datasets.load_dataset(
                builder[0], data_files=files, split=split, streaming=streaming
            )
    except DataError:
        raise
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{source}: cannot open dataset ({first_line})") from None
    return _undecoded_images(dataset)


def _undecoded_images(dataset: Any) -> Any:
    import datasets

    features = getattr(dataset, "features", None) or {}
    for column, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class HFSampleSource:
    """Re-iterable samples of a ``datasets`` dataset; a record that cannot become a sample is
    yielded as a :class:`BadSample` (the loader reports it in the main process)."""

    def __init__(self, dataset: Any, columns: Columns, name: str) -> None:
        self.dataset = dataset
        self.columns = columns
        self.name = name

    def __iter__(self) -> Iterator[Sample | BadSample]:
        for index, record in enumerate(self.dataset):
            where = f"{self.name}: record {index}"
            try:
                yield record_to_sample(record, self.columns, where, fallback_id=where)
            except DataError as error:
                yield BadSample(str(error), "missing field")

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def read_hf_dataset(
    source: str,
    *,
    split: str = "train",
    columns: Columns = Columns(),
    streaming: bool = True,
    name: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1000,
) -> HFSampleSource:
    """Samples from a ``datasets`` source, this rank's share only (whole shards when the shard
    count divides by ``world_size``, else every ``world_size``-th record)."""
    import datasets.distributed

    dataset = open_hf_dataset(source, split=split, streaming=streaming, name=name)
    if shuffle_seed is not None:
        if streaming:
            dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer)
        else:
            dataset = dataset.shuffle(seed=shuffle_seed)
    if world_size > 1:
        dataset = datasets.distributed.split_dataset_by_node(dataset, rank, world_size)
    return HFSampleSource(dataset, columns, f"{source} [{split}]")


def pick_column(
    present: Container[str], explicit: str | None, usual: tuple[str, ...]
) -> str | None:
    """The field a record (or a table's columns, ``present``) holds a thing in: the one named
    explicitly (``data.columns``) when present, else the first of the usual names present."""
    if explicit is not None:
        return explicit if explicit in present else None
    return next((name for name in usual if name in present), None)


def record_to_sample(
    record: dict[str, Any], columns: Columns, where: str, fallback_id: str
) -> Sample:
    """A sample from one record; ``fallback_id`` is its image id when no id column exists."""
    image_column = pick_column(record, columns.image, IMAGE_COLUMNS)
    if image_column is None:
        looked_for = columns.image or ", ".join(IMAGE_COLUMNS)
        raise DataError(f"{where}: no image field (looked for {looked_for})")
    if record[image_column] is None:
        raise DataError(f"{where}: missing field '{image_column}'")
    id_column = pick_column(record, columns.image_id, IMAGE_ID_COLUMNS)
    caption_column = pick_column(record, columns.caption, CAPTION_COLUMNS)
    question = record.get(columns.question) if columns.question else None
    answers = record.get(columns.answers) if columns.answers else None
    image = _image_source(record[image_column], where)
    return Sample(
        image=image,
        file=str(image) if isinstance(image, Path) else "",
        image_id=record[id_column] if id_column else fallback_id,
        captions=_texts(record.get(caption_column) if caption_column else None, where),
        question=question if isinstance(question, str) else None,
        answers=_texts(answers, where) if question is not None else (),
        origin=where,
    )


def _image_source(value: Any, where: str) -> ImageSource:
    if isinstance(value, Image.Image | bytes):
        return value
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return Path(value["path"])
    if isinstance(value, str):
        return Path(value)
    raise DataError(f"{where}: image field holds {type(value).__name__}, not an image")


def _texts(value: Any, where: str) -> tuple[str, ...]:
    """Captions or answers as strings: a string, a list of strings, or a list of dicts with the
    text under "answer" / "raw" / "caption" / "text" (VQAv2 and Karpathy-style records)."""
    if value is None:
        return ()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict):  # datasets' Sequence of dicts arrives as a dict of lists
        value = [dict(zip(value, row, strict=True)) for row in zip(*value.values(), strict=True)]
    texts = []
    for item in value:
        if isinstance(item, dict):
            item = next((item[k] for k in ("answer", "raw", "caption", "text") if k in item), None)
        if not isinstance(item, str):
            raise DataError(f"{where}: text field holds {type(item).__name__}, not text")
        texts.append(item)
    return tuple(texts)


# --------------------------------------------------------------------------------------------
# `--data` values read through `datasets`: hub ids, and anything with the hf: prefix

HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.\[\]:%+-]+)?$")


def hub_source(value: str) -> tuple[str, str | None, str] | None:
    """``(dataset, config, split)`` of ``hf:NAME[:CONFIG][@SPLIT]`` (NAME a hub id or a local
    path ``datasets`` can read), or of ``NAME[:CONFIG][@SPLIT]`` when it is a hub id and no
    local path; None for every other ``--data`` value. The split defaults to ``train``."""
    if value.startswith(HUB_PREFIX):
        text = value[len(HUB_PREFIX) :]
    elif _HUB_ID.match(value) and not Path(value).exists() and not _names_a_file(value):
        text = value
    else:
        return None
    text, _, split = text.partition("@") if "@" in text else (text, "", "train")
    head, _, last = text.rpartition("/")
    name, _, config = last.partition(":")
    return (f"{head}/{name}" if head else name), (config or None), split


def _names_a_file(value: str) -> bool:
    """``dir/train.json`` that does not exist is a missing file, not a hub id."""
    suffixes = (*BUILDER_BY_EXTENSION, ".tsv")
    return value.partition("@")[0].lower().endswith(suffixes)


def read_hub_samples(value: str, columns: Columns, bad: Any = None) -> list[Sample]:
    """Every record of a ``datasets`` source (:func:`hub_source`) as a sample, read whole (not
    streamed: the map-style sampler then shards it and resume is exact); a record that cannot
    become a sample follows ``bad`` (a :class:`~qformer_cli.data.sample.BadSampleLog`)."""
    parsed = hub_source(value)
    if parsed is None:
        raise DataError(f"{value}: not a datasets source (hf:NAME[:CONFIG][@SPLIT])")
    dataset, config, split = parsed
    samples = []
    for item in read_hf_dataset(
        dataset, split=split, columns=columns, streaming=False, name=config
    ):
        if isinstance(item, BadSample):
            if bad is None:
                raise DataError(item.message)
            bad.handle(item.message, item.reason)
            continue
        samples.append(item)
    return samples
