"""Training mixtures (data.sources): one source per global batch, by weight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qformer_cli.data.mixture import MixtureSampler
from tests.tiny_runs import FAST, ROOT, invoke_json, metrics_rows


def _steps(sampler: MixtureSampler, offsets: list[int]) -> list[int]:
    """The source of each global batch (one rank, world size 1)."""
    order = list(sampler)
    batches = [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]
    sources = []
    for batch in batches:
        owners = {sum(index >= offset for offset in offsets) - 1 for index in batch}
        assert len(owners) == 1, batch  # a batch never mixes sources
        sources.append(owners.pop())
    return sources


def test_interleaved_shares_stay_within_one_batch_of_the_weights() -> None:
    sampler = MixtureSampler([400, 300], [3.0, 1.0], batch_size=4, seed=1)
    sources = _steps(sampler, sampler.offsets)
    assert len(sources) == 175
    for step in range(1, len(sources) + 1):
        first = sources[:step].count(0)
        assert abs(first - 0.75 * step) <= 1


def test_random_order_draws_by_weight() -> None:
    sampler = MixtureSampler([4000, 12000], [1.0, 3.0], batch_size=1, seed=3, order="random")
    sources = _steps(sampler, sampler.offsets)
    assert abs(sources.count(1) / len(sources) - 0.75) < 0.02  # 16000 draws: sd 0.34 points


def test_ranks_share_each_global_batch_and_resume_skips_exactly() -> None:
    one = list(MixtureSampler([50, 70], [1.0, 2.0], batch_size=6, seed=5))
    parts = [
        list(MixtureSampler([50, 70], [1.0, 2.0], batch_size=3, rank=r, world_size=2, seed=5))
        for r in (0, 1)
    ]
    merged = [
        i
        for step in range(len(one) // 6)
        for r in (0, 1)
        for i in parts[r][3 * step : 3 * step + 3]
    ]
    assert merged == one  # two ranks train on the one-process global batches
    resumed = MixtureSampler([50, 70], [1.0, 2.0], batch_size=6, seed=5)
    resumed.skip = 6 * 7
    assert list(resumed) == one[42:]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixture")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample_data_as_shards.py"), str(out),
         "--per-shard", "100", "--limit", "200"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_a_3_to_1_mixture_logs_its_shares_over_200_steps(two_sources: Path, tmp_path: Path) -> None:
    config = tmp_path / "mix.yaml"
    config.write_text(
        "data:\n  sources:\n"
        f"    - {{path: '{two_sources}/shards/{{00000..00001}}.tar', weight: 3}}\n"
        f"    - {{path: '{two_sources}/captions.parquet', weight: 1}}\n"
    )
    run = tmp_path / "run"
    invoke_json(
        "pretrain-stage1", "--config", str(config), "--out", str(run), *FAST,
        "--batch-size", "4", "--max-steps", "200", "--set", "train.log_every=50", "--quiet",
    )  # fmt: skip
    last = metrics_rows(run)[-1]
    assert last["step"] == 200
    shares = last["source_shares"]
    assert shares[f"{two_sources}/shards/{{00000..00001}}.tar"] == pytest.approx(0.75, abs=0.05)
    assert shares[f"{two_sources}/captions.parquet"] == pytest.approx(0.25, abs=0.05)
    recorded = json.loads((run / "run_config.json").read_text())["data"]["sources"]
    assert [source["weight"] for source in recorded] == [3, 1]


def test_data_twice_is_an_equal_mixture(two_sources: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    invoke_json(
        "pretrain-stage1", "--data", f"{two_sources}/shards/00000.tar",
        "--data", f"{two_sources}/captions.parquet", "--out", str(run), *FAST,
        "--max-steps", "8", "--quiet",
    )  # fmt: skip
    shares = metrics_rows(run)[-1]["source_shares"]
    assert sorted(shares.values()) == [0.5, 0.5]


def test_a_stopped_and_resumed_mixture_trains_on_the_same_samples(
    two_sources: Path, tmp_path: Path
) -> None:
    from qformer_cli import faults
    from tests.tiny_runs import ids_by_step, train_stage1

    sources = [f"{two_sources}/shards/00000.tar", f"{two_sources}/captions.parquet"]
    args = [
        *("--data", sources[0], "--data", sources[1], "--max-steps", "9"),
        *("--set", "train.log_sample_ids=true", "--set", "train.save_every=2"),
    ]
    whole = train_stage1(tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.output
    stopped = train_stage1(tmp_path / "resumed", *args, env={faults.STOP_AFTER_STEP_ENV: "4"})
    assert stopped.exit_code != 0
    resumed = train_stage1(tmp_path / "resumed", *args, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert ids_by_step(tmp_path / "resumed") == ids_by_step(tmp_path / "whole")
    shares = [
        metrics_rows(run)[-1]["source_shares"] for run in (tmp_path / "whole", tmp_path / "resumed")
    ]
    assert shares[0] == shares[1]
