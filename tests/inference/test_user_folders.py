"""Batch inference on folders as users have them, through the commands: phone-style file names,
broken and huge images, missing files; results that name their files; what survives a failure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from qformer_cli.cli import app
from tests.tiny_runs import ROOT, invoke_json, runner

SAMPLE = ROOT / "sample_data"
VAL_IMAGES = SAMPLE / "images" / "val"
PHONE_NAMES = ("IMG_{:04d}.JPG", "DSC_{:04d}.JPG", "PXL_20240101_{:09d}.jpg", "holiday {}.png")
BROKEN = {"broken.jpg", "cut_short.png", "nested/truncated.jpg"}
HUGE = "PXL_20240102_panorama.jpg"  # 12000 x 9000 = 108 MP


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 files: 46 sample scenes saved under phone-camera names, 3 broken ones (not an image,
    cut-off PNG bytes, a truncated JPEG in a subfolder) and one 108 MP photo."""
    folder = tmp_path_factory.mktemp("photos")
    scenes = sorted(VAL_IMAGES.iterdir())[:46]
    for index, scene in enumerate(scenes):
        name = PHONE_NAMES[index % len(PHONE_NAMES)].format(index + 1)
        Image.open(scene).convert("RGB").save(folder / name)
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    (folder / "cut_short.png").write_bytes(scenes[0].read_bytes()[:60])
    (folder / "nested").mkdir()
    (folder / "nested" / "truncated.jpg").write_bytes((folder / "IMG_0001.JPG").read_bytes()[:300])
    huge = Image.open(scenes[1]).convert("RGB").resize((12000, 9000), Image.NEAREST)
    huge.save(folder / HUGE, quality=90)
    return folder


def _caption(model: Path, folder: Path, out: Path, *extra: str):
    args = ["caption", "--model", str(model), "--images", str(folder), "--out", str(out)]
    return runner.invoke(app, [*args, *extra])


def test_caption_skips_bad_images_and_names_every_file(
    trained_stage2: Path, user_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "captions"
    result = _caption(trained_stage2, user_folder, out, "--skip-bad-samples", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_images"] == 47
    assert summary["bad_samples"] == 3  # a number for scripts, not a sentence
    assert summary["bad_sample_reasons"] == {"unreadable image": 3}
    captions = json.loads((out / "captions.json").read_text())
    files = {row["file"] for row in captions}
    on_disk = {p.relative_to(user_folder).as_posix() for p in user_folder.rglob("*") if p.is_file()}
    assert files == on_disk - BROKEN  # the 108 MP photo is captioned, reduced, not refused
    assert all(row["caption"].strip() for row in captions)
    skipped = json.loads((out / "skipped.json").read_text())
    assert {row["file"] for row in skipped} == BROKEN
    assert all(
        row["reason"] == "unreadable image" and row["file"] in row["error"] for row in skipped
    )


def test_caption_without_skip_names_the_file_and_keeps_the_captions_done(
    trained_stage2: Path, user_folder: Path, tmp_path: Path
) -> None:
    complete = tmp_path / "complete"
    assert _caption(trained_stage2, user_folder, complete, "--skip-bad-samples").exit_code == 0
    out = tmp_path / "stopped"
    result = _caption(trained_stage2, user_folder, out, "--batch-size", "8")
    assert result.exit_code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "broken.jpg" in error[0] and str(out / "captions.json") in error[0]
    done = json.loads((out / "captions.json").read_text())
    # files sort as "DSC_..." < "IMG_..." < "PXL_..." < "broken.jpg": whole batches before it
    assert len(done) > 0 and len(done) % 8 == 0
    expected = json.loads((complete / "captions.json").read_text())[: len(done)]
    assert done == expected


def test_caption_shows_progress_in_a_log_and_quiet_silences_it(
    trained_stage2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QFORMER_PROGRESS_EVERY_S", "0")
    args = ["--model", str(trained_stage2), "--images", str(VAL_IMAGES), "--batch-size", "100"]
    shown = runner.invoke(app, ["caption", *args, "--out", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.stderr.splitlines() if line.startswith("caption ")]
    total = len(list(VAL_IMAGES.iterdir()))
    assert [line.split()[1] for line in lines] == [f"{n}/{total}" for n in (100, 200, total)]
    quiet = runner.invoke(app, ["caption", *args, "--out", str(tmp_path / "b"), "--quiet"])
    assert quiet.exit_code == 0
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("caption ")]


def _without_image(tmp_path: Path, image_id: int) -> Path:
    folder = tmp_path / "images"
    shutil.copytree(VAL_IMAGES, folder)
    (folder / f"scene_{image_id}.png").unlink()
    return folder


def test_eval_vqa_skips_a_missing_image_and_scores_the_rest(
    trained_stage2: Path, tmp_path: Path
) -> None:
    questions = json.loads((SAMPLE / "vqa_val_questions.json").read_text())
    annotations = json.loads((SAMPLE / "vqa_val_annotations.json").read_text())
    gone = questions["questions"][0]["image_id"]
    images = _without_image(tmp_path, gone)
    scored = invoke_json(
        "eval-vqa", "--model", str(trained_stage2), "--images", str(images),
        "--skip-bad-samples", "--out", str(tmp_path / "vqa"),
    )  # fmt: skip
    lost = [q["question_id"] for q in questions["questions"] if q["image_id"] == gone]
    assert scored["scored"] and scored["unscored_skipped"] == len(lost) == scored["bad_samples"]
    assert scored["num_questions"] == len(questions["questions"]) - len(lost)
    skipped = json.loads((tmp_path / "vqa" / "skipped.json").read_text())
    assert sorted(row["question_id"] for row in skipped) == sorted(lost)
    # the same answers scored against ground truth with those questions removed
    kept = {
        "questions": [q for q in questions["questions"] if q["image_id"] != gone],
        "annotations": [a for a in annotations["annotations"] if a["question_id"] not in lost],
    }
    (tmp_path / "q.json").write_text(json.dumps({"questions": kept["questions"]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": kept["annotations"]}))
    rescored = invoke_json(
        "eval-vqa", "--predictions", scored["results"], "--questions", str(tmp_path / "q.json"),
        "--annotations", str(tmp_path / "a.json"), "--out", str(tmp_path / "rescored"),
    )  # fmt: skip
    assert rescored["overall"] == scored["overall"]
    assert rescored["num_questions"] == scored["num_questions"]
    rows = json.loads(Path(scored["results"]).read_text())
    assert all(row["file"] == f"scene_{row['image_id']}.png" for row in rows)


def test_eval_retrieval_skips_a_missing_image(trained_stage1: Path, tmp_path: Path) -> None:
    entries = json.loads((SAMPLE / "karpathy_val.json").read_text())[:20]
    entries = [dict(entry, image=Path(entry["image"]).name) for entry in entries]  # in --images
    gone = int(Path(entries[3]["image"]).stem.split("_")[-1])
    (tmp_path / "subset.json").write_text(json.dumps(entries))
    images = _without_image(tmp_path, gone)
    args = ["eval-retrieval", "--model", str(trained_stage1), "--annotations"]
    refused = runner.invoke(app, [*args, str(tmp_path / "subset.json"), "--images", str(images)])
    assert refused.exit_code == 1 and f"scene_{gone}.png" in refused.stderr
    result = invoke_json(
        *args, str(tmp_path / "subset.json"), "--images", str(images), "--skip-bad-samples",
        "--out", str(tmp_path / "retrieval"),
    )  # fmt: skip
    assert result["num_images"] == 19 and result["bad_samples"] == 1
    assert result["num_texts"] == sum(len(e["caption"]) for e in entries) - len(
        entries[3]["caption"]
    )


def test_caption_resume_continues_a_stopped_run_to_the_same_captions(
    trained_stage2: Path, user_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped by a broken image after 32 captions; `--resume --skip-bad-samples` in the same
    --out captions only the rest and ends with the uninterrupted run's captions.json."""
    complete = tmp_path / "complete"
    assert _caption(trained_stage2, user_folder, complete, "--skip-bad-samples").exit_code == 0
    out = tmp_path / "stopped"
    assert _caption(trained_stage2, user_folder, out, "--batch-size", "8").exit_code == 1
    monkeypatch.setenv("QFORMER_PROGRESS_EVERY_S", "0")
    done = len(json.loads((out / "captions.json").read_text()))
    resumed = _caption(
        trained_stage2, user_folder, out, "--batch-size", "8", "--resume", "--skip-bad-samples",
        "--json",
    )  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_with"] == done
    last = [line for line in resumed.stderr.splitlines() if line.startswith("caption ")][-1]
    assert last.split()[1] == f"{50 - done}/{50 - done}"  # only the rest went through the model
    assert (out / "captions.json").read_text() == (complete / "captions.json").read_text()
    refused = _caption(trained_stage2, user_folder, tmp_path / "x", "--resume", "--blind")
    assert refused.exit_code == 2 and "--resume continues the run in --out" in refused.output


def test_eval_vqa_resume_continues_a_stopped_run_to_the_same_answers(
    trained_stage2: Path, tmp_path: Path
) -> None:
    questions = json.loads((SAMPLE / "vqa_val_questions.json").read_text())["questions"]
    broken = questions[40]["image_id"]  # its questions come after whole batches of 16
    images = tmp_path / "images"
    shutil.copytree(VAL_IMAGES, images)
    (images / f"scene_{broken}.png").write_bytes(b"not a png")  # fails when loaded, mid-run
    args = [
        "eval-vqa",
        "--model",
        str(trained_stage2),
        "--images",
        str(images),
        "--batch-size",
        "16",
    ]
    complete = invoke_json(*args, "--skip-bad-samples", "--out", str(tmp_path / "complete"))
    stopped = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert stopped.exit_code == 1 and f"scene_{broken}.png" in stopped.stderr
    done = len(json.loads((tmp_path / "run" / "vqa_results.json").read_text()))
    assert done > 0 and done % 16 == 0
    resumed = invoke_json(*args, "--skip-bad-samples", "--resume", "--out", str(tmp_path / "run"))
    assert resumed["resumed_with"] == done
    assert Path(resumed["results"]).read_text() == Path(complete["results"]).read_text()
    assert resumed["overall"] == complete["overall"]
