"""Image-caption pairs with a hard negative caption, in SugarCrepe's layout.

``{"0": {"filename": "000000397133.jpg", "caption": "...", "negative_caption": "..."}, ...}``
(an object keyed by pair id; a list of the same objects is read too). ``filename`` is relative
to the image root (default: the JSON file's folder); an entry may name what was changed in its
negative in ``swapped`` (SugarCrepe keeps one file per kind; the shipped sample_data files name
the attribute: colour, shape, size or position), which the metrics are broken down by.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from qformer_cli.data.json_files import read_json, require_text, shown
from qformer_cli.data.sample import BadSampleLog, Sample, image_id_from_name, raise_or_skip
from qformer_cli.errors import DataError


@dataclass(frozen=True)
class HardNegative:
    """One image, a caption true of it and a caption that is not."""

    image: Path
    caption: str
    negative_caption: str
    kind: str  # what the negative changed ("" when the file does not say)
    origin: str  # file and entry, for messages


def read_hard_negatives(
    path: str | Path, image_root: str | Path | None = None, *, bad: BadSampleLog | None = None
) -> list[HardNegative]:
    """The pairs of a SugarCrepe-style file, in file order."""
    payload = read_json(path)
    if isinstance(payload, dict):
        entries = list(payload.items())
    elif isinstance(payload, list):
        entries = [(str(index), entry) for index, entry in enumerate(payload)]
    else:
        raise DataError(f"{shown(path)}: expected a JSON object or list of pairs")
    root = Path(image_root) if image_root is not None else Path(path).parent
    pairs = []
    for key, entry in entries:
        where = f"{shown(path)}: pair {key}"
        try:
            pairs.append(_pair(entry, where, root))
        except DataError as error:
            raise_or_skip(bad, error, "missing field")
    if not pairs:
        raise DataError(f"{shown(path)}: no pairs")
    return pairs


def _pair(entry: object, where: str, root: Path) -> HardNegative:
    filename = require_text(entry, "filename", where)
    caption = require_text(entry, "caption", where)
    negative = require_text(entry, "negative_caption", where)
    assert isinstance(entry, dict)  # checked by require_text
    kind = entry.get("swapped", "")
    if caption == negative:
        raise DataError(f"{where}: 'negative_caption' equals 'caption'")
    return HardNegative(root / filename, caption, negative, str(kind), where)


def _by_image(pairs: list[HardNegative]) -> dict[Path, list[HardNegative]]:
    """The pairs of each image, in file order (images in order of their first pair)."""
    grouped: dict[Path, list[HardNegative]] = {}
    for pair in pairs:
        grouped.setdefault(pair.image, []).append(pair)
    return grouped


def pairs_as_samples(pairs: list[HardNegative]) -> list[Sample]:
    """One sample per image, its captions every pair's caption and negative in order (caption
    2j and negative 2j+1 of the image's j-th pair), for the retrieval set's loader."""
    return [
        Sample(
            image=image,
            image_id=image_id_from_name(image),
            captions=tuple(text for p in own for text in (p.caption, p.negative_caption)),
            origin=own[0].origin,
            file=image.name,
        )
        for image, own in _by_image(pairs).items()
    ]


def pair_kinds(pairs: list[HardNegative], loaded: list[Sample]) -> list[str]:
    """Each pair's kind in the order :func:`pairs_as_samples` put their texts, over the
    ``loaded`` samples (those whose image could be read)."""
    grouped = _by_image(pairs)
    return [pair.kind for sample in loaded for pair in grouped[Path(sample.image)]]


class HardNegativeIndex:
    """Training captions' listed hard negatives, looked up by the sample's image file name and
    caption (``stage1.itm_hard_negatives``); a caption listed with several negatives always gets
    the same one, chosen by a digest of the caption (equal on every rank and every run)."""

    def __init__(self, pairs: list[HardNegative]) -> None:
        self.negatives: dict[tuple[str, str], list[str]] = {}
        for pair in pairs:
            self.negatives.setdefault((pair.image.name, pair.caption), []).append(
                pair.negative_caption
            )

    def __len__(self) -> int:
        return len(self.negatives)

    def of(self, sample: Sample, caption: str) -> str | None:
        """The negative listed for ``caption`` of ``sample``'s image, or None."""
        name = Path(sample.file).name if sample.file else _image_name(sample)
        listed = self.negatives.get((name, caption))
        if not listed:
            return None
        digest = hashlib.blake2b(caption.encode("utf-8"), digest_size=4).digest()
        return listed[int.from_bytes(digest, "little") % len(listed)]


def _image_name(sample: Sample) -> str:
    return Path(sample.image).name if isinstance(sample.image, (str, Path)) else ""
