"""The one sample type every reader yields, image loading, and the bad-sample policy."""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qformer_cli.data.json_files import shown
from qformer_cli.errors import DataError

# Where a sample's pixels come from: a file, encoded bytes, or an already decoded image.
ImageSource = Path | bytes | Image.Image
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Decompression-bomb guard: a header promising more pixels than this is refused before decoding
# (a 10 kB PNG can declare 40000 x 40000). Below PIL's own warning threshold, so ours speaks first.
MAX_IMAGE_PIXELS = 64_000_000
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class Sample:
    """One image with its text, whatever file format it came from.

    Caption datasets fill ``captions`` (one entry per caption for training files, all of an
    image's captions for evaluation files); VQA datasets fill ``question`` and, when the
    annotations are known, ``answers`` (the ten human answers) and ``answer`` (the majority).
    ``origin`` names the file and the entry, for error messages.
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


class ImageError(DataError):
    """A sample's image is missing or cannot be decoded; ``reason`` names which, for counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_image(sample: Sample) -> Image.Image:
    """Decode a sample's image as RGB; a missing or unreadable image raises :class:`ImageError`
    (a :class:`DataError`) naming the entry and the file."""
    source = sample.image
    if isinstance(source, Image.Image):
        return upright_rgb(source)
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), sample, "image bytes")
    if not source.is_file():
        raise ImageError(f"{sample.origin}: image not found: {shown(source)}", "missing image")
    return _decode(source, sample, shown(source))


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


def _decode(source: Path | io.BytesIO, sample: Sample, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours is below
            with Image.open(source) as image:  # reads the header only
                pixels = image.width * image.height
                if pixels > MAX_IMAGE_PIXELS:
                    raise _too_large(
                        sample, name, f"{pixels} pixels; the limit is {MAX_IMAGE_PIXELS}"
                    )
                return upright_rgb(image)  # forces the full decode inside the try
    except Image.DecompressionBombError as error:  # far over: PIL refuses inside open()
        raise _too_large(sample, name, str(error).splitlines()[0]) from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"{sample.origin}: unreadable image {name} ({reason})"
        raise ImageError(message, "unreadable image") from None


def _too_large(sample: Sample, name: str, detail: str) -> ImageError:
    return ImageError(f"{sample.origin}: image {name} too large ({detail})", "image too large")


@dataclass
class BadSampleLog:
    """What to do with a bad sample: raise its :class:`DataError` (the default), or, with
    ``skip=True`` (``--skip-bad-samples``), count it by reason and go on.

    Readers call :meth:`handle` for bad entries; the data loader calls it in the main process
    for images that fail to load in a worker, so the counts are complete.
    """

    skip: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few messages, for the report
    max_examples: int = 5

    def handle(self, message: str, reason: str) -> None:
        if not self.skip:
            raise DataError(message)
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """E.g. "skipped 3 bad samples: 2 unreadable image, 1 missing field"."""
        if not self.total:
            return "skipped 0 bad samples"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        plural = "s" if self.total != 1 else ""
        return f"skipped {self.total} bad sample{plural}: {reasons}"


def raise_or_skip(bad: BadSampleLog | None, error: DataError, reason: str) -> None:
    """Raise ``error`` unless ``bad`` says to skip such samples (then count it)."""
    if bad is None:
        raise error
    bad.handle(str(error), reason)
