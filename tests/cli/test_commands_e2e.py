"""Commands end to end on the embedded default, their output files checked, where the other
test files do not already check them.

`eval-retrieval`, `caption`, `eval-caption --model`, `eval-vqa --model` (with `--blind` and
`--prompt short-answer`), mixed-precision training steps and `info`. One short stage-1 run and
one stage-2 run on top of it are shared by the module; the evaluations read small subsets of the
sample val split, written here in the official formats (Karpathy, COCO captions, VQAv2).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from statistics import mean

import pytest
import torch
import transformers
from safetensors.torch import load_file

from qformer_cli import checkpoint
from qformer_cli.eval.retrieval import itc_similarity, load_retrieval_set, read_retrieval_samples
from qformer_cli.inference.vqa import VQA_PROMPTS
from qformer_cli.pretrained import load_stage1_pipeline
from tests.tiny_runs import ROOT, invoke_json, metrics_rows

SAMPLE = ROOT / "sample_data"
VAL_IMAGES = SAMPLE / "images" / "val"
SMALL = ["--batch-size", "16", "--set", "train.log_every=1"]
RETRIEVAL_IMAGES = 40
CAPTION_IMAGES = 12
VQA_QUESTION = "what color is the square?"  # one text for all: --blind then only permutes answers
VQA_QUESTIONS = 16


def _read(path: Path) -> dict | list:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def stage1_run(trained_stage1: Path) -> Path:
    return trained_stage1


@pytest.fixture(scope="module")
def stage2_run(trained_stage2: Path) -> Path:
    return trained_stage2


# ------------------------------------------------------------------------------------------
# eval-retrieval


@pytest.fixture(scope="module")
def karpathy_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first val images in Karpathy's format (image paths relative to sample_data)."""
    entries = _read(SAMPLE / "karpathy_val.json")[:RETRIEVAL_IMAGES]
    path = tmp_path_factory.mktemp("karpathy") / "karpathy_subset.json"
    path.write_text(json.dumps(entries))
    return path


def _recall(similarity: torch.Tensor, matches: list[set[int]]) -> dict[str, float]:
    """Recall@1/5/10 in percent: row r is a hit at K when one of matches[r] ranks in its top K
    (best score first, equal scores in column order, as eval-retrieval documents)."""
    recalls = {}
    ranked = []
    for scores in similarity.tolist():
        ranked.append(sorted(range(len(scores)), key=lambda column: (-scores[column], column)))
    for k in (1, 5, 10):
        top = [row[:k] for row in ranked]
        hits = sum(bool(set(row) & match) for row, match in zip(top, matches, strict=True))
        recalls[f"R@{k}"] = round(100.0 * hits / len(matches), 2)
    return recalls


@pytest.mark.slow  # trains the shared stage-1 run (~20 s)
def test_eval_retrieval_writes_recalls_that_match_the_itc_ranking(
    stage1_run: Path, karpathy_subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "retrieval"
    args = ["--model", str(stage1_run), "--annotations", str(karpathy_subset)]
    printed = invoke_json(
        "eval-retrieval", *args, "--images", str(SAMPLE), "--k", "8", "--out", str(out)
    )
    metrics = _read(out / "metrics.json")
    assert metrics == printed
    entries = _read(karpathy_subset)
    assert metrics["num_images"] == len(entries) == RETRIEVAL_IMAGES
    assert metrics["num_texts"] == sum(len(entry["caption"]) for entry in entries)
    directions = ("image_to_text", "text_to_image")  # ITM re-ranked, then ITC only
    for row in (*directions, *(f"{d}_itc_only" for d in directions)):
        recalls = metrics[row]
        assert set(recalls) == {"R@1", "R@5", "R@10"}, row
        assert all(0.0 <= value <= 100.0 for value in recalls.values()), row
        assert recalls["R@1"] <= recalls["R@5"] <= recalls["R@10"], row

    # ITC-only rows against a ranking computed here: the ground truth from the JSON itself
    # (caption j of entry i belongs to image i, captions in file order), recall by top-k sets.
    loaded = load_stage1_pipeline(stage1_run, torch.device("cpu"))
    data = load_retrieval_set(
        read_retrieval_samples(karpathy_subset, SAMPLE),
        loaded.vision,
        loaded.image_transform,
        loaded.tokenizer,
        torch.device("cpu"),
        64,
    )
    loaded.model.eval()
    similarity = itc_similarity(loaded.model, data, 64)  # (images, texts)
    owner = [i for i, entry in enumerate(entries) for _ in entry["caption"]]
    captions_of = [{t for t, image in enumerate(owner) if image == i} for i in range(len(entries))]
    assert metrics["image_to_text_itc_only"] == _recall(similarity, captions_of)
    assert metrics["text_to_image_itc_only"] == _recall(similarity.t(), [{i} for i in owner])
    # The shared run learned something: above chance (10 of 40 images = 25 % at R@10).
    assert metrics["text_to_image_itc_only"]["R@10"] > 100.0 * 10 / RETRIEVAL_IMAGES


HARD_NEGATIVE_IMAGES = 5


@pytest.mark.slow  # trains the shared stage-1 run (~20 s)
def test_eval_retrieval_hard_negatives_equal_what_match_prefers(
    stage1_run: Path, karpathy_subset: Path, tmp_path: Path
) -> None:
    """The pairs' accuracies equal the preferences `qformer match` (tested against
    transformers' retrieval model) gives for each image's captions and negatives."""
    shipped = _read(SAMPLE / "hard_negatives_val.json")
    images = sorted({pair["filename"] for pair in shipped.values()})[:HARD_NEGATIVE_IMAGES]
    pairs = {  # absolute image paths: the file is read from elsewhere
        key: dict(pair, filename=str(SAMPLE / pair["filename"]))
        for key, pair in shipped.items()
        if pair["filename"] in images
    }
    pairs_file = tmp_path / "pairs.json"
    pairs_file.write_text(json.dumps(pairs))
    args = ["--model", str(stage1_run), "--annotations", str(karpathy_subset)]
    metrics = invoke_json(
        "eval-retrieval",
        *args,
        "--images",
        str(SAMPLE),
        "--hard-negatives",
        str(pairs_file),
        "--k",
        "4",
        "--out",
        str(tmp_path / "retrieval"),
    )["hard_negatives"]

    wins: dict[str, list[bool]] = {"itm": [], "itc": []}
    kinds = []
    for image in images:
        mine = [pair for pair in pairs.values() if pair["filename"] == str(SAMPLE / image)]
        texts = [
            arg
            for p in mine
            for t in (p["caption"], p["negative_caption"])
            for arg in ("--text", t)
        ]
        scores = invoke_json(
            "match", "--model", str(stage1_run), "--image", str(SAMPLE / image), *texts
        )
        rows = scores["matches"]
        for j, pair in enumerate(mine):
            caption, negative = rows[2 * j], rows[2 * j + 1]
            wins["itm"].append(caption["itm_probability"] > negative["itm_probability"])
            wins["itc"].append(caption["itc_similarity"] > negative["itc_similarity"])
            kinds.append(pair["swapped"])
    percent = lambda won: round(100.0 * sum(won) / len(won), 2)  # noqa: E731
    assert metrics["pairs"] == len(pairs) == len(kinds)
    assert (metrics["itm"], metrics["itc"]) == (percent(wins["itm"]), percent(wins["itc"]))
    for kind, values in metrics["per_kind"].items():
        chosen = [k == kind for k in kinds]
        for score in ("itm", "itc"):
            assert values[score] == percent(
                [w for w, c in zip(wins[score], chosen, strict=True) if c]
            )
    assert set(metrics["per_kind"]) == {"color", "shape", "size", "position"}
    assert 0.0 <= metrics["itm_plus_itc"] <= 100.0


# ------------------------------------------------------------------------------------------
# caption / eval-caption


@pytest.fixture(scope="module")
def caption_ground_truth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO caption ground truth for the first val images."""
    coco = _read(SAMPLE / "captions_val.json")
    images = coco["images"][:CAPTION_IMAGES]
    kept = {image["id"] for image in images}
    subset = dict(
        coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in kept]
    )
    path = tmp_path_factory.mktemp("coco") / "captions_subset.json"
    path.write_text(json.dumps(subset))
    return path


def _caption(stage2_run: Path, ground_truth: Path, out: Path, *extra: str) -> dict:
    args = ["--model", str(stage2_run), "--annotations", str(ground_truth)]
    return invoke_json("caption", *args, "--images", str(VAL_IMAGES), "--out", str(out), *extra)


COCO_METRICS = {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}


@pytest.fixture(scope="module")
def plain_captions(
    stage2_run: Path, caption_ground_truth: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, Path]:
    """`caption` on the ground truth's images: what it printed, and its output folder."""
    out = tmp_path_factory.mktemp("caption") / "plain"
    return _caption(stage2_run, caption_ground_truth, out), out


@pytest.mark.slow  # trains the shared stage-1 and stage-2 runs
def test_caption_writes_one_caption_per_image_and_coco_scores(
    stage2_run: Path, caption_ground_truth: Path, plain_captions: tuple[dict, Path], tmp_path: Path
) -> None:
    printed, plain = plain_captions
    captions = _read(plain / "captions.json")
    ids = [image["id"] for image in _read(caption_ground_truth)["images"]]
    assert [row["image_id"] for row in captions] == ids
    assert all(isinstance(row["caption"], str) and row["caption"].strip() for row in captions)
    assert printed["num_images"] == CAPTION_IMAGES and printed["shuffled_images"] is False
    metrics = _read(plain / "metrics.json")
    assert set(metrics) >= COCO_METRICS and metrics == printed["metrics"]
    assert all(metrics[name] >= 0.0 for name in COCO_METRICS)
    assert metrics["BLEU_1"] > 0.1  # the captions share words with the ground truth

    # eval-caption --model: the same captions (same default generation), the same scores.
    out = tmp_path / "eval"
    args = ["--model", str(stage2_run), "--annotations", str(caption_ground_truth)]
    scored = invoke_json("eval-caption", *args, "--images", str(VAL_IMAGES), "--out", str(out))
    assert _read(out / "captions.json") == captions
    assert _read(out / "metrics.json") == scored == metrics


@pytest.mark.slow  # uses the shared stage-2 run
def test_sampling_flags_reach_generation(
    stage2_run: Path, caption_ground_truth: Path, tmp_path: Path
) -> None:
    """--do-sample with a vanishing --top-p keeps only the likeliest token: greedy's captions;
    with a high --temperature and the full nucleus the captions change."""
    folder = tmp_path / "images"  # the ground truth's images, captioned without scoring
    folder.mkdir()
    for image in _read(caption_ground_truth)["images"]:
        (folder / image["file_name"]).symlink_to(VAL_IMAGES / image["file_name"])

    def captions(name: str, *extra: str) -> list:
        args = ["--model", str(stage2_run), "--images", str(folder), "--num-beams", "1"]
        invoke_json("caption", *args, "--out", str(tmp_path / name), *extra)
        return _read(tmp_path / name / "captions.json")

    greedy = captions("greedy")
    assert captions("narrow", "--do-sample", "--top-p", "1e-9") == greedy
    assert captions("wide", "--do-sample", "--temperature", "5") != greedy


@pytest.mark.slow  # trains the shared stage-1 and stage-2 runs
def test_shuffle_images_captions_each_image_with_another_images_features(
    stage2_run: Path, caption_ground_truth: Path, plain_captions: tuple[dict, Path], tmp_path: Path
) -> None:
    """One batch, one prompt: shuffling permutes the images (a derangement), so the captions
    are the plain run's captions moved to other ids, and scored there against those ids."""
    plain = _read(plain_captions[1] / "captions.json")
    printed = _caption(stage2_run, caption_ground_truth, tmp_path, "--shuffle-images")
    assert printed["shuffled_images"] is True
    shuffled = _read(tmp_path / "captions.json")
    assert [row["image_id"] for row in shuffled] == [row["image_id"] for row in plain]
    before = [row["caption"] for row in plain]
    after = [row["caption"] for row in shuffled]
    assert len(set(before)) > 1, before  # the check means something only if captions differ
    assert Counter(after) == Counter(before) and after != before
    assert printed["metrics"] == _read(tmp_path / "metrics.json")
    assert printed["metrics"] != plain_captions[0]["metrics"]


# ------------------------------------------------------------------------------------------
# eval-vqa


@pytest.fixture(scope="module")
def vqa_subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """VQAv2 questions and annotations: the first val questions asking VQA_QUESTION."""
    questions = _read(SAMPLE / "vqa_val_questions.json")
    annotations = _read(SAMPLE / "vqa_val_annotations.json")
    kept = [q for q in questions["questions"] if q["question"] == VQA_QUESTION][:VQA_QUESTIONS]
    ids = {q["question_id"] for q in kept}
    directory = tmp_path_factory.mktemp("vqa")
    questions_path, annotations_path = directory / "questions.json", directory / "annotations.json"
    questions_path.write_text(json.dumps(dict(questions, questions=kept)))
    kept_annotations = [a for a in annotations["annotations"] if a["question_id"] in ids]
    annotations_path.write_text(json.dumps(dict(annotations, annotations=kept_annotations)))
    return questions_path, annotations_path


@pytest.fixture(scope="module")
def vqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stage-2 step from the Q-Former's BERT initialization, no stage 1. Short trained
    runs answer each question with the LM's prior (one colour for every image: the shared
    runs, or one step on a 30-step stage-1 run since that recipe has no dropout); the fresh
    Q-Former's soft prompt still differs from image to image, and so do its answers, which is
    what --blind's permutation needs to be seen. It checks the mechanism, not grounding."""
    out = tmp_path_factory.mktemp("e2e")
    args = ["--max-steps", "1", "--batch-size", "8"]
    invoke_json("pretrain-stage2", "--out", str(out / "vqa-model"), *args)
    return out / "vqa-model"


def _vqa(stage2_run: Path, subset: tuple[Path, Path], out: Path, *extra: str) -> dict:
    questions, annotations = subset
    files = ["--questions", str(questions), "--annotations", str(annotations)]
    args = ["--model", str(stage2_run), *files, "--images", str(VAL_IMAGES), "--out", str(out)]
    return invoke_json("eval-vqa", *args, *extra)


@pytest.mark.slow  # trains the shared stage-1 and stage-2 runs
def test_eval_vqa_writes_official_results_blind_and_prompt(
    vqa_model: Path, vqa_subset: tuple[Path, Path], tmp_path: Path
) -> None:
    plain = _vqa(vqa_model, vqa_subset, tmp_path / "plain")
    results = _read(tmp_path / "plain" / "vqa_results.json")
    # The official VQA results format: a list of {"question_id": int, "answer": str} (the
    # official evaluation reads these two keys), plus the image's id and file for the user.
    question_ids = [q["question_id"] for q in _read(vqa_subset[0])["questions"]]
    keys = {"question_id", "answer", "image_id", "file"}
    assert [set(row) for row in results] == [keys] * len(question_ids)
    assert [row["question_id"] for row in results] == question_ids
    assert all(isinstance(row["answer"], str) and row["answer"] for row in results)
    metrics = _read(tmp_path / "plain" / "metrics.json")
    assert metrics["num_questions"] == VQA_QUESTIONS and 0.0 <= metrics["overall"] <= 100.0
    assert plain["prompt"] == VQA_PROMPTS["answer"] and plain["blind"] is False
    answers = [row["answer"] for row in results]
    assert len(set(answers)) > 1, answers  # --blind can only show itself if answers differ

    # --blind: every question is asked of another question's image. All questions are the
    # same text, so the answers are the plain answers permuted.
    blind = _vqa(vqa_model, vqa_subset, tmp_path / "blind", "--blind")
    blind_answers = [row["answer"] for row in _read(tmp_path / "blind" / "vqa_results.json")]
    assert blind["blind"] is True
    assert Counter(blind_answers) == Counter(answers) and blind_answers != answers

    # --prompt short-answer: LAVIS's other template is the one used (recorded with the results).
    # This model answers it as it answers "Answer:", so that the template reaches the language
    # model is shown by a bare "{}" template: without the cue the answers change.
    short = _vqa(vqa_model, vqa_subset, tmp_path / "short", "--prompt", "short-answer")
    assert short["prompt"] == "Question: {} Short answer:"
    assert len(_read(tmp_path / "short" / "vqa_results.json")) == VQA_QUESTIONS
    _vqa(vqa_model, vqa_subset, tmp_path / "bare", "--prompt", "{}")
    bare_answers = [row["answer"] for row in _read(tmp_path / "bare" / "vqa_results.json")]
    assert bare_answers != answers


# ------------------------------------------------------------------------------------------
# mixed-precision training through the command


def _learns(run: Path, summary: dict, loss: str) -> None:
    rows = metrics_rows(run)
    values = [row[loss] for row in rows]
    assert all(torch.isfinite(torch.tensor(values))), values
    assert mean(values[-4:]) < 0.85 * mean(values[:4]), values
    assert summary["last"]["skipped_nonfinite"] < len(rows) // 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_stage1_mixed_precision_steps_are_finite_and_learn(precision: str, tmp_path: Path) -> None:
    """bf16 autocast, and fp16 with its gradient scaler (which skips the first overflowing
    steps while it lowers the scale), on the CPU; master weights stay fp32 and move."""
    out = tmp_path / precision
    fast = ["--set", "train.warmup_steps=2", "--set", "train.log_every=1", "--batch-size", "8"]
    fast += ["--set", "train.save_every=6"]
    fast += ["--set", "train.allow_slow_precision=true"]  # correctness, on any CPU: tiny sizes
    summary = invoke_json(
        "pretrain-stage1", "--out", str(out), "--precision", precision, "--max-steps", "12", *fast
    )
    _learns(out, summary, "itg")
    middle, final = (
        load_file(str(path / checkpoint.WEIGHTS)) for path in checkpoint.list_checkpoints(out)
    )  # steps 6 and 12
    assert all(tensor.dtype == torch.float32 for tensor in final.values())
    unchanged = [key for key in final if final[key].equal(middle[key])]
    assert not unchanged, unchanged
    assert _read(out / "run_config.json")["train"]["precision"] == precision


@pytest.mark.slow  # trains the shared stage-1 run
def test_stage2_bf16_steps_are_finite_and_learn(stage1_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    args = ["--out", str(out), "--init", str(stage1_run), "--precision", "bf16", *SMALL]
    args += ["--set", "train.warmup_steps=2", "--set", "train.allow_slow_precision=true"]
    summary = invoke_json("pretrain-stage2", *args, "--max-steps", "15")
    _learns(out, summary, "lm")


# ------------------------------------------------------------------------------------------
# info


def test_info_counts_equal_the_backbones_and_a_trained_checkpoint(tmp_path: Path) -> None:
    """`qformer info` on the default config against models built independently: the shipped
    backbones loaded by transformers, and the tensors a 1-step stage-1 / stage-2 run saves."""
    report = invoke_json("info")
    params, totals = report["parameters"], report["totals"]
    vision = transformers.Blip2VisionModel.from_pretrained(SAMPLE / "backbones" / "vision")
    llm = transformers.AutoModelForCausalLM.from_pretrained(SAMPLE / "backbones" / "opt")
    # transformers' post_layernorm is BLIP-2's ln_vision, which we train (LAVIS does too)
    assert params["vision_encoder"]["frozen"] + params["ln_vision"]["trainable"] == sum(
        p.numel() for p in vision.parameters()
    )
    assert params["llm"]["frozen"] == sum(p.numel() for p in llm.parameters())
    assert (
        totals["stage2"]["frozen"] == params["vision_encoder"]["frozen"] + params["llm"]["frozen"]
    )
    one_step = ["--max-steps", "1", "--batch-size", "2"]
    stage1 = tmp_path / "stage1"
    invoke_json("pretrain-stage1", "--out", str(stage1), *one_step)
    stage2 = tmp_path / "stage2"
    invoke_json("pretrain-stage2", "--out", str(stage2), "--init", str(stage1), *one_step)
    instruct = tmp_path / "stage2-instruct"  # the Q-Former keeps its text parts
    aware = ("--set", "model.instruction_aware=true")
    invoke_json("pretrain-stage2", "--out", str(instruct), "--init", str(stage1), *one_step, *aware)
    instruct_totals = invoke_json("info", *aware)["totals"]
    for stage, run, counted in (
        ("stage1", stage1, totals),
        ("stage2", stage2, totals),
        ("stage2", instruct, instruct_totals),
    ):
        saved = load_file(str(checkpoint.resolve_checkpoint(run) / checkpoint.WEIGHTS))
        assert counted[stage]["trainable"] == sum(t.numel() for t in saved.values()), run


@pytest.mark.slow  # uses the shared stage-2 run
def test_eval_vqa_answers_questions_without_ground_truth(stage2_run: Path, tmp_path: Path):
    """VQAv2 test-dev has no annotations: --questions alone is answered in the official results
    format and not scored (not silently paired with the sample split's annotations)."""
    questions = _read(SAMPLE / "vqa_val_questions.json")
    subset = tmp_path / "test-dev.json"
    subset.write_text(json.dumps(dict(questions, questions=questions["questions"][:5])))
    out = tmp_path / "vqa"
    args = ["--model", str(stage2_run), "--questions", str(subset), "--images", str(VAL_IMAGES)]
    printed = invoke_json("eval-vqa", *args, "--out", str(out))
    assert printed["scored"] is False and "overall" not in printed
    results = _read(out / "vqa_results.json")
    assert [row["question_id"] for row in results] == [
        q["question_id"] for q in questions["questions"][:5]
    ]
    assert not (out / "metrics.json").exists()


@pytest.mark.slow  # uses the shared stage-1 run
def test_karpathys_dataset_file_works_for_retrieval_and_training(
    stage1_run: Path, tmp_path: Path
) -> None:
    """Karpathy's own dataset_coco.json (every split in one file): eval-retrieval reads its test
    images and scores exactly as on the same images in LAVIS's list layout; training reads its
    train + restval images."""
    from tests.data.test_data_formats import write_karpathy_dataset

    dataset = tmp_path / "dataset_coco.json"
    payload = write_karpathy_dataset(dataset, test_images=20)
    test_images = [image for image in payload["images"] if image["split"] == "test"]
    lavis_list = tmp_path / "karpathy_test.json"
    lavis_list.write_text(
        json.dumps(
            [
                {
                    "image": f"{image['filepath']}/{image['filename']}",
                    "caption": [sentence["raw"] for sentence in image["sentences"]],
                }
                for image in test_images
            ]
        )
    )
    scores = {}
    for name, caption_file in (("original", dataset), ("lavis", lavis_list)):
        args = ["--model", str(stage1_run), "--annotations", str(caption_file)]
        out = ("--images", str(SAMPLE), "--k", "4", "--out", str(tmp_path / name))
        printed = invoke_json("eval-retrieval", *args, *out)
        scores[name] = {k: v for k, v in printed.items() if k != "annotations"}
    assert scores["original"]["num_images"] == 20
    assert scores["original"] == scores["lavis"]

    trained = invoke_json(
        "pretrain-stage1",
        "--data",
        str(dataset),
        "--set",
        f"data.image_root={SAMPLE}",
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "train"),
    )
    assert trained["steps"] == 1
