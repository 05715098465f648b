"""Webdataset shards and parquet, written from the embedded default by
scripts/sample_data_as_shards.py, trained on through the command (one process and torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from qformer_cli.cli import app
from qformer_cli.data import BadSampleLog
from qformer_cli.data.sample import load_image
from qformer_cli.data.shards import expand_source, read_shard_source
from tests.tiny_runs import FAST, ROOT, ids_by_step, invoke_json, runner, subprocess_env

CAPTIONS = 96  # the first 96 training captions, 24 per shard


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("web")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample_data_as_shards.py"), str(out),
         "--per-shard", "24", "--limit", str(CAPTIONS)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def _karpathy_pairs() -> list[tuple[bytes, str]]:
    entries = json.loads((ROOT / "sample_data" / "karpathy_train.json").read_text())[:CAPTIONS]
    return [((ROOT / "sample_data" / e["image"]).read_bytes(), e["caption"]) for e in entries]


@pytest.mark.parametrize(
    "source", ["shards/{00000..00003}.tar", "shards/*.tar", "captions.parquet"]
)
def test_shards_and_parquet_hold_the_karpathy_pairs(written: Path, source: str) -> None:
    samples = read_shard_source(str(written / source))
    expected = _karpathy_pairs()
    assert [s.captions[0] for s in samples] == [caption for _, caption in expected]
    decoded = [load_image(s).tobytes() for s in samples[:8]]
    import io

    from PIL import Image

    originals = [Image.open(io.BytesIO(data)).convert("RGB").tobytes() for data, _ in expected[:8]]
    assert decoded == originals


def test_brace_ranges_keep_their_zero_padding() -> None:
    names = [str(p) for p in expand_source("d/{00008..00011}.tar")]
    assert names == ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]


def test_a_shard_with_a_broken_image_and_an_empty_caption(written: Path, tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(written / "shards" / "00000.tar") as source, tarfile.open(shard, "w") as out:
        for member in source:
            data = source.extractfile(member).read()
            if member.name == "000001.png":
                data = b"not a png"
            if member.name == "000002.txt":
                data = b"  "
            member.size = len(data)
            import io

            out.addfile(member, io.BytesIO(data))
    bad = BadSampleLog(skip=True)
    samples = read_shard_source(str(shard), bad)
    assert len(samples) == 23 and bad.counts == {"missing caption": 1}
    result = runner.invoke(
        app,
        ["pretrain-stage1", "--data", str(shard), "--out", str(tmp_path / "run"), *FAST,
         "--max-steps", "2", "--json", "--skip-bad-samples", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bad_sample_reasons"] == {"missing caption": 1, "unreadable image": 1}


@pytest.mark.parametrize("source", ["shards/{00000..00003}.tar", "captions.parquet"])
def test_pretrain_stage1_trains_on_shards_and_parquet(
    written: Path, tmp_path: Path, source: str
) -> None:
    summary = invoke_json(
        "pretrain-stage1", "--data", str(written / source), "--out", str(tmp_path / "run"),
        *FAST, "--max-steps", "4", "--quiet",
    )  # fmt: skip
    assert summary["steps"] == 4 and summary["last"]["itc"] > 0


def test_torchrun_ranks_see_disjoint_samples_covering_the_shards(
    written: Path, tmp_path: Path
) -> None:
    """Two processes, one pass over the shards: every caption trained on once, by one rank."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", "29533", "-m", "qformer_cli", "pretrain-stage1",
        "--data", str(written / "shards/{00000..00003}.tar"), "--out", str(tmp_path / "run"),
        *FAST, "--max-steps", "0", "--set", "train.epochs=1", "--quiet",
        "--set", "train.log_sample_ids=true",
    ]  # fmt: skip
    completed = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    seen = {
        rank: [
            key
            for line in (tmp_path / "run" / f"sample_ids.rank{rank}.txt").read_text().splitlines()
            for key in line.split()[1:]
        ]
        for rank in (0, 1)
    }
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"{i:06d}" for i in range(CAPTIONS))


def test_a_stopped_and_resumed_run_trains_on_the_same_shard_samples(
    written: Path, tmp_path: Path
) -> None:
    """SIGTERM mid-shard, then `--resume auto`: every step trained on the samples of the
    uninterrupted run, which crosses an epoch boundary."""
    import signal
    import time

    from tests.tiny_runs import stage1_command, train_stage1

    args = ["--data", str(written / "shards/{00000..00003}.tar"), "--max-steps", "14",
            "--set", "train.log_sample_ids=true", "--set", "train.save_every=2"]  # fmt: skip
    whole = train_stage1(tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.output
    process = subprocess.Popen(
        stage1_command(tmp_path / "resumed", *args), env=subprocess_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    metrics, deadline = tmp_path / "resumed" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped: SIGTERM at step" in stderr, stderr
    resumed = train_stage1(tmp_path / "resumed", *args, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    expected = ids_by_step(tmp_path / "whole")
    assert sorted(expected) == list(range(1, 15))
    assert ids_by_step(tmp_path / "resumed") == expected
    epoch_one = [key for step in range(1, 13) for key in expected[step]]
    assert sorted(epoch_one) == sorted(f"{i:06d}" for i in range(CAPTIONS))  # 12 steps of 8


def test_two_torchrun_agents_with_a_c10d_rendezvous_split_the_shards(
    written: Path, tmp_path: Path
) -> None:
    """`torchrun --nnodes 2 --nproc_per_node 1` twice on localhost, as two nodes run it, the
    shards streamed by two DataLoader workers per rank (four readers, one shard each): over one
    pass the two ranks saw disjoint samples covering the shard set."""
    run = tmp_path / "run"
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29547", "--rdzv-id", "shards",
        "-m", "qformer_cli", "pretrain-stage1",
        "--data", str(written / "shards/{00000..00003}.tar"), "--out", str(run),
        *FAST, "--max-steps", "12", "--quiet", "--set", "train.log_sample_ids=true",
        "--set", "data.streaming=true", "--set", "data.num_workers=2",
    ]  # fmt: skip
    agents = [
        subprocess.Popen(
            agent, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=600) for process in agents]
    finally:
        for process in agents:
            if process.poll() is None:
                process.kill()
    assert [process.returncode for process in agents] == [0, 0], outputs[0][1][-2000:]
    seen = [
        [key for line in (run / f"sample_ids.rank{rank}.txt").read_text().splitlines()
         for key in line.split()[1:]]
        for rank in (0, 1)
    ]  # fmt: skip
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"{i:06d}" for i in range(CAPTIONS))


def test_a_datasets_source_with_its_own_column_names(written: Path, tmp_path: Path) -> None:
    """`--data hf:DIR@train` goes through `datasets.load_dataset` as a hub id does once
    downloaded; columns named otherwise are mapped with data.columns."""
    import pyarrow.parquet as pq

    from qformer_cli.data.hf import hub_source

    table = pq.read_table(written / "captions.parquet").rename_columns(["jpg", "alt_text", "key"])
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    columns = ["--set", 'data.columns={"image": "jpg", "caption": "alt_text", "image_id": "key"}']
    summary = invoke_json(
        "pretrain-stage1", "--data", f"hf:{tmp_path / 'repo'}@train", *columns,
        "--out", str(tmp_path / "run"), *FAST, "--max-steps", "2", "--quiet",
        "--set", "train.log_sample_ids=true",
    )  # fmt: skip
    assert summary["steps"] == 2
    trained = ids_by_step(tmp_path / "run")
    assert all(key in table.column("key").to_pylist() for ids in trained.values() for key in ids)
    assert hub_source("owner/captions:en@validation") == ("owner/captions", "en", "validation")
    assert hub_source("data/missing.json") is None  # a missing file, not a hub id
    unknown = runner.invoke(app, ["pretrain-stage1", "--set", 'data.columns={"img": "jpg"}'])
    assert unknown.exit_code == 2 and "data.columns: unknown key(s) img" in unknown.output


def _listed_negatives(path: Path, pairs: list[tuple[str, str]]) -> str:
    """A hard-negatives file (SugarCrepe's layout) listing ``pairs`` of (file name, caption)."""
    entries = {
        str(k): {"filename": name, "caption": caption, "negative_caption": f"not {caption}"}
        for k, (name, caption) in enumerate(pairs)
    }
    path.write_text(json.dumps(entries))
    return f"stage1.itm_hard_negatives={path}"


def test_streamed_captions_none_of_which_is_listed_fail_the_run_and_keep_its_checkpoint(
    written: Path, tmp_path: Path
) -> None:
    """A streamed run cannot check its captions before training: after it, a hard-negatives
    file that matched none of them is an error (the run trained as if it were unset), exit 1,
    one line after the run's log; the checkpoint written stays. A file listing the streamed
    captions passes."""
    stream = ["--data", str(written / "shards/{00000..00003}.tar"), "--set", "data.streaming=true"]
    unlisted = _listed_negatives(tmp_path / "none.json", [("x.png", "a red circle")])
    out = tmp_path / "unlisted"
    result = runner.invoke(
        app, ["pretrain-stage1", *stream, "--out", str(out), *FAST, "--max-steps", "2",
              "--quiet", "--set", unlisted],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    last_line = result.stderr.strip().splitlines()[-1]  # after the run's log and summary
    assert "none.json: none of the 16 training captions this run streamed is listed" in last_line
    assert "Traceback" not in result.stderr
    assert (out / "checkpoints" / "step-00000002" / "model.safetensors").is_file()

    entries = json.loads((ROOT / "sample_data" / "karpathy_train.json").read_text())[:CAPTIONS]
    pairs = [(f"{k:06d}", e["caption"]) for k, e in enumerate(entries)]  # a shard sample: its key
    listed = _listed_negatives(tmp_path / "listed.json", pairs)
    summary = invoke_json(
        "pretrain-stage1", *stream, "--out", str(tmp_path / "listed"), *FAST, "--max-steps", "2",
        "--quiet", "--set", listed,
    )  # fmt: skip
    assert summary["steps"] == 2
