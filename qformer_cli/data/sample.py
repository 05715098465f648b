"""The one sample type every reader yields, image loading, and the bad-sample policy."""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qformer_cli.config import DataConfig
from qformer_cli.data.json_files import shown
from qformer_cli.errors import DataError


@dataclass(frozen=True)
class ShardMember:
    """Where an image's encoded bytes lie in a tar shard (read when loaded, in a worker)."""

    shard: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with self.shard.open("rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


# Where a sample's pixels come from: a file, encoded bytes, a tar shard member, or an image.
ImageSource = Path | bytes | ShardMember | Image.Image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Decompression-bomb guard (``data.max_image_pixels``): a header promising more pixels than this
# is refused before decoding (a 10 kB PNG can declare 40000 x 40000). PIL's own guard is set to
# ours while we decode.
MAX_IMAGE_PIXELS = DataConfig.max_image_pixels
# Images above this many pixels are reduced while decoding (JPEG: draft mode, decoding at 1/2,
# 1/4 or 1/8 scale) or right after it, keeping the shorter side at least REDUCED_SHORT_SIDE:
# every model input (224-490 px) is far smaller, and a 100 MP photo then costs ~1/16 the memory.
REDUCE_ABOVE_PIXELS = 4096 * 4096
REDUCED_SHORT_SIDE = 2048
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class Sample:
    """One image with its text, whatever file format it came from.

    Caption datasets fill ``captions`` (one entry per caption for training files, all of an
    image's captions for evaluation files); VQA datasets fill ``question`` and, when the
    annotations are known, ``answers`` (the ten human answers) and ``answer`` (the majority);
    instruction data fills ``instruction`` and ``answer`` (the response).
    ``origin`` names the file and the entry, for error messages; ``file`` is the image's path
    as its source names it (relative to the image root), written next to the id in results.
    """

    image: ImageSource
    image_id: int | str
    captions: tuple[str, ...] = ()
    question: str | None = None
    question_id: int | None = None
    answers: tuple[str, ...] = ()
    answer: str | None = None
    answer_type: str | None = None
    question_type: str | None = None
    origin: str = ""
    file: str = ""
    source: str = ""  # the training source it came from, in a mixture (data.sources)
    instruction: str | None = None  # instruction data: the prompt, ``answer`` the response


def one_caption_per_sample(samples: list[Sample]) -> list[Sample]:
    """Split multi-caption samples into one sample per caption (how BLIP-2 trains on COCO)."""
    return [replace(s, captions=(c,)) for s in samples for c in s.captions]


_TRAILING_DIGITS = re.compile(r"(\d+)$")


def image_id_from_name(path: str | Path) -> int | str:
    """The number at the end of a file name ("COCO_val2014_000000391895.jpg" -> 391895), as
    LAVIS derives image ids; the file name itself when it has no such number."""
    stem = Path(path).stem
    match = _TRAILING_DIGITS.search(stem)
    return int(match.group(1)) if match else Path(path).name


def ids_from_names(names: list[str]) -> list[int | str]:
    """Image ids for image files: the numbers ending their names when every file has a
    distinct one (COCO-style names), else the names (paths) themselves."""
    numbers = [image_id_from_name(name) for name in names]
    if all(isinstance(n, int) for n in numbers) and len(set(numbers)) == len(numbers):
        return numbers
    return list(names)


class ImageError(DataError):
    """A sample's image is missing or cannot be decoded; ``reason`` names which, for counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_image(sample: Sample, max_pixels: int | None = None) -> Image.Image:
    """Decode a sample's image as RGB, reduced when it is very large (see REDUCE_ABOVE_PIXELS);
    a missing or unreadable image, or one declaring more than ``max_pixels`` (default
    :data:`MAX_IMAGE_PIXELS`), raises :class:`ImageError` (a :class:`DataError`) naming the
    entry and the file."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    source = sample.image
    if isinstance(source, Image.Image):
        return upright_rgb(source)
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), sample, "image bytes", max_pixels)
    if isinstance(source, ShardMember):
        return _decode(io.BytesIO(source.read()), sample, sample.file or "shard member", max_pixels)
    if not source.is_file():
        raise ImageError(f"{sample.origin}: image not found: {shown(source)}", "missing image")
    return _decode(source, sample, shown(source), max_pixels)


def upright_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, turned upright as its EXIF orientation says (phone photos are stored sideways).

    16-bit greyscale is scaled down to 8 bits: ``convert("RGB")`` would clip it at 255, so a
    mid-grey 16-bit scan would come out white.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        eight_bit = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(eight_bit)
    return image.convert("RGB")


def _reduction(width: int, height: int) -> int:
    """The integer factor a ``width`` x ``height`` image is reduced by (1: kept as it is)."""
    if width * height <= REDUCE_ABOVE_PIXELS:
        return 1
    return max(1, min(width, height) // REDUCED_SHORT_SIDE)


def _decode_reduced(image: Image.Image) -> Image.Image:
    """Decode ``image`` (opened, header read) as upright RGB, reduced by :func:`_reduction`."""
    factor = _reduction(image.width, image.height)
    if factor > 1 and image.format == "JPEG":  # the decoder itself skips the detail
        image.draft("RGB", (image.width // factor, image.height // factor))
    image = upright_rgb(image)
    factor = _reduction(image.width, image.height)  # what draft mode left to do
    return image.reduce(factor) if factor > 1 else image


def _decode(source: Path | io.BytesIO, sample: Sample, name: str, max_pixels: int) -> Image.Image:
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL raises only above twice this: ours speaks first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours is below
            with Image.open(source) as image:  # reads the header only
                pixels = image.width * image.height
                if pixels > max_pixels:
                    detail = f"{pixels} pixels; the limit is data.max_image_pixels={max_pixels}"
                    raise _too_large(sample, name, detail)
                return _decode_reduced(image)  # the full decode, inside the try
    except Image.DecompressionBombError as error:  # far over: PIL refuses inside open()
        raise _too_large(sample, name, str(error).splitlines()[0]) from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"{sample.origin}: unreadable image {name} ({reason})"
        raise ImageError(message, "unreadable image") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def _too_large(sample: Sample, name: str, detail: str) -> ImageError:
    return ImageError(f"{sample.origin}: image {name} too large ({detail})", "image too large")


@dataclass
class BadSampleLog:
    """What to do with a bad sample: raise its :class:`DataError` (the default), or, with
    ``skip=True`` (``--skip-bad-samples``), count it by reason, keep a record and go on.

    Readers call :meth:`handle` for bad entries; the data loader calls it in the main process
    for images that fail to load in a worker, so the counts are complete.
    """

    skip: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    # one row per skipped sample (``skipped.json``); the first max_records only, so that a
    # web-scale run with a bad shard keeps a bounded log
    records: list[dict[str, object]] = field(default_factory=list)
    max_records: int = 100_000

    def handle(
        self,
        message: str,
        reason: str,
        sample: Sample | None = None,
        *,
        question_id: object = None,
    ) -> None:
        """Raise, or count and record: the sample's ids and file when there is a sample, else
        the ``question_id`` of a VQA entry that could not become one."""
        if not self.skip:
            raise DataError(message)
        self.counts[reason] += 1
        if len(self.records) >= self.max_records:
            return
        record: dict[str, object] = {"reason": reason, "error": message}
        if sample is not None:
            record = {"image_id": sample.image_id, "file": sample.file, **record}
            question_id = sample.question_id
        if question_id is not None:
            record = {"question_id": question_id, **record}
        self.records.append(record)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def examples(self) -> list[str]:
        """The first few messages, for a report."""
        return [str(record["error"]) for record in self.records[:5]]

    def summary(self) -> str:
        """E.g. "skipped 3 bad samples: 2 unreadable image, 1 missing field"."""
        if not self.total:
            return "skipped 0 bad samples"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        plural = "s" if self.total != 1 else ""
        return f"skipped {self.total} bad sample{plural}: {reasons}"

    def result_fields(self) -> dict[str, object]:
        """The counts as a command's JSON result has them: ``bad_samples`` (a number) and
        ``bad_sample_reasons`` ({reason: count})."""
        return {"bad_samples": self.total, "bad_sample_reasons": dict(sorted(self.counts.items()))}

    def skipped_ids(self, key: str = "image_id") -> set[object]:
        """The ``image_id`` (or ``question_id``) of every recorded skipped sample."""
        return {record[key] for record in self.records if key in record}

    def write_records(self, path: Path) -> Path | None:
        """``skipped.json``: the skipped samples with their reasons; nothing when none were."""
        if not self.total:
            return None
        path.write_text(json.dumps(self.records, indent=1, default=str))
        return path


def raise_or_skip(
    bad: BadSampleLog | None, error: DataError, reason: str, *, question_id: object = None
) -> None:
    """Raise ``error`` unless ``bad`` says to skip such samples (then count and record it)."""
    if bad is None:
        raise error
    bad.handle(str(error), reason, question_id=question_id)
