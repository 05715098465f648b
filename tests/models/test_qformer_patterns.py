"""Attention patterns, caches and structure of the Q-Former, checked against worked-out facts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qformer_cli.models.config import qformer_preset
from qformer_cli.models.qformer import QFormer, self_attention_mask

ATOL = 1e-5


def _model(**overrides) -> QFormer:
    config = qformer_preset("tiny", vocab_size=50, num_layers=3, **overrides)
    return QFormer(config).eval()


def _inputs(model: QFormer, batch: int = 2, text_len: int = 6):
    images = torch.randn(batch, 5, model.config.encoder_width)
    input_ids = torch.randint(1, model.config.vocab_size, (batch, text_len))
    return images, input_ids


def test_cross_attention_only_every_freq_layers_and_separate_query_ffn():
    model = QFormer(qformer_preset("blip2", num_layers=12))
    with_cross = [i for i, layer in enumerate(model.layers) if layer.cross_attention is not None]
    assert with_cross == [0, 2, 4, 6, 8, 10]
    assert all(layer.query_ffn is not layer.text_ffn for layer in model.layers)
    assert not hasattr(QFormer(qformer_preset("tiny"), with_text=False), "word_embeddings")


def test_mask_patterns_worked_out_by_hand():
    text_mask = torch.tensor([[1, 1, 0]])  # 2 real tokens, 1 pad; 2 queries
    q, t = 2, 3
    bidirectional = self_attention_mask("bidirectional", q, text_mask)[0, 0]
    causal = self_attention_mask("causal", q, text_mask)[0, 0]
    unimodal = self_attention_mask("unimodal", q, text_mask)[0, 0]
    # rows/cols: q0 q1 t0 t1 t2(pad)
    assert bidirectional.tolist() == [[True, True, True, True, False]] * (q + t)
    assert causal.tolist() == [
        [True, True, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, False],  # the pad row sees real tokens only
    ]
    assert unimodal.tolist() == [
        [True, True, False, False, False],
        [True, True, False, False, False],
        [False, False, True, True, False],
        [False, False, True, True, False],
        [False, False, True, True, False],
    ]
    assert self_attention_mask("bidirectional", q, None) is None  # query-only: no mask at all


def test_unimodal_pass_equals_separate_image_and_text_passes():
    model = _model()
    images, input_ids = _inputs(model)
    with torch.no_grad():
        image_kv = model.encode_image(images)
        joint = model(image_kv=image_kv, input_ids=input_ids, pattern="unimodal")
        queries_alone = model(image_kv=image_kv).query_output
        text_alone = model(input_ids=input_ids, use_queries=False, pattern="unimodal").text_output
    assert torch.allclose(joint.query_output, queries_alone, atol=ATOL)
    assert torch.allclose(joint.text_output, text_alone, atol=ATOL)


def test_causal_text_never_sees_later_tokens_and_queries_never_see_text():
    model = _model()
    images, input_ids = _inputs(model)
    changed = input_ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 7) % model.config.vocab_size
    with torch.no_grad():
        image_kv = model.encode_image(images)
        before = model(image_kv=image_kv, input_ids=input_ids, pattern="causal")
        after = model(image_kv=image_kv, input_ids=changed, pattern="causal")
    assert torch.allclose(before.query_output, after.query_output, atol=ATOL)
    assert torch.allclose(before.text_output[:, :4], after.text_output[:, :4], atol=ATOL)
    assert not torch.allclose(before.text_output[:, 4:], after.text_output[:, 4:], atol=ATOL)


def test_bidirectional_queries_do_see_the_text():
    model = _model()
    images, input_ids = _inputs(model)
    with torch.no_grad():
        image_kv = model.encode_image(images)
        with_text = model(image_kv=image_kv, input_ids=input_ids).query_output
        alone = model(image_kv=image_kv).query_output
    assert not torch.allclose(with_text, alone, atol=1e-3)


def test_itg_with_cached_query_kv_equals_full_recompute():
    model = _model()
    images, input_ids = _inputs(model)
    text_mask = torch.ones_like(input_ids)
    text_mask[0, 5:] = 0
    with torch.no_grad():
        image_kv = model.encode_image(images)
        image_pass = model(image_kv=image_kv)
        cached = model(
            input_ids=input_ids,
            text_mask=text_mask,
            use_queries=False,
            pattern="causal",
            past_query_kv=image_pass.query_kv,
        )
        full = model(image_kv=image_kv, input_ids=input_ids, text_mask=text_mask, pattern="causal")
    real = text_mask.bool()
    assert torch.allclose(cached.text_output[real], full.text_output[real], atol=ATOL)


def test_padding_never_changes_real_positions():
    model = _model()
    images, input_ids = _inputs(model)
    text_mask = torch.ones_like(input_ids)
    text_mask[:, 4:] = 0
    garbage = input_ids.clone()
    garbage[:, 4:] = 3
    with torch.no_grad():
        image_kv = model.encode_image(images)
        for pattern in ("bidirectional", "causal", "unimodal"):
            a = model(image_kv=image_kv, input_ids=input_ids, text_mask=text_mask, pattern=pattern)
            b = model(image_kv=image_kv, input_ids=garbage, text_mask=text_mask, pattern=pattern)
            assert torch.allclose(a.query_output, b.query_output, atol=ATOL)
            assert torch.allclose(a.text_output[:, :4], b.text_output[:, :4], atol=ATOL)


def test_image_kv_index_select_equals_recomputing_the_selected_images():
    model = _model()
    images, input_ids = _inputs(model, batch=3)
    index = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        shared = model.encode_image(images).index_select(index)
        fresh = model.encode_image(images[index])
        a = model(image_kv=shared, input_ids=input_ids[[0, 1, 2, 0]])
        b = model(image_kv=fresh, input_ids=input_ids[[0, 1, 2, 0]])
    assert torch.allclose(a.query_output, b.query_output, atol=ATOL)
    assert torch.allclose(a.text_output, b.text_output, atol=ATOL)


def test_text_positions_start_at_zero_and_queries_get_none():
    model = _model()
    input_ids = torch.randint(1, 50, (1, 4))
    expected = model.word_embeddings(input_ids) + model.position_embeddings.weight[:4]
    assert torch.allclose(model.embed_text(input_ids), expected)


def test_attention_runs_through_sdpa(monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    model = _model()
    images, _ = _inputs(model)
    with torch.no_grad():
        model.query_features(images)
    # 3 layers of self-attention + cross-attention in layers 0 and 2
    assert len(calls) == 5


def test_gradients_flow_through_the_cached_query_kv():
    model = _model()
    model.train()
    images, input_ids = _inputs(model)
    image_pass = model(image_kv=model.encode_image(images))
    itg = model(
        input_ids=input_ids, use_queries=False, pattern="causal", past_query_kv=image_pass.query_kv
    )
    itg.text_output.sum().backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    cross = model.layers[0].cross_attention.attention.key.weight.grad
    assert cross is not None and cross.abs().sum() > 0


def test_cross_attention_weights_take_their_own_initializer_range():
    torch.manual_seed(0)
    qformer = QFormer(qformer_preset("tiny", cross_attention_initializer_range=0.1))
    cross = qformer.layers[0].cross_attention.attention.key.weight
    self_attn_weights = [p for n, p in qformer.named_parameters() if "self_attention" in n]
    assert abs(cross.std().item() - 0.1) < 0.01
    assert abs(self_attn_weights[0].std().item() - 0.02) < 0.003
    assert qformer_preset("blip2").cross_attention_initializer_range == 0.02
