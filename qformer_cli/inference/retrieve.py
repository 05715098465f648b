"""Image-text retrieval with a stage-1 model: ``eval-retrieval``'s run, and ranking any images
against any texts (ITC similarity, optionally re-ranked by ITM) for the Python API."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qformer_cli.data import BadSampleLog, Sample
from qformer_cli.data.hard_negatives import HardNegative, pair_kinds, pairs_as_samples
from qformer_cli.eval.retrieval import (
    RetrievalSet,
    evaluate_hard_negatives,
    evaluate_retrieval,
    itc_similarity,
    load_retrieval_set,
    rerank,
    tokenize_texts,
)


def retrieval_to_file(
    pipeline: Any,  # pretrained.Stage1Pipeline
    annotations: Path,
    samples: list[Sample],
    out_dir: Path,
    *,
    k: int,
    batch_size: int,
    device: torch.device,
    bad: BadSampleLog,
    max_image_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    hard_negatives: list[HardNegative] | None = None,
) -> dict[str, Any]:
    """Recall@K both ways on the ``samples`` of the caption file ``annotations``
    (:func:`~qformer_cli.eval.retrieval.read_retrieval_samples`) into ``out_dir/metrics.json``
    (images ``bad`` skipped are left out, with their captions, and listed in
    ``out_dir/skipped.json``); the command's result. With ``hard_negatives``, also how often
    ITM, ITC and their sum prefer each pair's caption to its negative."""

    def encode(images: list[Sample]) -> RetrievalSet:
        return load_retrieval_set(
            images,
            pipeline.vision,
            pipeline.image_transform,
            pipeline.tokenizer,
            device,
            batch_size,
            bad=bad,
            max_image_pixels=max_image_pixels,
            progress=progress,
        )

    data = encode(samples)
    metrics = evaluate_retrieval(pipeline.model, data, k=k, batch_size=batch_size)
    if hard_negatives is not None:
        pair_data = encode(pairs_as_samples(hard_negatives))
        assert pair_data.samples is not None  # load_retrieval_set keeps the images it read
        kinds = pair_kinds(hard_negatives, pair_data.samples)
        metrics["hard_negatives"] = evaluate_hard_negatives(
            pipeline.model, pair_data, kinds, batch_size
        )
    result = {
        "checkpoint": str(pipeline.directory),
        "annotations": str(annotations),
        "num_images": int(data.image_embeds.shape[0]),
        "num_texts": int(data.input_ids.shape[0]),
        "k": k,
        **metrics,
        **bad.result_fields(),
    }
    skipped = bad.write_records(out_dir / "skipped.json")
    if skipped is not None:
        result["skipped"] = str(skipped)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


@torch.no_grad()
def image_text_scores(
    pipeline: Any,  # pretrained.Stage1Pipeline
    pixel_values: torch.Tensor,
    texts: list[str],
    *,
    k: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """(N_img, N_txt) scores of preprocessed images (N_img, 3, H, W) against ``texts``: the ITC
    similarity, or with ``k > 0`` each image's top ``k`` texts re-ranked by ITM logit + ITC
    (the others -inf), as ``eval-retrieval`` ranks image -> text."""
    model = pipeline.model.eval()
    device = next(model.parameters()).device
    vision_dtype = next(pipeline.vision.parameters()).dtype
    features = torch.cat(
        [
            pipeline.vision(chunk.to(device=device, dtype=vision_dtype)).float()
            for chunk in pixel_values.split(batch_size)
        ]
    )  # (N_img, N, C)
    input_ids, text_mask = tokenize_texts(pipeline.tokenizer, texts, device)
    data = RetrievalSet(
        image_embeds=features,
        input_ids=input_ids,
        text_mask=text_mask,
        text_to_image=torch.full((len(texts),), -1),
    )
    similarity = itc_similarity(model, data, batch_size)  # (N_img, N_txt)
    if k <= 0:
        return similarity
    return rerank(model, data, similarity, rows_are_images=True, k=k, batch_size=batch_size)


@torch.no_grad()
def match_scores(
    pipeline: Any,  # pretrained.Stage1Pipeline
    pixel_values: torch.Tensor,
    texts: list[str],
) -> list[dict[str, Any]]:
    """One preprocessed image (1, 3, H, W) against ``texts``: for each text the ITM
    probability that it describes the image (softmax over the ITM head's [no match, match]
    logits) and the ITC similarity (the max over queries of the cosine similarity)."""
    model = pipeline.model.eval()
    device = next(model.parameters()).device
    vision_dtype = next(pipeline.vision.parameters()).dtype
    features = pipeline.vision(pixel_values.to(device=device, dtype=vision_dtype)).float()
    input_ids, text_mask = tokenize_texts(pipeline.tokenizer, texts, device)  # (T, L)
    similarity = model.similarity(
        model.image_feats(features), model.text_feat(input_ids, text_mask)
    )
    image_kv = model.qformer.encode_image(features.expand(len(texts), -1, -1))  # one per text
    match = model.itm_logits(image_kv, input_ids, text_mask).softmax(dim=-1)[:, 1]  # (T,)
    return [
        {"text": text, "itm_probability": float(p), "itc_similarity": float(s)}
        for text, p, s in zip(texts, match, similarity[0], strict=True)
    ]
