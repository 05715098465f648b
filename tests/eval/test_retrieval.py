"""Retrieval metrics on hand-made scores, and the re-ranking arithmetic."""

from __future__ import annotations

import torch

from qformer_cli.eval.retrieval import (
    RetrievalSet,
    evaluate_retrieval,
    itc_similarity,
    pair_itm_logits,
    recall_at,
    rerank,
)
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.config import qformer_preset


def test_recall_counts_the_rank_of_the_first_correct_match():
    # 3 queries over 12 candidates; correct ones marked True.
    scores = torch.arange(12, 0, -1, dtype=torch.float).repeat(3, 1)  # candidate 0 ranks first
    is_match = torch.zeros(3, 12, dtype=torch.bool)
    is_match[0, 0] = True  # rank 1
    is_match[1, 3] = True  # rank 4
    is_match[1, 9] = True  # (a later match does not matter)
    is_match[2, 7] = True  # rank 8
    assert recall_at(scores, is_match) == {"R@1": 33.33, "R@5": 66.67, "R@10": 100.0}


def test_a_tie_resolves_in_column_order_whatever_the_other_scores_are():
    # Candidates 3 and 297 tie at the top (as identical captions do); the match is 297, so it
    # ranks second, whatever the scores below them (an unstable sort put it first in 4 of 20).
    is_match = torch.zeros(1, 300, dtype=torch.bool)
    is_match[0, 297] = True
    for _ in range(20):
        scores = -torch.rand(1, 300)
        scores[0, [3, 297]] = 1.0
        assert recall_at(scores, is_match)["R@1"] == 0.0


def _tiny_set() -> tuple[Stage1Model, RetrievalSet]:
    torch.manual_seed(0)
    model = Stage1Model(qformer_preset("tiny", vocab_size=40, num_layers=2)).eval()
    data = RetrievalSet(
        image_embeds=torch.randn(3, 5, 128),
        input_ids=torch.randint(1, 40, (6, 7)),
        text_mask=torch.ones(6, 7, dtype=torch.long),
        text_to_image=torch.tensor([0, 0, 1, 1, 2, 2]),
    )
    return model, data


def test_rerank_adds_itm_to_itc_for_the_top_k_only():
    model, data = _tiny_set()
    similarity = itc_similarity(model, data, batch_size=2)  # (3, 6)
    scores = rerank(model, data, similarity, rows_are_images=True, k=2, batch_size=4)
    for image in range(3):
        top = similarity[image].topk(2).indices
        for text in range(6):
            if text in top:
                itm = pair_itm_logits(model, data, torch.tensor([image]), torch.tensor([text]), 1)[
                    :, 1
                ]
                assert torch.allclose(
                    scores[image, text], itm[0] + similarity[image, text], atol=1e-5
                )
            else:
                assert scores[image, text] == float("-inf")


def test_itc_similarity_is_the_max_over_queries_of_normalized_dot_products():
    model, data = _tiny_set()
    similarity = itc_similarity(model, data, batch_size=2)
    with torch.no_grad():
        queries = model.qformer.query_features(data.image_embeds[1:2])
        image = torch.nn.functional.normalize(model.vision_proj(queries), dim=-1)[0]  # (Q, D)
        text = model.qformer(input_ids=data.input_ids[4:5], use_queries=False, pattern="unimodal")
        caption = torch.nn.functional.normalize(model.text_proj(text.text_output[0, 0]), dim=-1)
    assert torch.allclose(similarity[1, 4], (image @ caption).max(), atol=1e-5)


def test_reranking_reorders_only_the_top_k_so_recall_beyond_k_equals_itc_only():
    # The candidates past the top k are not re-ranked: they follow in ITC order, so for K >= k
    # the top K holds the same candidates as ITC alone ranks first. (Left tied, as LAVIS
    # leaves them at -100, R@K for K > k would count candidates in arbitrary order.)
    torch.manual_seed(0)
    model = Stage1Model(qformer_preset("tiny", vocab_size=40, num_layers=2)).eval()
    images, texts_per_image = 24, 2
    input_ids = torch.randint(1, 40, (images * texts_per_image, 7))
    input_ids[1::4] = input_ids[2::4]  # identical captions of two images: tied similarities
    data = RetrievalSet(
        image_embeds=torch.randn(images, 5, 128),
        input_ids=input_ids,
        text_mask=torch.ones(images * texts_per_image, 7, dtype=torch.long),
        text_to_image=torch.arange(images).repeat_interleave(texts_per_image),
    )
    recalls = evaluate_retrieval(model, data, k=3, batch_size=8)
    for direction in ("image_to_text", "text_to_image"):
        reranked, itc_only = recalls[direction], recalls[f"{direction}_itc_only"]
        assert reranked["R@5"] == itc_only["R@5"], direction
        assert reranked["R@10"] == itc_only["R@10"], direction
        assert itc_only["R@10"] < 100.0, direction  # the candidates past the top k matter here
