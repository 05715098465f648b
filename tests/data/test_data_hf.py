"""``datasets`` sources on local files: parquet, JSON lines, imagefolder, webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from qformer_cli.data import (
    BadSample,
    BadSampleLog,
    Columns,
    Sample,
    StreamingSampleDataset,
    build_transform,
    load_image,
    load_transform_config,
    local_builder,
    make_dataloader,
    read_hf_dataset,
)
from qformer_cli.errors import DataError

TRANSFORM = build_transform(load_transform_config(None, image_size=16), train=False)
COLORS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def samples_of(source: object) -> list[Sample]:
    items = list(source)  # type: ignore[call-overload]
    assert not any(isinstance(item, BadSample) for item in items)
    return items


def center_color(sample: Sample) -> tuple[int, int, int]:
    return load_image(sample).getpixel((8, 8))


def write_shard(path: Path, keys: range) -> None:
    """A webdataset shard: key.png + key.txt per sample."""
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for suffix, data in ((".png", png(COLORS[key])), (".txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key:04d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_parquet_with_image_bytes(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "image_id": datasets.Value("int64"),
        }
    )
    table = {
        "image": [{"bytes": png(c), "path": None} for c in COLORS[:3]],
        "caption": ["red", "green", "blue"],
        "image_id": [10, 11, 12],
    }
    datasets.Dataset.from_dict(table, features=features).to_parquet(tmp_path / "part.parquet")
    samples = samples_of(read_hf_dataset(str(tmp_path / "part.parquet")))
    assert [(s.image_id, s.captions) for s in samples] == [
        (10, ("red",)),
        (11, ("green",)),
        (12, ("blue",)),
    ]
    assert [center_color(s) for s in samples] == COLORS[:3]


def test_webdataset_shards_split_across_ranks(tmp_path: Path) -> None:
    write_shard(tmp_path / "shard-0.tar", range(0, 3))
    write_shard(tmp_path / "shard-1.tar", range(3, 6))
    assert local_builder(str(tmp_path))[0] == "webdataset"
    everything = samples_of(read_hf_dataset(str(tmp_path)))
    assert sorted(s.captions[0] for s in everything) == [f"caption {k}" for k in range(6)]
    assert sorted(center_color(s) for s in everything) == sorted(COLORS)
    by_rank = [
        {s.captions[0] for s in samples_of(read_hf_dataset(str(tmp_path), rank=r, world_size=2))}
        for r in range(2)
    ]
    assert by_rank[0].isdisjoint(by_rank[1]) and len(by_rank[0] | by_rank[1]) == 6


def test_webdataset_through_the_loader_with_workers(tmp_path: Path) -> None:
    write_shard(tmp_path / "shard-0.tar", range(0, 3))
    write_shard(tmp_path / "shard-1.tar", range(3, 6))
    source = read_hf_dataset(str(tmp_path / "*.tar"))
    loader = make_dataloader(StreamingSampleDataset(source, TRANSFORM), batch_size=2, num_workers=2)
    captions = [c for batch in loader for c in batch.captions]
    assert sorted(captions) == [f"caption {k}" for k in range(6)]  # each shard read once


def test_imagefolder_with_metadata(tmp_path: Path) -> None:
    lines = []
    for key, color in enumerate(COLORS[:2]):
        (tmp_path / f"img_{key}.png").write_bytes(png(color))
        lines.append(json.dumps({"file_name": f"img_{key}.png", "caption": f"shape {key}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    samples = samples_of(read_hf_dataset(str(tmp_path), streaming=False))
    assert sorted((s.captions[0], center_color(s)) for s in samples) == [
        ("shape 0", COLORS[0]),
        ("shape 1", COLORS[1]),
    ]


def test_vqa_style_records_and_explicit_columns(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(COLORS[0]))
    record = {
        "picture": str(tmp_path / "a.png"),
        "qid": 7,
        "question": "what color is it?",
        "answers": [{"answer": "red", "answer_id": 1}, {"answer": "Red.", "answer_id": 2}],
    }
    (tmp_path / "qa.jsonl").write_text(json.dumps(record) + "\n")
    columns = Columns(image="picture", image_id="qid")
    (sample,) = samples_of(read_hf_dataset(str(tmp_path / "qa.jsonl"), columns=columns))
    assert (sample.image_id, sample.question, sample.answers) == (
        7,
        "what color is it?",
        ("red", "Red."),
    )
    assert center_color(sample) == COLORS[0]


def test_bad_records_are_reported_or_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(COLORS[0]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    rows = [{"image": str(tmp_path / "a.png"), "caption": "ok"}, {"caption": "no image"}]
    rows.append({"image": str(tmp_path / "broken.png"), "caption": "corrupt"})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = read_hf_dataset(str(tmp_path / "rows.jsonl"))
    with pytest.raises(DataError) as error:
        list(make_dataloader(StreamingSampleDataset(source, TRANSFORM), batch_size=4))
    assert str(error.value).endswith("rows.jsonl [train]: record 1: missing field 'image'")
    bad = BadSampleLog(skip=True)
    loader = make_dataloader(
        StreamingSampleDataset(source, TRANSFORM, bad_samples=bad), batch_size=4
    )
    assert [c for batch in loader for c in batch.captions] == ["ok"]
    assert bad.counts == {"missing field": 1, "unreadable image": 1}


def test_unknown_local_sources(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("nothing to read")
    with pytest.raises(DataError, match="no parquet, json, csv, tar or image files"):
        read_hf_dataset(str(tmp_path))
    assert local_builder("some-org/some-dataset") is None
