"""Measurements of the sample backbones, shared by ``train_backbones.py`` (which records them in
``training_summary.json``) and ``tests/models/test_sample_backbones.py`` (which asserts on them).

- ``probe_report``: linear probes on frozen vision features (scene attributes, well above chance
  when the features encode them), for the trained encoder and an untrained one of the same shape.
- ``blind_lm_report``: prompted "Question: ... Answer:", does a text-only LM answer with a word of
  the right kind (fluent) and how often is it the right one (blind: near the prior's rate)?
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import make_sample_data as world
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Blip2VisionConfig,
    Blip2VisionModel,
    PreTrainedTokenizerBase,
)

from qformer_cli.data.transforms import (
    EvalTransform,
    ImageTransformConfig,
    load_transform_config,
)
from qformer_cli.models.backbones import VisionEncoder

COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("1", "2", "3")


# ---------------------------------------------------------------- data


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def scene_description(scene: dict[str, Any]) -> str:
    """The full description of one ``scenes_{split}.json`` entry."""
    return world.full_description([world.SceneObject(**o) for o in scene["objects"]])


def load_split_pixels(
    data_dir: Path, scenes: list[dict[str, Any]], vision_dir: Path | None
) -> torch.Tensor:
    """Every scene's image through the eval transform: (N, 3, H, W)."""
    config = load_transform_config(vision_dir) if vision_dir else ImageTransformConfig(64)
    transform = EvalTransform(config)
    with_images = [transform(Image.open(data_dir / s["image"])) for s in scenes]
    return torch.stack(with_images)


# ---------------------------------------------------------------- vision probes


def load_vision_encoders(vision_dir: Path) -> dict[str, VisionEncoder]:
    """The shipped encoder ("trained") and a randomly initialized one of the same config
    ("untrained", seed 0), as the Q-Former sees them (``VisionEncoder``)."""
    trained = Blip2VisionModel.from_pretrained(vision_dir)
    torch.manual_seed(0)
    untrained = Blip2VisionModel(Blip2VisionConfig.from_pretrained(vision_dir))
    return {"trained": VisionEncoder(trained), "untrained": VisionEncoder(untrained)}


@torch.no_grad()
def vision_features(model: VisionEncoder, pixels: torch.Tensor, pooled: bool) -> torch.Tensor:
    """Frozen features the Q-Former reads (T = 1 + patches tokens of width D):
    pooled: [CLS ; mean of patch tokens] (N, 2D); else every token, flattened (N, T * D) -
    what the Q-Former's cross-attention sees, positions included."""
    chunks = []
    for start in range(0, len(pixels), 256):
        hidden = model(pixels[start : start + 256])  # (B, T, D)
        if pooled:
            chunks.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1))
        else:
            chunks.append(hidden.flatten(1))
    return torch.cat(chunks)


def fit_linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, max_iter: int = 200
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression (L2 1e-3, full-batch L-BFGS) on features standardized
    by the training set's mean and std; returns the predicted class of each row of new features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x = (train_x - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(train_x), train_y)
        loss = loss + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return probe((x - mean) / std).argmax(-1)

    return predict


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """``fit_linear_probe``'s accuracy on the test features."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    predict = fit_linear_probe(train_x, train_y, num_classes)
    return (predict(test_x) == test_y).float().mean().item()


def attribute_labels(scenes: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[int]]]:
    """Per attribute: (row indices into ``scenes``, class labels). Colour, shape, size and grid
    cell are read on one-object scenes; the count on all scenes."""
    single = [i for i, s in enumerate(scenes) if len(s["objects"]) == 1]
    first = [scenes[i]["objects"][0] for i in single]
    return {
        "color": (single, [COLORS.index(o["color"]) for o in first]),
        "shape": (single, [SHAPES.index(o["shape"]) for o in first]),
        "size": (single, [int(o["size"] == "large") for o in first]),
        "cell": (single, [o["row"] * 3 + o["col"] for o in first]),
        "count": (list(range(len(scenes))), [len(s["objects"]) - 1 for s in scenes]),
    }


def probe_accuracies(
    model: VisionEncoder,
    train: tuple[list[dict[str, Any]], torch.Tensor],
    test: tuple[list[dict[str, Any]], torch.Tensor],
    pooled: bool,
) -> dict[str, float]:
    """Probe accuracy per attribute; ``train``/``test`` are (scenes, pixels) pairs."""
    train_features = vision_features(model, train[1], pooled)
    test_features = vision_features(model, test[1], pooled)
    train_labels, test_labels = attribute_labels(train[0]), attribute_labels(test[0])
    accuracies = {}
    for name, (train_rows, train_y) in train_labels.items():
        test_rows, test_y = test_labels[name]
        accuracies[name] = round(
            linear_probe_accuracy(
                train_features[train_rows],
                torch.tensor(train_y),
                test_features[test_rows],
                torch.tensor(test_y),
            ),
            3,
        )
    return accuracies


def probe_report(vision_dir: Path, data_dir: Path, num_train: int = 1500) -> dict[str, Any]:
    """Probes trained on the first ``num_train`` train scenes, measured on val + test, on pooled
    and on all-token features; the same for a randomly initialized encoder of the same config,
    as a baseline; and each attribute's majority-class rate (chance)."""
    train_scenes = read_json(data_dir / "scenes_train.json")[:num_train]
    test_scenes = read_json(data_dir / "scenes_val.json") + read_json(data_dir / "scenes_test.json")
    train = (train_scenes, load_split_pixels(data_dir, train_scenes, vision_dir))
    test = (test_scenes, load_split_pixels(data_dir, test_scenes, vision_dir))
    encoders = load_vision_encoders(vision_dir)
    report: dict[str, Any] = {
        "probe_majority_class": {
            name: round(Counter(labels).most_common(1)[0][1] / len(labels), 3)
            for name, (_, labels) in attribute_labels(test_scenes).items()
        }
    }
    for name, encoder in encoders.items():
        for pooled in (True, False):
            key = f"probe_{name}_{'pooled' if pooled else 'all_tokens'}"
            report[key] = probe_accuracies(encoder, train, test, pooled)
    return report


@torch.no_grad()
def retrieval_r1(
    image_embeds: Callable[[torch.Tensor], torch.Tensor],
    text_embeds: Callable[..., torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    data_dir: Path,
) -> float:
    """Val image -> caption recall@1 (each image against every image's first caption), with
    the contrastive towers' normalized embeddings."""
    scenes = read_json(data_dir / "scenes_val.json")
    captions = {
        Path(e["image"]).name: e["caption"][0] for e in read_json(data_dir / "karpathy_val.json")
    }
    texts = [captions[Path(s["image"]).name] for s in scenes]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    text_features = text_embeds(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
    )
    image_features = image_embeds(load_split_pixels(data_dir, scenes, None))
    similarity = image_features @ text_features.T  # (N images, N captions)
    hits = similarity.argmax(dim=1) == torch.arange(len(scenes))
    return round(hits.float().mean().item(), 3)


# ---------------------------------------------------------------- blind LMs


def answer_word(generated: str) -> str:
    """The first word of a generated answer, lowercased, punctuation stripped."""
    words = generated.split("\n")[0].strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


QAItem = tuple[str, str, str]  # (scene description, question, majority answer)


def question_kind(question: str, answer: str) -> str | None:
    """The kind a val question is scored as: "color" is the issue's colour-of-a-named-shape
    template ("what color is the circle?"); "position" asks the colour or shape of the object at
    a place; "shape" the shape of a named colour; "size"; "number"; "yes/no"."""
    if question in {f"what color is the {shape}?" for shape in SHAPES}:
        return "color"
    if question.startswith("how many"):
        return "number"
    if answer in ("yes", "no"):
        return "yes/no"
    if question.startswith("what color is the object") or (
        question.startswith("what shape is") and not question.startswith("what shape is the")
    ):
        return "position"
    if question.startswith("what shape is the"):
        return "shape"
    if question.startswith("what size"):
        return "size"
    return None


def question_groups(data_dir: Path, split: str = "val") -> dict[str, list[QAItem]]:
    """Questions per kind (``question_kind``), each with its scene's full description."""
    questions = read_json(data_dir / f"vqa_{split}_questions.json")["questions"]
    annotations = read_json(data_dir / f"vqa_{split}_annotations.json")["annotations"]
    answer_of = {a["question_id"]: a["multiple_choice_answer"] for a in annotations}
    described = {
        s["image_id"]: scene_description(s) for s in read_json(data_dir / f"scenes_{split}.json")
    }
    groups: dict[str, list[QAItem]] = {kind: [] for kind in VALID_ANSWERS}
    for q in questions:
        item = (described[q["image_id"]], q["question"], answer_of[q["question_id"]])
        kind = question_kind(item[1], item[2])
        if kind is not None:
            groups[kind].append(item)
    return groups


VALID_ANSWERS = {
    "color": COLORS,
    "number": (*NUMBERS, "one", "two", "three"),
    "yes/no": ("yes", "no"),
    "shape": SHAPES,
    "position": (*COLORS, *SHAPES),
    "size": ("small", "large"),
}


def lm_answerer(lm_dir: Path) -> Callable[[list[str]], list[str]]:
    """Greedy answers (up to 4 new tokens) of the OPT or T5 model saved in ``lm_dir``."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    config = read_json(lm_dir / "config.json")
    if config.get("is_encoder_decoder"):
        model = AutoModelForSeq2SeqLM.from_pretrained(lm_dir).eval()
        stop = [tokenizer.eos_token_id]
    else:
        model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
        tokenizer.padding_side = "left"  # batched generation continues from the last token
        stop = [tokenizer("\n", add_special_tokens=False)["input_ids"][0], tokenizer.eos_token_id]

    @torch.no_grad()
    def answer(prompts: list[str]) -> list[str]:
        encoded = tokenizer(prompts, padding=True, return_tensors="pt")
        output = model.generate(
            **encoded,
            max_new_tokens=4,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id,
        )
        if not config.get("is_encoder_decoder"):
            output = output[:, encoded["input_ids"].shape[1] :]
        return tokenizer.batch_decode(output, skip_special_tokens=True)

    return answer


def score_answers(words: list[str], truth: list[str], kind: str) -> dict[str, float]:
    """Fraction of answers that are a valid word of the kind, and fraction that are right."""
    normalized = [{"one": "1", "two": "2", "three": "3"}.get(w, w) for w in words]
    right = sum(w == t for w, t in zip(normalized, truth, strict=True))
    fluent = sum(w in VALID_ANSWERS[kind] for w in words)
    return {"fluent": round(fluent / len(words), 3), "accuracy": round(right / len(words), 3)}


def blind_lm_report(lm_dir: Path, data_dir: Path, with_description: bool = True) -> dict[str, Any]:
    """Per question kind on val: fluent (a valid word of that kind) and accuracy against the
    majority answer when prompted "Question: q Answer:" alone (blind), the prior's rate (always
    the kind's most common answer), and accuracy when the scene's description comes first
    (the LM must read context: that is how a soft prompt will steer it later)."""
    answer = lm_answerer(lm_dir)
    report: dict[str, Any] = {
        "issue_prompt_answer": answer(["Question: what color is the circle? Answer:"])[0]
    }
    for kind, items in question_groups(data_dir).items():
        truth = [a for _, _, a in items]
        blind = [answer_word(t) for t in answer([f"Question: {q} Answer:" for _, q, _ in items])]
        report[kind] = {
            "questions": len(items),
            **score_answers(blind, truth, kind),
            "prior_rate": round(Counter(truth).most_common(1)[0][1] / len(items), 3),
        }
        if with_description:
            told = [f"{d}. Question: {q} Answer:" for d, q, _ in items]
            with_context = score_answers([answer_word(t) for t in answer(told)], truth, kind)
            report[kind]["accuracy_with_description"] = with_context["accuracy"]
    return {"blind_qa_val": report}


# ---------------------------------------------------------------- BERT


@torch.no_grad()
def mlm_accuracy(bert_dir: Path, data_dir: Path) -> dict[str, float]:
    """Masked-token accuracy on val captions, every 7th non-special token masked."""
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    model = AutoModelForMaskedLM.from_pretrained(bert_dir).eval()
    captions = [c for e in read_json(data_dir / "karpathy_val.json") for c in e["caption"]]
    encoded = tokenizer(
        captions, padding=True, return_tensors="pt", return_special_tokens_mask=True
    )
    ids = encoded["input_ids"]  # (N, L)
    positions = torch.arange(ids.numel()).view_as(ids)
    chosen = (positions % 7 == 3) & (encoded["special_tokens_mask"] == 0)
    masked = ids.masked_fill(chosen, tokenizer.mask_token_id)
    logits = model(input_ids=masked, attention_mask=encoded["attention_mask"]).logits
    correct = (logits.argmax(-1) == ids)[chosen]
    return {"val_masked_token_accuracy": round(correct.float().mean().item(), 3)}
