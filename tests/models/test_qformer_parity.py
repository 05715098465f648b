"""Our Q-Former against transformers' Blip2QFormerModel with the same weights (fp32, eval)."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from qformer_cli.models.config import QFormerConfig, qformer_preset
from qformer_cli.models.convert import import_state_dict
from qformer_cli.models.qformer import QFormer
from tests.conftest import TINY_QFORMER, our_config

TOLERANCE = 1e-5


def _hf_config(sizes: dict, with_text: bool) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(**sizes, use_qformer_text_input=with_text, attn_implementation="sdpa")


def _paired_models(
    config: QFormerConfig, hf_sizes: dict, with_text: bool
) -> tuple[Blip2QFormerModel, Blip2TextEmbeddings, QFormer]:
    """A random transformers Q-Former and ours holding the same weights (through convert.py)."""
    hf_config = _hf_config(hf_sizes, with_text)
    hf_model = Blip2QFormerModel(hf_config).eval()
    hf_embeddings = Blip2TextEmbeddings(hf_config).eval()
    ours = QFormer(config, with_text=with_text).eval()
    source = {f"qformer.{k}": v for k, v in hf_model.state_dict().items()}
    if with_text:
        source.update({f"embeddings.{k}": v for k, v in hf_embeddings.state_dict().items()})
    report = import_state_dict(ours, source, "transformers", prefix="qformer.")
    # transformers' Blip2QFormerModel holds neither the queries nor ln_vision.
    assert sorted(report.missing) == [
        "qformer.ln_vision.bias",
        "qformer.ln_vision.weight",
        "qformer.query_tokens",
    ]
    assert report.unexpected == []
    with torch.no_grad():  # a non-trivial ln_vision, so that a skipped ln_vision would show
        ours.ln_vision.weight.uniform_(0.5, 1.5)
        ours.ln_vision.bias.normal_()
    return hf_model, hf_embeddings, ours


def _blip2_sizes() -> dict:
    return {}  # Blip2QFormerConfig defaults are the paper's sizes


@pytest.mark.parametrize(
    ("name", "hf_sizes", "num_image_tokens"),
    [("tiny", TINY_QFORMER, 17), ("blip2", _blip2_sizes(), 257)],
)
def test_query_only_pass_matches_transformers(name: str, hf_sizes: dict, num_image_tokens: int):
    config = our_config(hf_sizes) if hf_sizes else qformer_preset("blip2")
    hf_model, _, ours = _paired_models(config, hf_sizes, with_text=False)
    images = torch.randn(2, num_image_tokens, config.encoder_width)
    with torch.no_grad():
        expected = hf_model(
            query_embeds=ours.query_tokens.expand(2, -1, -1),
            encoder_hidden_states=ours.ln_vision(images),
        ).last_hidden_state
        actual = ours.query_features(images)
    assert actual.shape == (2, config.num_query_tokens, config.hidden_size)
    assert (actual - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("name", "hf_sizes"), [("tiny", TINY_QFORMER), ("blip2", _blip2_sizes())])
def test_queries_and_text_pass_matches_transformers(name: str, hf_sizes: dict):
    config = our_config(hf_sizes) if hf_sizes else qformer_preset("blip2")
    hf_model, hf_embeddings, ours = _paired_models(config, hf_sizes, with_text=True)
    images = torch.randn(2, 9, config.encoder_width)
    input_ids = torch.randint(1, config.vocab_size, (2, 7))
    text_mask = torch.ones(2, 7, dtype=torch.long)
    text_mask[1, 4:] = 0  # the second text is padded after 4 tokens
    queries = ours.query_tokens.expand(2, -1, -1)
    num_queries = config.num_query_tokens
    with torch.no_grad():
        expected = hf_model(
            query_embeds=hf_embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=torch.cat([torch.ones(2, num_queries, dtype=torch.long), text_mask], 1),
            encoder_hidden_states=ours.ln_vision(images),
        ).last_hidden_state
        output = ours(image_kv=ours.encode_image(images), input_ids=input_ids, text_mask=text_mask)
    assert (output.query_output - expected[:, :num_queries]).abs().max() <= TOLERANCE
    real_tokens = text_mask.bool()  # padded positions' own outputs are not meaningful
    text_diff = (output.text_output - expected[:, num_queries:]).abs()[real_tokens]
    assert text_diff.max() <= TOLERANCE
