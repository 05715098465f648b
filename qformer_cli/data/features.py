"""The frozen-encoder feature cache: the vision encoder's outputs stored once, read per sample.

Stage 1 never changes the frozen encoder, so without augmentation its output for an image is the
same every epoch. ``qformer extract-features`` writes them once (see
:mod:`qformer_cli.train.features`); ``pretrain-stage1 --features DIR`` then reads them here
instead of decoding, transforming and encoding images.

On disk, in one directory::

    index.json                    format, encoder fingerprint, dtype, feature shape, shard list,
                                  and for every image id its (shard, row)
    shard-00000.safetensors ...   tensor "features" (n, N, C) in bf16 / fp16 / fp32

The fingerprint (encoder name, a hash of its config and of the image transform) is checked
against the training config before anything else loads: features of another encoder or another
preprocessing are refused, not silently trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from qformer_cli.data.loader import BadSample, LoadedSample
from qformer_cli.data.sample import BadSampleLog, Sample
from qformer_cli.data.transforms import ImageTransformConfig
from qformer_cli.errors import UsageError

INDEX = "index.json"
FORMAT = "qformer-features/1"
FEATURES_KEY = "features"
FEATURE_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoder_fingerprint(
    model_name: str, encoder_config: dict[str, Any], transform: ImageTransformConfig
) -> dict[str, str]:
    """What must match between the cache and a training run: encoder and preprocessing."""
    # Private keys ("_name_or_path", ...) and the transformers version say nothing about the math.
    config = {
        key: value
        for key, value in encoder_config.items()
        if not key.startswith("_") and key != "transformers_version"
    }
    return {
        "model": model_name,
        "config_sha256": _sha256_json(config),
        "transform_sha256": _sha256_json(asdict(transform)),
    }


def image_key(sample: Sample) -> str:
    """The cache's name for a sample's image: its image id (one id = one image, as in ITM)."""
    return str(sample.image_id)


# --------------------------------------------------------------------------------------------
# Writing


class FeatureWriter:
    """Collects (image id, features) rows and writes them as shards of ``shard_size`` images.

    Every shard is written to a temporary name and renamed; ``index.json`` comes last, the same
    way, so a directory with an index is always complete.
    """

    def __init__(
        self, directory: Path, fingerprint: dict[str, str], dtype: str, shard_size: int
    ) -> None:
        if shard_size < 1:
            raise UsageError(f"--shard-size must be >= 1 (got {shard_size})")
        self.directory = directory
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.shard_size = shard_size
        self.pending: list[torch.Tensor] = []  # (N, C) rows not yet written
        self.shards: list[dict[str, Any]] = []
        self.rows: dict[str, list[int]] = {}  # image key -> [shard, row]
        self.feature_shape: list[int] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / INDEX).unlink(missing_ok=True)  # incomplete until finished again

    def add(self, keys: list[str], features: torch.Tensor) -> None:
        """``features``: (B, N, C), one row per key; a key seen before is not stored twice."""
        for key, row in zip(keys, features, strict=True):
            if key in self.rows:
                continue
            self.feature_shape = self.feature_shape or list(row.shape)
            self.rows[key] = [len(self.shards), len(self.pending)]
            self.pending.append(row.to(FEATURE_DTYPES[self.dtype]).cpu())
            if len(self.pending) == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        temp = self.directory / f".{name}.tmp"
        save_file({FEATURES_KEY: torch.stack(self.pending).contiguous()}, str(temp))
        temp.replace(self.directory / name)
        self.shards.append({"file": name, "count": len(self.pending)})
        self.pending = []

    def finish(self) -> dict[str, Any]:
        self._flush()
        index = {
            "format": FORMAT,
            "encoder": self.fingerprint,
            "dtype": self.dtype,
            "feature_shape": self.feature_shape,
            "num_images": len(self.rows),
            "shards": self.shards,
            "images": self.rows,
        }
        temp = self.directory / f".{INDEX}.tmp"
        temp.write_text(json.dumps(index))
        temp.replace(self.directory / INDEX)
        return index


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class FeatureIndex:
    directory: Path
    fingerprint: dict[str, str]
    dtype: str
    feature_shape: tuple[int, int]  # (N, C): tokens per image, encoder width
    shards: list[str]
    rows: dict[str, tuple[int, int]]  # image key -> (shard, row)

    @property
    def encoder_width(self) -> int:
        return self.feature_shape[1]


def read_index(directory: Path) -> FeatureIndex:
    path = Path(directory) / INDEX
    if not path.is_file():
        raise UsageError(
            f"{directory}: not a feature cache (no {INDEX}; qformer extract-features writes one)"
        )
    try:
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT:
            raise UsageError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
        return FeatureIndex(
            directory=Path(directory),
            fingerprint=dict(index["encoder"]),
            dtype=str(index["dtype"]),
            feature_shape=(int(index["feature_shape"][0]), int(index["feature_shape"][1])),
            shards=[shard["file"] for shard in index["shards"]],
            rows={key: (int(s), int(r)) for key, (s, r) in index["images"].items()},
        )
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise UsageError(f"{path}: not a valid feature index ({reason})") from None


def check_fingerprint(index: FeatureIndex, expected: dict[str, str]) -> None:
    """Refuse features made by another encoder or another image transform."""
    for key, label in (
        ("model", "vision encoder"),
        ("config_sha256", "vision encoder config"),
        ("transform_sha256", "image transform (size / normalization)"),
    ):
        if index.fingerprint.get(key) != expected[key]:
            raise UsageError(
                f"{index.directory}: features were extracted with another {label} "
                f"({index.fingerprint.get(key)!r} vs {expected[key]!r} now); "
                "re-run qformer extract-features with this config"
            )


class FeatureDataset(Dataset[LoadedSample | BadSample]):
    """Map-style dataset like :class:`SampleDataset`, whose item is the sample with its cached
    (N, C) features (as fp32) instead of its transformed image."""

    def __init__(self, samples: list[Sample], index: FeatureIndex, bad_samples: BadSampleLog):
        self.samples = samples
        self.index = index
        self.bad_samples = bad_samples
        self._open: dict[int, Any] = {}  # shard -> safe_open handle (per worker process)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int) -> LoadedSample | BadSample:
        sample = self.samples[item]
        where = self.index.rows.get(image_key(sample))
        if where is None:
            message = f"{sample.origin or sample.image_id}: image id {sample.image_id} is not in "
            return BadSample(message + f"the feature cache {self.index.directory}", "not cached")
        shard, row = where
        return LoadedSample(sample, self._shard(shard).get_slice(FEATURES_KEY)[row].float())

    def _shard(self, shard: int) -> Any:
        if shard not in self._open:
            path = self.index.directory / self.index.shards[shard]
            self._open[shard] = safe_open(str(path), framework="pt")
        return self._open[shard]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": {}}


def unique_images(samples: list[Sample]) -> Iterator[Sample]:
    """One sample per image id, in first-seen order (training files list an image per caption)."""
    seen: set[str] = set()
    for sample in samples:
        key = image_key(sample)
        if key not in seen:
            seen.add(key)
            yield sample
