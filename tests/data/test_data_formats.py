"""Each reader on the shipped sample data: counts and fields, checked against what the world's
definition implies (3000/300/300 images, 5 captions each, 3 or 4 questions per image, ids
numbered from 100000/200000/300000)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qformer_cli.config import DataConfig
from qformer_cli.data import (
    Sample,
    image_id_from_name,
    load_image,
    one_caption_per_sample,
    read_caption_file,
    read_coco_captions,
    read_image_folder,
    read_karpathy,
    read_vqa,
    sample_backbone_dir,
    sample_data_dir,
    sample_split_files,
)
from qformer_cli.data.hard_negatives import HardNegativeIndex, read_hard_negatives
from qformer_cli.data.sample import BadSampleLog
from qformer_cli.errors import UsageError
from qformer_cli.train.common import read_caption_samples

SAMPLE = sample_data_dir()
IMAGES = {"train": 3000, "val": 300, "test": 300}
FIRST_ID = {"train": 100000, "val": 200000, "test": 300000}
# yes/no, number, other x2 (val, test); train: one other and two more yes/no
QUESTIONS_PER_IMAGE = {"train": 5, "val": 4, "test": 4}


def scenes(split: str) -> dict[int, dict]:
    entries = json.loads(sample_split_files(split).scenes.read_text())
    return {s["image_id"]: s for s in entries}


def test_sample_paths_point_at_the_shipped_files() -> None:
    root = sample_data_dir()
    assert root == Path(__file__).resolve().parents[2] / "sample_data"
    val = sample_split_files("val")
    assert val.coco_captions == root / "captions_val.json"
    assert val.vqa_annotations == root / "vqa_val_annotations.json"
    assert sample_split_files("train").coco_captions is None
    for split in IMAGES:
        files = sample_split_files(split)
        for path in (files.karpathy, files.vqa_questions, files.vqa_annotations, files.scenes):
            assert path.is_file(), path
    for name in ("vision", "opt", "t5", "bert"):
        assert (sample_backbone_dir(name) / "config.json").is_file()
    with pytest.raises(UsageError):
        sample_split_files("dev")


def test_sample_data_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFORMER_SAMPLE_DATA", "/elsewhere")
    assert sample_split_files("test").image_dir == Path("/elsewhere/images/test")


def test_karpathy_train_has_one_entry_per_caption() -> None:
    samples = read_karpathy(sample_split_files("train").karpathy)
    assert len(samples) == 5 * IMAGES["train"]
    assert {s.image_id for s in samples} == set(range(100000, 103000))
    assert all(len(s.captions) == 1 and s.question is None for s in samples)
    first = samples[0]
    assert first.image == sample_data_dir() / "images/train/scene_100000.png"
    assert first.origin.endswith("sample_data/karpathy_train.json: entry 0 (image_id 100000)")


@pytest.mark.parametrize("split", ["val", "test"])
def test_karpathy_eval_files_hold_five_captions_per_image(split: str) -> None:
    files = sample_split_files(split)
    samples = read_karpathy(files.karpathy, files.root)
    ids = [FIRST_ID[split] + i for i in range(IMAGES[split])]
    assert [s.image_id for s in samples] == ids  # derived from the file names
    assert all(len(s.captions) == 5 for s in samples)
    assert all(Path(s.image).is_file() for s in samples)


@pytest.mark.parametrize("split", ["val", "test"])
def test_coco_captions_match_karpathy(split: str) -> None:
    files = sample_split_files(split)
    coco = read_coco_captions(files.coco_captions, files.image_dir)
    karpathy = read_karpathy(files.karpathy, files.root)
    assert len(coco) == IMAGES[split]
    assert [(s.image_id, s.captions, s.image) for s in coco] == [
        (s.image_id, s.captions, s.image) for s in karpathy
    ]
    payload = json.loads(files.coco_captions.read_text())
    assert len(payload["annotations"]) == 5 * IMAGES[split]
    assert all(
        isinstance(a["image_id"], int) and isinstance(a["id"], int) for a in payload["annotations"]
    )
    assert len({a["id"] for a in payload["annotations"]}) == len(payload["annotations"])


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_vqa_questions_with_answers(split: str) -> None:
    files = sample_split_files(split)
    samples = read_vqa(files.vqa_questions, files.vqa_annotations, files.image_dir)
    assert len(samples) == QUESTIONS_PER_IMAGE[split] * IMAGES[split]
    assert len({s.question_id for s in samples}) == len(samples)
    assert all(len(s.answers) == 10 for s in samples)
    assert {s.answer_type for s in samples} == {"yes/no", "number", "other"}
    truth = scenes(split)
    for sample in samples[:40]:
        assert sample.image == files.image_dir / f"scene_{sample.image_id:06d}.png"
        assert sample.question_id // 10 == sample.image_id
        if sample.question == "how many shapes are there?":
            assert sample.answer == str(len(truth[sample.image_id]["objects"]))


def test_vqa_questions_alone_and_by_pattern() -> None:
    files = sample_split_files("test")
    samples = read_vqa(
        files.vqa_questions, None, files.image_dir, image_pattern="scene_{image_id:06d}.png"
    )
    assert len(samples) == 1200
    assert all(s.answers == () and s.answer is None for s in samples)
    assert samples[5].image == files.image_dir / f"scene_{samples[5].image_id:06d}.png"


def test_image_folder() -> None:
    samples = read_image_folder(sample_split_files("val").image_dir)
    assert [s.image_id for s in samples] == list(range(200000, 200300))
    assert all(s.captions == () and s.question is None for s in samples)


def test_image_folder_without_numbers_uses_relative_paths(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "dog.JPG", format="JPEG")
    samples = read_image_folder(tmp_path)
    assert [s.image_id for s in samples] == ["cat.png", "sub/dog.JPG"]
    assert [s.image_id for s in read_image_folder(tmp_path, recursive=False)] == ["cat.png"]


def test_loaded_images_are_64px_rgb() -> None:
    sample = read_image_folder(sample_split_files("test").image_dir)[0]
    image = load_image(sample)
    assert image.mode == "RGB" and image.size == (64, 64)


def test_one_caption_per_sample() -> None:
    sample = Sample(image=Path("x.png"), image_id=1, captions=("a", "b", "c"))
    split = one_caption_per_sample([sample, Sample(image=Path("y.png"), image_id=2)])
    assert [(s.image_id, s.captions) for s in split] == [(1, ("a",)), (1, ("b",)), (1, ("c",))]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("val2014/COCO_val2014_000000391895.jpg", 391895),
        ("scene_000042.png", 42),
        ("flickr/1000092795.jpg", 1000092795),
        ("no_digits.png", "no_digits.png"),
        ("a12b.png", "a12b.png"),
    ],
)
def test_image_id_from_name(name: str, expected: int | str) -> None:
    assert image_id_from_name(name) == expected


def write_karpathy_dataset(path: Path, test_images: int = 20) -> dict:
    """sample_data's val captions in the layout of Karpathy's ``dataset_coco.json`` (what
    ``json.dump`` of his release holds: ``images[]`` with filepath, filename, imgid, split,
    sentences[] of tokens / raw / imgid / sentid, cocoid; a ``dataset`` name), splits assigned
    test, train, restval, val in turn after the first ``test_images`` test images."""
    coco = json.loads((SAMPLE / "captions_val.json").read_text())
    captions: dict[int, list[str]] = {}
    for annotation in coco["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    images, sentence_id = [], 0
    for index, image in enumerate(coco["images"]):
        split = "test" if index < test_images else ("train", "restval", "val")[index % 3]
        sentences = []
        for raw in captions[image["id"]]:
            tokens = raw.lower().replace(",", "").split()
            sentences.append({"tokens": tokens, "raw": raw, "imgid": index, "sentid": sentence_id})
            sentence_id += 1
        images.append(
            {
                "filepath": "images/val",
                "sentids": [s["sentid"] for s in sentences],
                "filename": image["file_name"],
                "imgid": index,
                "split": split,
                "sentences": sentences,
                "cocoid": image["id"],
            }
        )
    payload = {"images": images, "dataset": "coco"}
    path.write_text(json.dumps(payload))
    return payload


def test_karpathys_own_dataset_file_reads_by_split(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    payload = write_karpathy_dataset(path)
    test = read_caption_file(path, SAMPLE, karpathy_splits=("test",))
    train = read_caption_file(path, SAMPLE, karpathy_splits=("train", "restval"))
    expected_test = [image for image in payload["images"] if image["split"] == "test"]
    assert [s.image_id for s in test] == [image["cocoid"] for image in expected_test]
    assert [list(s.captions) for s in test] == [
        [sentence["raw"] for sentence in image["sentences"]] for image in expected_test
    ]
    assert all(Path(s.image).is_file() for s in test + train)
    splits = {image["cocoid"]: image["split"] for image in payload["images"]}
    assert {splits[s.image_id] for s in train} == {"train", "restval"}
    # the same images as COCO captions JSON gives, for the same ids
    coco_file, images = SAMPLE / "captions_val.json", SAMPLE / "images" / "val"
    coco = {s.image_id: s for s in read_coco_captions(coco_file, images)}
    assert all(coco[s.image_id].captions == s.captions for s in test)
    assert all(Path(coco[s.image_id].image) == Path(s.image) for s in test)


def test_listed_hard_negatives_reach_the_training_captions_they_list(
    train_hard_negatives_world: Path,
) -> None:
    """stage1.itm_hard_negatives on the embedded default: every caption the generator's train
    file lists (``--train-hard-negatives``, here for the first 300 train images, whose captions
    are the shipped ones) is found among the samples stage 1 trains on (by image file name and
    caption) and given one of its own negatives; no other caption gets one."""
    path = train_hard_negatives_world / "hard_negatives_train.json"
    listed: dict[tuple[str, str], set[str]] = {}
    for pair in json.loads(path.read_text()).values():
        key = (Path(pair["filename"]).name, pair["caption"])
        listed.setdefault(key, set()).add(pair["negative_caption"])
    negatives = HardNegativeIndex(read_hard_negatives(path))
    samples = read_caption_samples(DataConfig(), BadSampleLog())
    found = {}
    for sample in samples:
        negative = negatives.of(sample, sample.captions[0])
        key = (Path(str(sample.image)).name, sample.captions[0])
        assert (negative is None) == (key not in listed), key
        if negative is not None:
            assert negative in listed[key]
            found[key] = negative
    assert len(found) == len(listed) > 800
