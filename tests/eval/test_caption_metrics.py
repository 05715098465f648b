"""COCO caption metrics: agreement with pycocoevalcap's own COCOEvalCap, inputs, SPICE, temp files.

Only two places start Java: the agreement fixture (both pipelines once, ~10 s, most of it
METEOR loading its paraphrase table) and the tokenizer test; the rest need no Java.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from qformer_cli.errors import DataError, QformerError
from qformer_cli.eval import caption_metrics
from qformer_cli.eval.caption_metrics import (
    CAPTION_METRICS,
    CaptionScores,
    evaluate_caption_files,
    load_caption_ground_truth,
    load_caption_results,
    ptb_tokenize,
    score_tokenized,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")

# Images deliberately out of id order; captions with capitals, punctuation, quotes, apostrophes,
# hyphens, digits, non-ASCII letters and repeated spaces; one hypothesis equal to a reference.
GROUND_TRUTH = {
    "images": [{"id": 42}, {"id": 7}, {"id": 1000}, {"id": 3}, {"id": 15}],
    "annotations": [
        {"image_id": 42, "id": 1, "caption": "A man riding a wave on top of a surfboard."},
        {"image_id": 42, "id": 2, "caption": "A surfer rides a large wave in the ocean!"},
        {"image_id": 42, "id": 3, "caption": "Surfer in a black wet-suit catching a wave"},
        {"image_id": 7, "id": 4, "caption": "Two dogs playing with a frisbee in the park."},
        {"image_id": 7, "id": 5, "caption": 'Two dogs chase a "frisbee" across the grass'},
        {"image_id": 1000, "id": 6, "caption": "A plate of food: rice, beans and 2 eggs."},
        {"image_id": 1000, "id": 7, "caption": "A café table with a plate of rice & beans"},
        {"image_id": 1000, "id": 8, "caption": "the man's breakfast (rice and eggs)"},
        {"image_id": 3, "id": 9, "caption": "A red double-decker bus on a city street"},
        {"image_id": 15, "id": 10, "caption": "A cat sleeping on a laptop keyboard."},
        {"image_id": 15, "id": 11, "caption": "A   cat lying   on top of a laptop computer"},
        {"image_id": 15, "id": 12, "caption": "Cat napping on an open laptop; it's cozy"},
        {"image_id": 999, "id": 13, "caption": "an image that is not listed is ignored"},
    ],
}
RESULTS = [
    {"image_id": 7, "caption": "two dogs are playing with a frisbee"},
    {"image_id": 42, "caption": "A surfer riding a wave on a surfboard."},
    {"image_id": 3, "caption": "a red bus driving down a street"},
    {"image_id": 1000, "caption": "A plate of rice, beans, and eggs"},
    {"image_id": 15, "caption": "A cat sleeping on a laptop keyboard."},
]


def write_json(path: Path, content: Any) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


class CocoIndex:
    """What COCOEvalCap reads from pycocotools' COCO objects, for when pycocotools is absent:
    image ids in file order and each image's annotations in file order."""

    def __init__(self, images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> None:
        self.image_ids = [image["id"] for image in images]
        self.imgToAnns: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for annotation in annotations:
            self.imgToAnns[annotation["image_id"]].append(annotation)

    def getImgIds(self) -> list[Any]:
        return self.image_ids


def coco_objects(gt_path: Path, results_path: Path) -> tuple[Any, Any]:
    """Ground truth and results as COCOEvalCap takes them: pycocotools' COCO when installed."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        ground_truth = json.loads(gt_path.read_text())
        results = json.loads(results_path.read_text())
        return (
            CocoIndex(ground_truth["images"], ground_truth["annotations"]),
            CocoIndex(ground_truth["images"], results),
        )
    coco = COCO(str(gt_path))
    return coco, coco.loadRes(str(results_path))


def coco_eval_cap_scores(gt_path: Path, results_path: Path) -> dict[str, float]:
    """pycocoevalcap's own pipeline (COCOEvalCap.evaluate), SPICE stubbed out."""
    import pycocoevalcap.eval as coco_eval

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self) -> str:
            return "SPICE"

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(coco_eval, "Spice", NoSpice)  # its constructor would download CoreNLP
        evaluator = coco_eval.COCOEvalCap(*coco_objects(gt_path, results_path))
        evaluator.evaluate()
    names = {"Bleu_1": "BLEU_1", "Bleu_2": "BLEU_2", "Bleu_3": "BLEU_3", "Bleu_4": "BLEU_4"}
    return {names.get(k, k): float(v) for k, v in evaluator.eval.items() if k != "SPICE"}


@pytest.fixture(scope="module")
def both_pipelines(tmp_path_factory) -> tuple[CaptionScores, dict[str, float]]:
    if shutil.which("java") is None:
        pytest.skip("needs a Java runtime")
    folder = tmp_path_factory.mktemp("captions")
    gt_path = write_json(folder / "gt.json", GROUND_TRUTH)
    results_path = write_json(folder / "results.json", RESULTS)
    # One METEOR JVM (pycocoevalcap's Meteor, ~8 s to load its paraphrase table) serves both
    # pipelines; each sends its own EVAL request, which carries all the statistics it scores.
    import pycocoevalcap.eval as coco_eval

    shared_meteor = Meteor()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco_eval, "Meteor", lambda: shared_meteor)
        patch.setattr(caption_metrics, "Meteor", lambda: shared_meteor)
        reference = coco_eval_cap_scores(gt_path, results_path)
        ours = evaluate_caption_files(gt_path, results_path)  # closes the JVM when done
    return ours, reference


@needs_java
@pytest.mark.slow
@pytest.mark.parametrize("metric", CAPTION_METRICS)
def test_equals_coco_eval_cap(both_pipelines, metric: str) -> None:
    ours, reference = both_pipelines
    assert ours.scores[metric] == reference[metric]


@needs_java
@pytest.mark.slow
def test_output_keys_and_spice_note(both_pipelines) -> None:
    ours, _ = both_pipelines
    assert ours.num_images == 5
    as_dict = ours.to_dict()
    assert list(as_dict)[: len(CAPTION_METRICS)] == list(CAPTION_METRICS)
    if "SPICE" not in ours.scores:  # no CoreNLP jars here: reported, not silently dropped
        assert as_dict["skipped"]["SPICE"]
    # A hypothesis equal to a reference and sane ranges: a smoke check of the scale.
    assert 0 < as_dict["BLEU_4"] < as_dict["BLEU_1"] <= 1
    assert 0 < as_dict["CIDEr"] < 10


@needs_java
def test_tokenizer_matches_ptb_rules_and_writes_outside_site_packages(tmp_path, monkeypatch):
    tokenizer_dir = caption_metrics.PTB_TOKENIZER_JAR.parent
    before = sorted(p.name for p in tokenizer_dir.iterdir())
    monkeypatch.chdir(tmp_path)
    tokenized = ptb_tokenize(
        {
            1: ["A man\rwalks.", 'Two "big" dogs, running!'],
            "b": ["", "It's 5:30 -- late..."],
            3: ["Hello World"],
        }
    )
    # Lowercased, PTB-split ("it's" -> "it 's"), punctuation tokens dropped; "\r" does not
    # shift later captions onto other images; the empty caption stays an empty string.
    assert tokenized == {
        1: ["a man walks", "two big dogs running"],
        "b": ["", "it 's 5:30 late"],
        3: ["hello world"],
    }
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- no Java needed


def test_scorers_on_tokenized_captions_without_java() -> None:
    gts = {1: ["a dog runs on the grass", "the dog is running"], 2: ["a black cat", "a cat"]}
    res = {1: ["a dog running"], 2: ["a black cat"]}
    result = score_tokenized(gts, res, use_meteor=False, use_spice=False)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [result.scores[k] for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4")] == bleu
    assert result.scores["ROUGE_L"] == Rouge().compute_score(gts, res)[0]
    assert result.scores["CIDEr"] == Cider().compute_score(gts, res)[0]
    assert result.skipped == {"METEOR": "disabled", "SPICE": "disabled"}
    assert result.to_dict()["skipped"] == {"METEOR": "disabled", "SPICE": "disabled"}


def test_spice_is_skipped_with_a_reason_when_corenlp_jars_are_missing(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "spice-1.0.jar").write_bytes(b"")
    monkeypatch.setattr(caption_metrics, "SPICE_DIR", tmp_path)
    monkeypatch.setattr(caption_metrics, "SPICE_JAR", tmp_path / "spice-1.0.jar")
    reason = caption_metrics.spice_unavailable_reason()
    assert reason is not None
    assert "stanford-corenlp-3.6.0.jar" in reason
    assert "stanford-corenlp-3.6.0-models.jar" in reason
    result = score_tokenized({1: ["a cat"]}, {1: ["a cat"]}, use_meteor=False)
    assert result.skipped["SPICE"] == reason
    assert "SPICE" not in result.scores


def test_spice_runs_in_a_temp_dir_and_averages_like_pycocoevalcap(tmp_path, monkeypatch):
    calls: list[tuple[list[str], Path]] = []

    def fake_java(arguments, cwd, what):
        calls.append((list(arguments), Path(cwd)))
        entries = json.loads((Path(cwd) / arguments[3]).read_text())
        assert [entry["image_id"] for entry in entries] == [1, 2, 5]  # sorted, as Spice does
        assert entries[0] == {"image_id": 1, "test": "a cat", "refs": ["a cat", "one cat"]}
        scores = [{"f": 0.5}, {"f": 0.25}, {"f": "NaN?"}]
        output = [
            {"image_id": entry["image_id"], "scores": {"All": score}}
            for entry, score in zip(entries, scores, strict=True)
        ]
        (Path(cwd) / arguments[arguments.index("-out") + 1]).write_text(json.dumps(output))
        return ""

    monkeypatch.setattr(caption_metrics, "spice_unavailable_reason", lambda: None)
    monkeypatch.setattr(caption_metrics, "_run_java", fake_java)
    gts = {5: ["a bird"], 1: ["a cat", "one cat"], 2: ["a dog"]}
    res = {5: ["a bird"], 1: ["a cat"], 2: ["a dog"]}
    result = score_tokenized(gts, res, use_meteor=False)
    # A non-number F-score becomes NaN and the mean is NaN, as in pycocoevalcap's Spice.
    assert result.scores["SPICE"] != result.scores["SPICE"]
    ((arguments, cwd),) = calls
    assert arguments[:3] == ["-jar", "-Xmx8G", str(caption_metrics.SPICE_JAR)]
    assert "-cache" not in arguments
    assert not cwd.exists()  # the temporary directory is gone
    assert not str(cwd).startswith(str(caption_metrics.PYCOCOEVALCAP_DIR))


def test_missing_java_is_reported(monkeypatch) -> None:
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(QformerError, match="java was not found"):
        ptb_tokenize({1: ["a cat"]})


# ----------------------------------------------------------------------------- inputs


def test_ground_truth_is_gathered_in_image_then_annotation_order(tmp_path: Path) -> None:
    references = load_caption_ground_truth(write_json(tmp_path / "gt.json", GROUND_TRUTH))
    assert list(references) == [42, 7, 1000, 3, 15]
    assert references[1000][2] == "the man's breakfast (rice and eggs)"
    assert 999 not in references


@pytest.mark.parametrize(
    ("results", "message"),
    [
        (RESULTS[:3], r"2 of 5 images have no caption \(first missing image ids: 1000, 15\)"),
        (
            [*RESULTS, {"image_id": 7, "caption": "again"}],
            r"1 images have more than one caption; .*\(first: 7\)",
        ),
        (
            [*RESULTS, {"image_id": 8, "caption": "unknown"}],
            r"1 captioned images are not in the ground truth \(first: 8\)",
        ),
        ([{"image_id": 7}], r"entry 0: missing field 'caption'"),
        ([{"image_id": 7, "caption": ["a"]}], r"entry 0: field 'caption' should be str, got list"),
        ({"image_id": 7, "caption": "x"}, r"expected a JSON list, got dict"),
    ],
)
def test_bad_results_name_the_file_and_entries(tmp_path: Path, results: Any, message: str):
    gt_path = write_json(tmp_path / "gt.json", GROUND_TRUTH)
    results_path = write_json(tmp_path / "results.json", results)
    with pytest.raises(DataError, match=message) as error:
        evaluate_caption_files(gt_path, results_path)
    assert str(error.value).startswith(str(results_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("ground_truth", "message"),
    [
        ({"images": [{"id": 1}], "annotations": []}, r"1 images have no reference caption"),
        ({"images": [{"id": 1}]}, r"missing field 'annotations'"),
        ({"images": [{"id": 1}, {"id": 1}], "annotations": []}, r"image id 1 is listed twice"),
        (
            {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": None}]},
            r"annotations\[0\]: field 'caption' should be str, got NoneType",
        ),
    ],
)
def test_bad_ground_truth_names_the_file_and_entries(tmp_path: Path, ground_truth, message):
    gt_path = write_json(tmp_path / "gt.json", ground_truth)
    with pytest.raises(DataError, match=message) as error:
        load_caption_ground_truth(gt_path)
    assert str(error.value).startswith(str(gt_path))


def test_results_reader_keeps_string_image_ids(tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", [{"image_id": "dog.png", "caption": "a dog"}])
    assert load_caption_results(path) == {"dog.png": "a dog"}
