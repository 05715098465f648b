"""Streamed webdataset shards (data.streaming): readers split each pass without duplicates or
gaps, training through the command covers the shards, and a run stopped by SIGTERM sent to its
whole process group (as SLURM and docker stop send it) resumes on exactly the samples of the
uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from qformer_cli.cli import app
from qformer_cli.data.streams import TarStream
from tests.tiny_runs import ROOT, ids_by_step, runner, stage1_command, subprocess_env

CAPTIONS = 96
STREAM = ["--set", "data.streaming=true", "--set", "data.shuffle_buffer=8"]
TINY = ["--batch-size", "8", "--set", "model.qformer.num_layers=2"]


def _write_shards(out: Path, per_shard: int) -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample_data_as_shards.py"), str(out),
         "--per-shard", str(per_shard), "--limit", str(CAPTIONS)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out / "shards"


@pytest.fixture(scope="module")
def even(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shards of 24 samples."""
    return _write_shards(tmp_path_factory.mktemp("even"), 24)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five shards: four of 20 samples and one of 16."""
    return _write_shards(tmp_path_factory.mktemp("uneven"), 20)


def _keys_in(shards: Path) -> list[str]:
    """Every sample key of the shards, listed by the tarfile module."""
    keys = []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as archive:
            keys += [name.split(".")[0] for name in archive.getnames() if name.endswith(".png")]
    return keys


def _first_pass(stream: TarStream, slot: int, slots: int) -> list[str]:
    taken = []
    for sample, (pass_, _, _) in stream.records(slot, slots, (0, 0, 0)):
        if pass_ > 0:
            return taken
        taken.append(str(sample.image_id))
    raise AssertionError("an endless stream ended")


@pytest.mark.parametrize("slots", [1, 2, 3, 5, 8])
def test_readers_split_each_pass_without_duplicates_or_gaps(uneven: Path, slots: int) -> None:
    """Five uneven shards over 1-8 readers (fewer shards than readers: samples are dealt)."""
    stream = TarStream(sorted(uneven.glob("*.tar")), "s", index=0, seed=3, buffer=7)
    passes = [_first_pass(stream, slot, slots) for slot in range(slots)]
    seen = [key for taken in passes for key in taken]
    assert sorted(seen) == sorted(_keys_in(uneven))
    assert all(passes)


def test_a_reader_resumed_at_its_place_reads_what_follows(uneven: Path) -> None:
    stream = TarStream(sorted(uneven.glob("*.tar")), "s", index=0, seed=3, buffer=7)
    read = stream.records(1, 3, (0, 0, 0))
    first = [next(read) for _ in range(50)]  # into the second pass
    place = first[29][1]
    again = stream.records(1, 3, place)
    assert [str(next(again)[0].image_id) for _ in range(20)] == [
        str(sample.image_id) for sample, _ in first[30:]
    ]
    assert first[-1][1][0] == 1  # the reader has gone round to its next pass


def _ids(run: Path, rank: int = 0) -> list[list[str]]:
    path = run / f"sample_ids.rank{rank}.txt"
    return [line.split()[1:] for line in path.read_text().splitlines()]


def test_streamed_training_covers_the_shards_once_per_pass(even: Path, tmp_path: Path) -> None:
    """Two DataLoader workers, 12 steps of 8: one pass, every sample once."""
    result = runner.invoke(
        app,
        ["pretrain-stage1", "--data", str(even / "{00000..00003}.tar"), *STREAM,
         "--set", "data.num_workers=2", "--out", str(tmp_path / "run"), *TINY,
         "--max-steps", "12", "--quiet", "--json",
         "--set", "train.log_sample_ids=true"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    seen = [key for step in _ids(tmp_path / "run") for key in step]
    assert sorted(seen) == sorted(_keys_in(even))


def _sigterm_group_after(command: list[str], metrics: Path, rows: int) -> str:
    """Run ``command`` in its own process group and send the group SIGTERM once ``metrics``
    has ``rows`` rows; its stderr."""
    process = subprocess.Popen(
        command, env=subprocess_env(), text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rows):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 143, stderr[-2000:]
    return stderr


def test_a_streamed_mixture_stopped_by_sigterm_resumes_on_the_same_samples(
    uneven: Path, tmp_path: Path
) -> None:
    """Shards (weight 3) and the Karpathy JSON (weight 1), two workers each: SIGTERM to the
    process group mid-shard, then `--resume auto`; the run crosses a pass of the shards."""
    from tests.tiny_runs import train_stage1

    sources = [
        {"path": str(uneven / "{00000..00004}.tar"), "weight": 3},
        {"path": str(ROOT / "sample_data" / "karpathy_train.json"), "weight": 1},
    ]
    args = [*STREAM, "--set", f"data.sources={json.dumps(sources)}",
            "--set", "data.num_workers=2", "--max-steps", "18",
            "--set", "train.log_sample_ids=true", "--set", "train.save_every=2"]  # fmt: skip
    whole = train_stage1(tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.output
    resumed = tmp_path / "resumed"
    stderr = _sigterm_group_after(stage1_command(resumed, *args), resumed / "metrics.jsonl", 3)
    assert "stopped: SIGTERM at step" in stderr
    again = train_stage1(resumed, *args, "--resume", "auto")
    assert again.exit_code == 0, again.output
    expected = ids_by_step(tmp_path / "whole")
    assert sorted(expected) == list(range(1, 19))
    assert ids_by_step(resumed) == expected
    from_shards = [key for ids in expected.values() for key in ids if key.startswith("0000")]
    assert len(from_shards) > CAPTIONS  # 3:1 over 18 steps: past one pass of the shards


def test_streamed_bad_samples_are_skipped_and_counted_or_refused(
    even: Path, tmp_path: Path
) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(even / "00000.tar") as source, tarfile.open(shard, "w") as out:
        for member in source:
            data = source.extractfile(member).read()
            data = b"not a png" if member.name == "000001.png" else data
            data = b"  " if member.name == "000002.txt" else data
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    args = ["pretrain-stage1", "--data", str(shard), *STREAM, *TINY, "--max-steps", "3",
            "--quiet", "--json"]  # fmt: skip
    skipped = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--skip-bad-samples"])
    assert skipped.exit_code == 0, skipped.output
    summary = json.loads(skipped.stdout)
    assert summary["bad_sample_reasons"] == {"missing caption": 1, "unreadable image": 1}
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert re.search(r"00000\.tar: 00000[12]\b", refused.output), refused.output


def test_streaming_refusals_name_the_setting(even: Path, tmp_path: Path) -> None:
    base = ["pretrain-stage1", "--data", str(even / "00000.tar"), *STREAM, *TINY,
            "--out", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    no_steps = runner.invoke(app, [*base, "--max-steps", "0"])
    assert no_steps.exit_code == 2 and "set train.max_steps" in no_steps.output
    first = runner.invoke(app, [*base, "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    other_workers = runner.invoke(
        app, [*base, "--max-steps", "4", "--set", "data.num_workers=2", "--resume", "auto"]
    )
    assert other_workers.exit_code == 2
    assert "resumes with the data.num_workers it had (0)" in other_workers.output
    not_streamed = [arg.replace("=true", "=false") for arg in base]
    map_style = runner.invoke(app, [*not_streamed, "--max-steps", "4", "--resume", "auto"])
    assert map_style.exit_code == 2
    assert "the checkpoint was streamed: resume with data.streaming=true" in map_style.output
