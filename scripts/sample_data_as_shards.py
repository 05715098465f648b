"""Write the embedded default's training captions as webdataset shards and as parquet, the
layouts web-scale data comes in, so that those paths are tested offline (nothing is committed).

    python scripts/sample_data_as_shards.py OUT_DIR [--per-shard 256] [--limit N]

Writes ``OUT_DIR/shards/{00000..}.tar`` (``KEY.png`` + ``KEY.txt``, as img2dataset writes them,
one image per caption, in Karpathy-file order) and ``OUT_DIR/captions.parquet`` (columns
``image`` (the PNG bytes), ``caption``, ``image_id``). Deterministic: the same bytes every run.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def training_pairs(limit: int | None) -> list[tuple[str, Path, str]]:
    """(key, image file, caption) per training caption."""
    entries = json.loads((SAMPLE / "karpathy_train.json").read_text())
    pairs = [
        (f"{index:06d}", SAMPLE / entry["image"], entry["caption"])
        for index, entry in enumerate(entries)
    ]
    return pairs[:limit] if limit else pairs


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def write_shards(pairs: list[tuple[str, Path, str]], out: Path, per_shard: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(pairs), per_shard)):
        shard = out / f"{number:05d}.tar"
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as archive:
            for key, image, caption in pairs[start : start + per_shard]:
                _add(archive, f"{key}.png", image.read_bytes())
                _add(archive, f"{key}.txt", caption.encode("utf-8"))
        shards.append(shard)
    return shards


def write_parquet(pairs: list[tuple[str, Path, str]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "image": [image.read_bytes() for _, image, _ in pairs],
            "caption": [caption for _, _, caption in pairs],
            "image_id": [key for key, _, _ in pairs],
        }
    )
    pq.write_table(table, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="only the first N captions")
    args = parser.parse_args()
    pairs = training_pairs(args.limit)
    shards = write_shards(pairs, args.out / "shards", args.per_shard)
    parquet = write_parquet(pairs, args.out / "captions.parquet")
    print(f"{len(pairs)} captions -> {len(shards)} shards in {args.out / 'shards'}, {parquet}")


if __name__ == "__main__":
    main()
