"""Bad data: one-line DataErrors naming the file and the entry, and --skip-bad-samples counting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qformer_cli.data import (
    BadSampleLog,
    SampleDataset,
    build_transform,
    load_transform_config,
    make_dataloader,
    read_coco_captions,
    read_image_folder,
    read_karpathy,
    read_vqa,
    sample_split_files,
)
from qformer_cli.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import make_sample_data  # noqa: E402

TRANSFORM = build_transform(load_transform_config(None, image_size=64), train=False)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 4-image val split in the real formats; the working directory is its parent, so
    messages show paths relative to it."""
    make_sample_data.main(
        ["--out", str(tmp_path / "data"), "--num-train", "0", "--num-val", "4", "--num-test", "0"]
    )
    monkeypatch.chdir(tmp_path)
    return Path("data")


def edit_json(path: Path, change: object) -> None:
    payload = json.loads(path.read_text())
    change(payload)  # type: ignore[operator]
    path.write_text(json.dumps(payload))


def load_all(samples: list, bad: BadSampleLog | None = None, workers: int = 0) -> list[int]:
    dataset = SampleDataset(samples, TRANSFORM, bad_samples=bad)
    loader = make_dataloader(dataset, batch_size=2, num_workers=workers)
    return [image_id for batch in loader for image_id in batch.image_ids]


def one_line(error: pytest.ExceptionInfo[DataError]) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_malformed_json_names_the_file_and_position(world: Path) -> None:
    path = world / "vqa_val_annotations.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(DataError) as error:
        read_vqa(world / "vqa_val_questions.json", path, world / "images/val")
    assert one_line(error).startswith("data/vqa_val_annotations.json: malformed JSON at line 1")


def test_missing_file(world: Path) -> None:
    with pytest.raises(DataError) as error:
        read_karpathy(world / "karpathy_nope.json")
    assert one_line(error) == "data/karpathy_nope.json: file not found"


def test_annotation_missing_a_field(world: Path) -> None:
    path = world / "vqa_val_annotations.json"
    edit_json(path, lambda p: p["annotations"][3].pop("answers"))
    with pytest.raises(DataError) as error:
        read_vqa(world / "vqa_val_questions.json", path, world / "images/val")
    assert one_line(error) == (
        "data/vqa_val_annotations.json: annotation 3 (question_id 2000003): missing field 'answers'"
    )


def test_field_of_the_wrong_type(world: Path) -> None:
    edit_json(world / "vqa_val_questions.json", lambda p: p["questions"][1].update(question=7))
    with pytest.raises(DataError) as error:
        read_vqa(world / "vqa_val_questions.json", None, world / "images/val")
    assert one_line(error) == (
        "data/vqa_val_questions.json: question 1 (question_id 2000001): "
        "field 'question' should be str, got int"
    )


def test_question_without_annotation_or_image(world: Path) -> None:
    edit_json(world / "vqa_val_annotations.json", lambda p: p["annotations"].pop(0))
    (world / "images/val/scene_200003.png").unlink()
    bad = BadSampleLog(skip=True)
    samples = read_vqa(
        world / "vqa_val_questions.json",
        world / "vqa_val_annotations.json",
        world / "images/val",
        bad=bad,
    )
    assert len(samples) == 16 - 1 - 4  # one question lost its answers, one image its file
    assert bad.counts == {"missing annotation": 1, "missing image": 4}
    assert bad.examples[0] == (
        "data/vqa_val_questions.json: question 0 (question_id 2000000): "
        "no annotation in data/vqa_val_annotations.json"
    )
    assert "no image for image_id 200003 in data/images/val" in bad.examples[1]


def test_coco_caption_of_an_unknown_image(world: Path) -> None:
    edit_json(world / "captions_val.json", lambda p: p["annotations"][2].update(image_id=5))
    with pytest.raises(DataError) as error:
        read_coco_captions(world / "captions_val.json", world / "images/val")
    assert one_line(error) == (
        "data/captions_val.json: annotation 2 (id 2000002): image_id 5 is not in 'images'"
    )


def test_karpathy_entry_missing_its_image(world: Path) -> None:
    edit_json(world / "karpathy_val.json", lambda p: p[1].pop("image"))
    with pytest.raises(DataError) as error:
        read_karpathy(world / "karpathy_val.json")
    assert one_line(error) == "data/karpathy_val.json: entry 1: missing field 'image'"


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_reported_in_the_main_process(world: Path, workers: int) -> None:
    (world / "images/val/scene_200002.png").write_bytes(b"not a png at all")
    samples = read_karpathy(world / "karpathy_val.json")
    with pytest.raises(DataError) as error:
        load_all(samples, workers=workers)
    assert one_line(error).startswith(
        "data/karpathy_val.json: entry 2: unreadable image data/images/val/scene_200002.png ("
    )


def test_truncated_image(world: Path) -> None:
    path = world / "images/val/scene_200001.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as error:
        load_all(read_karpathy(world / "karpathy_val.json"))
    assert "entry 1: unreadable image data/images/val/scene_200001.png" in one_line(error)


def test_missing_image(world: Path) -> None:
    (world / "images/val/scene_200000.png").unlink()
    samples = read_coco_captions(world / "captions_val.json", world / "images/val")
    with pytest.raises(DataError) as error:
        load_all(samples)
    assert one_line(error) == (
        "data/captions_val.json: image 0 (id 200000): image not found: "
        "data/images/val/scene_200000.png"
    )


def test_skip_bad_samples_goes_on_and_counts(world: Path) -> None:
    (world / "images/val/scene_200001.png").write_bytes(b"")
    (world / "images/val/scene_200003.png").unlink()
    edit_json(world / "karpathy_val.json", lambda p: p[0].pop("caption"))
    bad = BadSampleLog(skip=True)
    samples = read_karpathy(world / "karpathy_val.json", bad=bad)
    assert load_all(samples, bad, workers=2) == [200002]
    assert bad.counts == {"missing field": 1, "unreadable image": 1, "missing image": 1}
    assert bad.summary() == (
        "skipped 3 bad samples: 1 missing field, 1 missing image, 1 unreadable image"
    )


def test_a_clean_run_skips_nothing() -> None:
    files = sample_split_files("val")
    bad = BadSampleLog(skip=True)
    samples = read_vqa(files.vqa_questions, files.vqa_annotations, files.image_dir, bad=bad)
    assert len(samples) == 1200
    assert bad.total == 0 and bad.summary() == "skipped 0 bad samples"


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        read_image_folder(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found"):
        read_image_folder(tmp_path)


# ---- hostile annotation files ----------------------------------------------------------------


def test_duplicate_coco_image_id(world: Path) -> None:
    edit_json(world / "captions_val.json", lambda p: p["images"][2].update(id=200000))
    with pytest.raises(DataError) as error:
        read_coco_captions(world / "captions_val.json", world / "images/val")
    assert one_line(error) == (
        "data/captions_val.json: image 2 (id 200000): duplicate id 200000 "
        "(first at image 0 (id 200000))"
    )


@pytest.mark.parametrize("file", ["vqa_val_questions.json", "vqa_val_annotations.json"])
def test_duplicate_vqa_question_id(world: Path, file: str) -> None:
    key = "questions" if "questions" in file else "annotations"
    kind = "question" if key == "questions" else "annotation"
    edit_json(world / file, lambda p: p[key][5].update(question_id=2000001))
    with pytest.raises(DataError) as error:
        read_vqa(
            world / "vqa_val_questions.json",
            world / "vqa_val_annotations.json",
            world / "images/val",
        )
    assert one_line(error) == (
        f"data/{file}: {kind} 5 (question_id 2000001): duplicate question_id 2000001 "
        f"(first at {kind} 1 (question_id 2000001))"
    )


def test_a_vqa_annotation_for_another_image_is_refused(world: Path) -> None:
    """An annotation matched to its question by question_id must name the question's image:
    otherwise the score would grade answers about one image against another's ground truth."""
    questions = json.loads((world / "vqa_val_questions.json").read_text())["questions"]
    asked = questions[3]
    other = next(q["image_id"] for q in questions if q["image_id"] != asked["image_id"])

    def point_elsewhere(payload: dict) -> None:
        for annotation in payload["annotations"]:
            if annotation["question_id"] == asked["question_id"]:
                annotation["image_id"] = other

    edit_json(world / "vqa_val_annotations.json", point_elsewhere)
    with pytest.raises(DataError) as error:
        read_vqa(
            world / "vqa_val_questions.json",
            world / "vqa_val_annotations.json",
            world / "images/val",
        )
    assert one_line(error) == (
        f"data/vqa_val_questions.json: question 3 (question_id {asked['question_id']}): "
        f"image_id {asked['image_id']!r}, but its annotation in data/vqa_val_annotations.json "
        f"names image_id {other!r}"
    )


@pytest.mark.parametrize("caption", ["", "   "])
def test_empty_captions_are_bad_samples(world: Path, caption: str) -> None:
    edit_json(world / "karpathy_val.json", lambda p: p[1].update(caption=["a circle", caption]))
    with pytest.raises(DataError) as error:
        read_karpathy(world / "karpathy_val.json")
    assert one_line(error) == "data/karpathy_val.json: entry 1: field 'caption' is empty"
    edit_json(world / "captions_val.json", lambda p: p["annotations"][3].update(caption=caption))
    with pytest.raises(DataError) as error:
        read_coco_captions(world / "captions_val.json", world / "images/val")
    assert one_line(error) == (
        "data/captions_val.json: annotation 3 (id 2000003): field 'caption' is empty"
    )
    bad = BadSampleLog(skip=True)
    assert len(read_karpathy(world / "karpathy_val.json", bad=bad)) == 3 and bad.total == 1


def test_a_10k_character_caption_loads_whole_and_is_truncated_by_the_tokenizer(world: Path):
    from qformer_cli.config import load_config
    from qformer_cli.models.backbones import load_qformer_tokenizer, resolve_model_name
    from qformer_cli.train.stage1 import tokenize

    long_caption = ("a red circle next to a blue square " * 300)[:10_000]
    edit_json(world / "karpathy_val.json", lambda p: p[0].update(caption=long_caption))
    [first, *_] = read_karpathy(world / "karpathy_val.json")
    assert first.captions == (long_caption,)
    tokenizer = load_qformer_tokenizer(resolve_model_name(load_config(None, []).model.bert))
    input_ids, mask = tokenize(tokenizer, [long_caption, "a circle"], 32, torch.device("cpu"))
    assert input_ids.shape == (2, 32) and mask[0].sum() == 32 and mask[1].sum() < 32


def test_non_utf8_bytes_name_the_position(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n {"image": "a.png",\n  "caption": "caf\xe9"}\n]')  # Latin-1 "cafe"
    with pytest.raises(DataError) as error:
        read_karpathy(path)
    # '  "caption": "caf' is 17 characters: the stray byte is column 18 of line 3
    assert one_line(error) == f"{path}: not UTF-8 at line 3 column 18 (byte 0xe9)"


def test_a_byte_order_mark_is_accepted(world: Path) -> None:
    path = world / "karpathy_val.json"
    expected = read_karpathy(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_karpathy(path) == expected


def test_deeply_nested_json_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as error:
        read_karpathy(path)
    assert one_line(error).endswith("deep.json: JSON nested too deeply")


def test_an_image_id_of_the_other_type_is_named(tmp_path: Path) -> None:
    from qformer_cli.data import read_coco_captions

    payload = {
        "images": [{"id": "101", "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 101, "caption": "a cat"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(payload))
    with pytest.raises(DataError) as error:
        read_coco_captions(tmp_path / "gt.json")
    assert (
        "image_id 101 is not in 'images' (it has '101': ids are matched by value and type"
        in str(error.value)
    )
