"""Stage1Model's BLIP-2 operations: against transformers' Blip2ForImageTextRetrieval, a
brute-force similarity, and the training objective that calls them."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2VisionModel

from qformer_cli.config import Stage1Config
from qformer_cli.losses import Ranks
from qformer_cli.models.backbones import VisionEncoder
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.convert import load_external_weights
from qformer_cli.models.qformer import ImageKV
from qformer_cli.train.stage1 import GivenNegatives, Stage1Batch, Stage1Objective
from tests.conftest import NUM_QUERIES, TINY_OPT, TINY_QFORMER, TINY_VISION, our_config

EMBED_DIM = 32
DEC_TOKEN_ID = 98  # the tiny vocabulary's last id stands for [DEC]


@pytest.fixture(scope="module")
def matched(tmp_path_factory) -> tuple[Blip2ForImageTextRetrieval, Stage1Model]:
    """A random transformers retrieval model and ours loaded from its save_pretrained directory."""
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=TINY_VISION,
        qformer_config=dict(TINY_QFORMER, use_qformer_text_input=True),
        text_config=TINY_OPT,
        num_query_tokens=NUM_QUERIES,
        image_text_hidden_size=EMBED_DIM,
    )
    hf_model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # transformers starts the queries at zero: all alike, max = mean
        hf_model.query_tokens.normal_(std=1.0)
    ours = Stage1Model(our_config(TINY_QFORMER, num_query_tokens=NUM_QUERIES, embed_dim=EMBED_DIM))
    directory = tmp_path_factory.mktemp("blip2_retrieval")
    hf_model.save_pretrained(directory)
    report = load_external_weights(ours, directory)
    assert report.unexpected == []
    return hf_model, ours.eval()


def _image_embeds(hf_model: Blip2ForImageTextRetrieval, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, C) frozen features of the checkpoint's vision tower, through our encoder wrapper
    (it drops post_layernorm, which is our ln_vision)."""
    tower = Blip2VisionModel(hf_model.config.vision_config)
    tower.load_state_dict(hf_model.vision_model.state_dict())
    return VisionEncoder(tower)(pixels)


def _texts(batch: int, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(1, TINY_QFORMER["vocab_size"] - 1, (batch, length))
    text_mask = torch.ones_like(input_ids)
    text_mask[1, 4:] = 0  # one padded caption
    return input_ids, text_mask


def test_itc_and_itm_match_transformers_retrieval_model(matched) -> None:
    hf_model, ours = matched
    pixels = torch.randn(3, 3, 32, 32)
    input_ids, text_mask = _texts(3)
    with torch.no_grad():
        itc = hf_model(pixels, input_ids, text_mask, use_image_text_matching_head=False)
        itm = hf_model(pixels, input_ids, text_mask, use_image_text_matching_head=True)
        image_embeds = _image_embeds(hf_model, pixels)
        image_feats = ours.image_feats(image_embeds)  # (3, Q, D)
        text_feat = ours.text_feat(input_ids, text_mask)  # (3, D)
        similarity = ours.similarity(image_feats, text_feat)  # (3 images, 3 texts)
        itm_logits = ours.itm_logits(ours.qformer.encode_image(image_embeds), input_ids, text_mask)
    assert image_feats.shape == (3, NUM_QUERIES, EMBED_DIM)
    assert torch.allclose(image_feats.norm(dim=-1), torch.ones(3, NUM_QUERIES), atol=1e-6)
    assert torch.allclose(text_feat.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(similarity, itc.logits_per_image, atol=1e-5)
    assert itm_logits.shape == (3, 2)
    assert torch.allclose(itm_logits, itm.logits_per_image, atol=1e-5)


def test_similarity_is_the_max_over_queries_in_both_orientations() -> None:
    image_feats = torch.randn(4, 5, 8)  # (N_img, Q, D)
    text_feat = torch.randn(6, 8)  # (N_txt, D)
    expected = torch.empty(4, 6)
    for i in range(4):
        for t in range(6):
            expected[i, t] = max(float(image_feats[i, q] @ text_feat[t]) for q in range(5))
    assert torch.allclose(Stage1Model.similarity(image_feats, text_feat), expected, atol=1e-6)
    by_text = Stage1Model.similarity(image_feats, text_feat, rows="texts")  # (N_txt, N_img)
    assert torch.allclose(by_text, expected.t(), atol=1e-6)


def test_image_feats_from_queries_of_an_image_pass_equal_image_feats(matched) -> None:
    _, ours = matched
    image_embeds = torch.randn(2, 5, TINY_QFORMER["encoder_hidden_size"])
    with torch.no_grad():
        query_output = ours.qformer(image_kv=ours.qformer.encode_image(image_embeds)).query_output
        assert torch.equal(
            ours.image_feats_from_queries(query_output), ours.image_feats(image_embeds)
        )


def _stage1_batch(ours: Stage1Model, size: int) -> Stage1Batch:
    input_ids, text_mask = _texts(size)
    image_embeds = torch.randn(size, 5, ours.config.encoder_width)
    negatives = GivenNegatives(image=torch.arange(size).roll(1), text=torch.arange(size).roll(-1))
    return Stage1Batch(
        image_embeds, input_ids, text_mask, torch.arange(size), given_negatives=negatives
    )


def test_training_itm_positive_rows_are_the_itm_logits_of_the_matched_pairs(matched) -> None:
    """What the trainer scores as positives is what retrieval re-ranks with (eval: no dropout)."""
    _, ours = matched
    objective = Stage1Objective(ours, DEC_TOKEN_ID, settings=Stage1Config().resolved("tiny"))
    batch = _stage1_batch(ours, 4)
    with torch.no_grad():
        image_kv = ours.qformer.encode_image(batch.image_embeds)
        unused = torch.zeros(4, 4)  # given negatives: the similarities are not read
        training = objective._itm_logits(batch, image_kv, unused, unused, Ranks())  # (3B, 2)
        pairs = ours.itm_logits(
            ours.qformer.encode_image(batch.image_embeds), batch.input_ids, batch.text_mask
        )
    assert training.shape == (12, 2)
    assert torch.allclose(training[:4], pairs, atol=1e-6)


def test_itg_logits_with_cached_query_kv_equal_the_recomputed_pass(matched) -> None:
    _, ours = matched
    batch = _stage1_batch(ours, 3)
    decoder_ids = batch.input_ids.clone()
    decoder_ids[:, 0] = DEC_TOKEN_ID
    with torch.no_grad():
        image_kv: ImageKV = ours.qformer.encode_image(batch.image_embeds)
        query_kv = ours.qformer(image_kv=image_kv).query_kv
        cached = ours.itg_logits(decoder_ids, batch.text_mask, past_query_kv=query_kv)
        recomputed = ours.itg_logits(decoder_ids, batch.text_mask, image_kv=image_kv)
    assert cached.shape == (3, decoder_ids.shape[1], TINY_QFORMER["vocab_size"])
    assert torch.allclose(cached, recomputed, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        ours.itg_logits(decoder_ids, batch.text_mask, past_query_kv=query_kv, image_kv=image_kv)
