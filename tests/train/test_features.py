"""The frozen-encoder feature cache: `qformer extract-features` and `pretrain-stage1 --features`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.data import sample_data_dir
from qformer_cli.data.features import (
    FeatureDataset,
    FeatureWriter,
    read_index,
)
from qformer_cli.data.sample import BadSampleLog, Sample
from qformer_cli.errors import DataError, UsageError
from tests.tiny_runs import metrics_rows

runner = CliRunner()
IMAGES = 24  # training images in the small data file (5 captions each)
# Small deterministic stage-1 runs (no dropout) whose losses can be compared step by step.
FAST = [
    "--batch-size", "8",
    "--max-steps", "3",
    "--set", "model.qformer.num_layers=2",
    "--set", "model.qformer.hidden_dropout=0.0",
    "--set", "train.log_every=1",
    "--set", "train.deterministic=true",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first IMAGES images of sample_data's train split, with all their captions."""
    entries = json.loads((sample_data_dir() / "karpathy_train.json").read_text())
    image_ids = list(dict.fromkeys(entry["image_id"] for entry in entries))[:IMAGES]
    kept = [entry for entry in entries if entry["image_id"] in set(image_ids)]
    for entry in kept:  # absolute paths: the JSON lives elsewhere
        entry["image"] = str(sample_data_dir() / entry["image"])
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(kept))
    return path


def _extract(out: Path, data: Path, *extra: str):
    return runner.invoke(
        app, ["extract-features", "--out", str(out), "--data", str(data), "--json", *extra]
    )


def _train(out: Path, data: Path, *extra: str):
    args = ["pretrain-stage1", "--out", str(out), "--data", str(data), "--json", *FAST, *extra]
    return runner.invoke(app, args)


def _losses(run: Path) -> list[dict[str, float]]:
    rows = metrics_rows(run)
    return [{key: row[key] for key in ("itc", "itm", "itg")} for row in rows]


@pytest.fixture(scope="module")
def fp32_cache(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "fp32"
    result = _extract(out, small_train, "--dtype", "fp32", "--shard-size", "10")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_images"] == IMAGES and summary["shards"] == 3  # 10 + 10 + 4
    assert summary["feature_shape"] == [65, 128]  # tiny ViT: 8x8 patches + [CLS], width 128
    return out


@pytest.fixture(scope="module")
def online_losses(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    run = tmp_path_factory.mktemp("online") / "run"
    result = _train(run, small_train)
    assert result.exit_code == 0, result.output
    return _losses(run)


@pytest.mark.slow
def test_training_on_fp32_features_equals_training_on_images(
    fp32_cache: Path, small_train: Path, online_losses: list[dict], tmp_path: Path
) -> None:
    result = _train(tmp_path / "cached", small_train, "--features", str(fp32_cache))
    assert result.exit_code == 0, result.output
    cached = _losses(tmp_path / "cached")
    assert len(cached) == len(online_losses) == 3
    for online_row, cached_row in zip(online_losses, cached, strict=True):
        for key, value in online_row.items():
            assert cached_row[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
def test_bf16_features_give_the_same_losses_to_bf16_tolerance(
    small_train: Path, online_losses: list[dict], tmp_path: Path
) -> None:
    assert _extract(tmp_path / "bf16", small_train).exit_code == 0  # bf16 is the default
    assert read_index(tmp_path / "bf16").dtype == "bf16"
    stored = load_file(str(tmp_path / "bf16" / "shard-00000.safetensors"))["features"]
    assert stored.dtype == torch.bfloat16
    result = _train(tmp_path / "cached", small_train, "--features", str(tmp_path / "bf16"))
    assert result.exit_code == 0, result.output
    for online_row, cached_row in zip(online_losses, _losses(tmp_path / "cached"), strict=True):
        for key, value in online_row.items():
            # bf16 keeps 8 bits of mantissa: each feature moves by up to 0.4%, but the losses
            # average over thousands of them (measured over the 3 steps: at most 6.6e-5
            # relative, ITC; ITM 3e-5, ITG 3e-6); the bound leaves ~7x.
            assert cached_row[key] == pytest.approx(value, rel=5e-4), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=32", "another image transform"),
        ("model.vision.config.layer_norm_eps=0.001", "another vision encoder config"),
        ("data.augment=true", "cannot be combined with data.augment"),
    ],
)
def test_a_cache_that_does_not_match_the_config_is_refused(
    fp32_cache: Path, small_train: Path, tmp_path: Path, override: str, message: str
) -> None:
    result = _train(tmp_path / "run", small_train, "--features", str(fp32_cache), "--set", override)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_directory_without_an_index_is_not_a_cache(small_train: Path, tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()  # e.g. an extraction that died before writing its index
    result = _train(tmp_path / "run", small_train, "--features", str(tmp_path / "half"))
    assert result.exit_code == 2
    assert "not a feature cache (no index.json" in result.output


def test_stage2_refuses_features(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["pretrain-stage2", "--out", str(tmp_path / "run"), "--set", "data.features=x"]
    )
    assert result.exit_code == 2
    assert "stage-1 option" in result.output


# --------------------------------------------------------------------------------------------
# The store itself


def _sample(image_id: int) -> Sample:
    return Sample(image=Path(f"{image_id}.png"), image_id=image_id, captions=("c",), origin="f")


def test_writer_shards_and_reader_rows_round_trip(tmp_path: Path) -> None:
    fingerprint = {"model": "m", "config_sha256": "a", "transform_sha256": "b"}
    writer = FeatureWriter(tmp_path, fingerprint, "bf16", shard_size=3)
    rows = torch.randn(7, 5, 4)
    writer.add([str(i) for i in range(4)], rows[:4])
    writer.add(["2", *[str(i) for i in range(4, 7)]], torch.cat([rows[2:3] * 100, rows[4:]]))
    writer.finish()  # "2" was seen before: not stored again (and not overwritten)

    index = read_index(tmp_path)
    shards = json.loads((tmp_path / "index.json").read_text())["shards"]
    assert [shard["count"] for shard in shards] == [3, 3, 1]
    assert index.feature_shape == (5, 4) and index.encoder_width == 4
    dataset = FeatureDataset([_sample(i) for i in range(7)], index, BadSampleLog())
    for i in range(7):
        expected = rows[i].to(torch.bfloat16).float()  # what bf16 storage keeps
        assert torch.equal(dataset[i].image, expected), i


def test_an_image_missing_from_the_cache_is_a_bad_sample(tmp_path: Path) -> None:
    fingerprint = {"model": "m", "config_sha256": "a", "transform_sha256": "b"}
    writer = FeatureWriter(tmp_path, fingerprint, "fp32", shard_size=8)
    writer.add(["1"], torch.zeros(1, 2, 3))
    writer.finish()
    item = FeatureDataset([_sample(9)], read_index(tmp_path), BadSampleLog())[0]
    assert "image id 9 is not in the feature cache" in item.message
    log = BadSampleLog()
    with pytest.raises(DataError, match="image id 9 is not in the feature cache"):
        log.handle(item.message, item.reason)


def test_a_bad_index_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text('{"format": "qformer-features/1", "dtype": "bf16"}')
    with pytest.raises(UsageError, match="not a valid feature index"):
        read_index(tmp_path)
