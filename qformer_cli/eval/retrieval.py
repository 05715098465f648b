"""Image-text retrieval with a stage-1 Q-Former, as BLIP-2 evaluates it.

ITC similarity for every (image, text) pair (max over the queries of the dot products of the
normalized embeddings); the top ``k`` candidates of each query are re-ranked by
``ITM logit (match) + ITC similarity``. Recall@K both ways: an image retrieves any of its
captions; a caption retrieves its one image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qformer_cli.data import (
    BadSampleLog,
    Sample,
    SampleDataset,
    build_transform,
    inference_workers,
    make_dataloader,
    read_caption_file,
)
from qformer_cli.data.karpathy import EVALUATION_SPLITS
from qformer_cli.data.transforms import ImageTransformConfig
from qformer_cli.errors import DataError
from qformer_cli.models.backbones import VisionEncoder
from qformer_cli.models.blip2 import Stage1Model

RECALL_AT = (1, 5, 10)


@dataclass
class RetrievalSet:
    image_embeds: torch.Tensor  # (N_img, L, C) frozen vision features
    input_ids: torch.Tensor  # (N_txt, T)
    text_mask: torch.Tensor  # (N_txt, T)
    text_to_image: torch.Tensor  # (N_txt,) index of each caption's image
    samples: list[Sample] | None = None  # the N_img images read (bad ones skipped)


@torch.no_grad()
def itc_similarity(model: Stage1Model, data: RetrievalSet, batch_size: int) -> torch.Tensor:
    """(N_img, N_txt) ITC similarity (no temperature: ranking only)."""
    image_feats = torch.cat(
        [model.image_feats(chunk) for chunk in data.image_embeds.split(batch_size)]
    )  # (N_img, Q, D)
    text_feat = torch.cat(
        [
            model.text_feat(ids, mask)
            for ids, mask in zip(
                data.input_ids.split(batch_size), data.text_mask.split(batch_size), strict=True
            )
        ]
    )  # (N_txt, D)
    return model.similarity(image_feats, text_feat)


@torch.no_grad()
def pair_itm_logits(
    model: Stage1Model,
    data: RetrievalSet,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """ITM logits (P, 2) [no match, match] of the pairs (image_index[p], text_index[p])."""
    logits = []
    for images, texts in zip(
        image_index.split(batch_size), text_index.split(batch_size), strict=True
    ):
        image_kv = model.qformer.encode_image(data.image_embeds[images])
        logits.append(model.itm_logits(image_kv, data.input_ids[texts], data.text_mask[texts]))
    return torch.cat(logits)


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Each row's columns, best score first. Equal scores (identical captions have equal ITC
    similarity) stay in column order, so a tie resolves the same way whatever the row's other
    scores are (an unstable sort resolves it by them)."""
    return scores.argsort(dim=1, descending=True, stable=True)


def rerank(
    model: Stage1Model,
    data: RetrievalSet,
    similarity: torch.Tensor,
    *,
    rows_are_images: bool,
    k: int,
    batch_size: int,
) -> torch.Tensor:
    """Scores (rows, cols): each row's top-k by ITC get ITM logit + ITC, the others -inf."""
    rows, cols = similarity.shape
    k = min(k, cols)
    top_index = rank_order(similarity)[:, :k]  # (rows, k)
    top_sim = similarity.gather(1, top_index)
    row_index = torch.arange(rows, device=similarity.device).repeat_interleave(k)
    col_index = top_index.reshape(-1)
    images, texts = (row_index, col_index) if rows_are_images else (col_index, row_index)
    itm = pair_itm_logits(model, data, images, texts, batch_size)[:, 1]  # the match logit
    scores = torch.full((rows, cols), float("-inf"), device=similarity.device)
    scores[row_index, col_index] = itm + top_sim.reshape(-1)
    return scores


def itc_order_past_top_k(scores: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """``rerank``'s scores with each row's candidates past its top k (-inf there) ranked after
    the top k in ITC order. LAVIS leaves them tied (at -100), which orders them arbitrarily:
    its R@K is defined for K <= k only (k 128 there, K <= 10). Here R@K for K >= k equals
    ITC's, as re-ranking reorders the top k only."""
    past_top_k = scores.isinf()
    lowest_reranked = scores.masked_fill(past_top_k, float("inf")).amin(dim=1, keepdim=True)
    offset = lowest_reranked - similarity.amax(dim=1, keepdim=True) - 1.0  # (rows, 1)
    return torch.where(past_top_k, similarity + offset, scores)


def recall_at(scores: torch.Tensor, is_match: torch.Tensor) -> dict[str, float]:
    """Percent of rows whose best match ranks within the top K (K in 1, 5, 10)."""
    order = rank_order(scores.cpu())
    ranked_match = torch.gather(is_match, 1, order)  # (rows, cols) bool in rank order
    first_hit = ranked_match.float().argmax(dim=1)
    return {f"R@{k}": round(100.0 * (first_hit < k).float().mean().item(), 2) for k in RECALL_AT}


def evaluate_retrieval(
    model: Stage1Model, data: RetrievalSet, k: int = 128, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    model.eval()
    similarity = itc_similarity(model, data, batch_size)  # (N_img, N_txt)
    num_images = data.image_embeds.shape[0]
    is_match = data.text_to_image[None, :] == torch.arange(num_images)[:, None]  # (N_img, N_txt)
    i2t = rerank(model, data, similarity, rows_are_images=True, k=k, batch_size=batch_size)
    t2i = rerank(
        model, data, similarity.t().contiguous(), rows_are_images=False, k=k, batch_size=batch_size
    )
    return {
        "image_to_text": recall_at(itc_order_past_top_k(i2t, similarity), is_match),
        "text_to_image": recall_at(itc_order_past_top_k(t2i, similarity.t()), is_match.t()),
        "image_to_text_itc_only": recall_at(similarity, is_match),
        "text_to_image_itc_only": recall_at(similarity.t(), is_match.t()),
    }


@torch.no_grad()
def evaluate_hard_negatives(
    model: Stage1Model, data: RetrievalSet, kinds: list[str], batch_size: int = 64
) -> dict[str, object]:
    """How often each score puts an image's true caption above its hard negative, in percent
    (chance 50): ``data`` holds each image's pairs as consecutive texts (caption, negative;
    :func:`~qformer_cli.data.hard_negatives.pairs_as_samples`) and ``kinds`` names each pair's
    change, in text order. Scores: the ITM head's match probability, the ITC similarity, and
    match logit + ITC (what ITM re-ranking ranks by)."""
    model.eval()
    similarity = itc_similarity(model, data, batch_size)  # (N_img, N_txt)
    owners = data.text_to_image.to(similarity.device)
    texts = torch.arange(len(owners), device=similarity.device)
    itc = similarity[owners, texts]  # (N_txt,) each text against its own image
    logits = pair_itm_logits(model, data, owners, texts, batch_size)  # (N_txt, 2)
    scores = {
        "itm": logits.softmax(dim=-1)[:, 1],  # the ITM head's P(match)
        "itc": itc,
        "itm_plus_itc": logits[:, 1] + itc,
    }
    # (P,) per pair: did the caption (even text) beat its negative (the odd text after it)?
    wins = {name: (score[0::2] > score[1::2]).cpu() for name, score in scores.items()}
    result: dict[str, object] = {"pairs": len(kinds), **_percent_of(wins)}
    if any(kinds):
        result["per_kind"] = {
            kind: _percent_of({n: w[[k == kind for k in kinds]] for n, w in wins.items()})
            for kind in dict.fromkeys(kinds)
        }
    return result


def _percent_of(wins: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: round(100.0 * won.float().mean().item(), 2) for name, won in wins.items()}


# --------------------------------------------------------------------------------------------
# From files: a stage-1 checkpoint and a caption set.

RETRIEVAL_MAX_TEXT_LEN = 35  # BLIP-2's retrieval evaluation length


def read_retrieval_samples(
    annotations: Path, image_root: Path | None, bad: BadSampleLog | None = None
) -> list[Sample]:
    """The captioned images of COCO captions JSON, LAVIS's Karpathy val/test list, Karpathy's
    ``dataset_*.json`` (its test images) or a caption table."""
    samples = read_caption_file(annotations, image_root, karpathy_splits=EVALUATION_SPLITS, bad=bad)
    samples = [s for s in samples if s.captions]
    if not samples:
        raise DataError(f"{annotations}: no images with captions")
    return samples


def load_retrieval_set(
    samples: list[Sample],
    vision: VisionEncoder,
    image_transform: ImageTransformConfig,
    tokenizer,
    device: torch.device,
    batch_size: int,
    *,
    bad: BadSampleLog | None = None,
    max_image_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RetrievalSet:
    """The captioned images ``samples`` (:func:`read_retrieval_samples`), encoded. Bad samples
    follow ``bad`` (default: raise); a skipped image leaves the set with its captions.
    ``progress`` is told (images done, images) after each batch."""
    bad = bad or BadSampleLog()
    transform = build_transform(image_transform, train=False)
    dataset = SampleDataset(samples, transform, bad_samples=bad, max_image_pixels=max_image_pixels)
    features, loaded, done = [], [], 0
    workers = inference_workers(len(samples), batch_size)  # decoding overlaps the encoder
    for batch in make_dataloader(dataset, batch_size=batch_size, num_workers=workers):
        with torch.no_grad():
            features.append(vision(batch.images.to(device)).float())
        loaded += batch.samples
        done += len(batch) + len(batch.skipped)
        if progress is not None:
            progress(done, len(samples))
    if not loaded:
        raise DataError("none of the retrieval images could be read")
    samples = loaded
    captions = [caption for sample in samples for caption in sample.captions]
    owners = [i for i, sample in enumerate(samples) for _ in sample.captions]
    input_ids, text_mask = tokenize_texts(tokenizer, captions, device)
    return RetrievalSet(
        image_embeds=torch.cat(features),
        input_ids=input_ids,
        text_mask=text_mask,
        text_to_image=torch.tensor(owners),
        samples=samples,
    )


def tokenize_texts(
    tokenizer, texts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (N, T) of ``texts`` as BLIP-2's retrieval reads them: padded to the
    longest, cut at ``RETRIEVAL_MAX_TEXT_LEN``."""
    encoded = tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=RETRIEVAL_MAX_TEXT_LEN,
        return_tensors="pt",
    )
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
