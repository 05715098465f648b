"""Weights in and out: transformers BLIP-2 directories, LAVIS .pth files and BERT init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    OPTConfig,
    OPTForCausalLM,
)

from qformer_cli.errors import CheckpointError
from qformer_cli.models.backbones import VisionEncoder
from qformer_cli.models.blip2 import Stage1Model, Stage2Model
from qformer_cli.models.convert import (
    import_state_dict,
    load_external_weights,
    save_transformers_blip2,
    save_transformers_qformer,
)
from qformer_cli.models.qformer import QFormer
from tests.conftest import NUM_QUERIES, TINY_OPT, TINY_QFORMER, TINY_VISION, our_config
from tests.hostile import write_payload

TOLERANCE = 1e-5


def _blip2_config(with_text: bool) -> Blip2Config:
    return Blip2Config(
        vision_config=TINY_VISION,
        qformer_config=dict(TINY_QFORMER, use_qformer_text_input=with_text),
        text_config=TINY_OPT,
        num_query_tokens=NUM_QUERIES,
        image_text_hidden_size=32,
    )


def _our_qformer_config():
    return our_config(TINY_QFORMER, num_query_tokens=NUM_QUERIES, embed_dim=32)


def _vision(hf_model) -> VisionEncoder:
    """Our frozen-encoder wrapper around a copy of the checkpoint's vision tower."""
    tower = Blip2VisionModel(hf_model.config.vision_config)
    tower.load_state_dict(hf_model.vision_model.state_dict())
    return VisionEncoder(tower)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _perturb_layer_norms(model: torch.nn.Module) -> None:
    """Random LayerNorm parameters, so that a LayerNorm loaded into the wrong slot would show."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.1)


# ---- transformers -> ours ----------------------------------------------------------------


def test_conditional_generation_checkpoint_loads_and_matches(tmp_path: Path):
    hf_model = Blip2ForConditionalGeneration(_blip2_config(with_text=False)).eval()
    _perturb_layer_norms(hf_model)
    hf_model.save_pretrained(tmp_path)

    ours = Stage2Model(_our_qformer_config(), llm_hidden_size=TINY_OPT["hidden_size"]).eval()
    report = load_external_weights(ours, tmp_path)
    assert report.missing == [] and report.unexpected == []
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf_model.get_image_features(pixel_values=pixels).pooler_output
        actual = ours.soft_prompt(_vision(hf_model)(pixels))
    assert _max_diff(actual, expected) <= TOLERANCE


def test_retrieval_checkpoint_loads_and_matches_itc_and_itm(tmp_path: Path):
    hf_model = Blip2ForImageTextRetrieval(_blip2_config(with_text=True)).eval()
    _perturb_layer_norms(hf_model)
    hf_model.save_pretrained(tmp_path)
    ours = Stage1Model(_our_qformer_config()).eval()
    report = load_external_weights(ours, tmp_path)
    # transformers has no ITC temperature and no Q-Former LM head: reported, left at init.
    assert sorted(report.missing) == [
        "lm_head.bias",
        "lm_head.dense.bias",
        "lm_head.dense.weight",
        "lm_head.layer_norm.bias",
        "lm_head.layer_norm.weight",
        "temp",
    ]
    assert report.unexpected == []

    pixels = torch.randn(2, 3, 32, 32)
    input_ids = torch.randint(1, TINY_QFORMER["vocab_size"], (2, 6))
    text_mask = torch.ones_like(input_ids)
    text_mask[1, 4:] = 0
    with torch.no_grad():
        itm_expected = hf_model(pixels, input_ids, text_mask, use_image_text_matching_head=True)
        itc_expected = hf_model(pixels, input_ids, text_mask, use_image_text_matching_head=False)
        image_kv = ours.qformer.encode_image(_vision(hf_model)(pixels))
        # ITM: the bidirectional pass, the head on each query, averaged over the queries.
        joint = ours.qformer(image_kv=image_kv, input_ids=input_ids, text_mask=text_mask)
        itm_logits = ours.itm_head(joint.query_output).mean(dim=1)
        # ITC: normalized query embeddings vs the [CLS] text embedding, max over queries.
        image_feats = torch.nn.functional.normalize(
            ours.vision_proj(ours.qformer(image_kv=image_kv).query_output), dim=-1
        )
        text = ours.qformer(
            input_ids=input_ids, text_mask=text_mask, use_queries=False, pattern="unimodal"
        )
        text_feat = torch.nn.functional.normalize(ours.text_proj(text.text_output[:, 0]), dim=-1)
        similarity = torch.einsum("iqd,td->itq", image_feats, text_feat).max(dim=-1).values
    assert _max_diff(itm_logits, itm_expected.logits_per_image) <= TOLERANCE
    assert _max_diff(similarity, itc_expected.logits_per_image) <= TOLERANCE


def test_bare_qformer_directory_loads_into_a_bare_qformer(tmp_path: Path):
    from transformers import Blip2QFormerConfig

    hf_model = Blip2QFormerModel(Blip2QFormerConfig(**TINY_QFORMER)).eval()
    hf_model.save_pretrained(tmp_path)
    ours = QFormer(_our_qformer_config(), with_text=False)
    report = load_external_weights(ours, tmp_path, prefix="qformer.")
    assert sorted(report.missing) == [
        "qformer.ln_vision.bias",
        "qformer.ln_vision.weight",
        "qformer.query_tokens",
    ]
    assert report.unexpected == []
    assert torch.equal(
        ours.layers[0].query_ffn.fc_in.weight,
        hf_model.encoder.layer[0].intermediate_query.dense.weight,
    )


def test_shape_mismatch_is_a_clear_error(tmp_path: Path):
    hf_model = Blip2ForConditionalGeneration(_blip2_config(with_text=False))
    hf_model.save_pretrained(tmp_path)
    wrong = Stage2Model(
        our_config(dict(TINY_QFORMER, intermediate_size=32), num_query_tokens=NUM_QUERIES), 40
    )
    with pytest.raises(CheckpointError, match=r"intermediate_query|query_ffn"):
        load_external_weights(wrong, tmp_path)


# ---- ours -> transformers ----------------------------------------------------------------


@pytest.mark.parametrize("with_text", [False, True])
def test_qformer_round_trip_through_transformers(tmp_path: Path, with_text: bool):
    ours = QFormer(_our_qformer_config(), with_text=with_text).eval()
    _perturb_layer_norms(ours)
    save_transformers_qformer(ours, tmp_path)
    loaded, info = Blip2QFormerModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    images = torch.randn(2, 5, TINY_QFORMER["encoder_hidden_size"])
    with torch.no_grad():
        expected = loaded.eval()(
            query_embeds=ours.query_tokens.expand(2, -1, -1),
            encoder_hidden_states=ours.ln_vision(images),
        ).last_hidden_state
        actual = ours.query_features(images)
    assert _max_diff(actual, expected) <= TOLERANCE


def test_stage2_export_loads_in_transformers_and_matches(tmp_path: Path):
    ours = Stage2Model(_our_qformer_config(), llm_hidden_size=TINY_OPT["hidden_size"]).eval()
    _perturb_layer_norms(ours)
    vision = VisionEncoder(Blip2VisionModel(Blip2VisionConfig(**TINY_VISION)))
    opt_sizes = {k: v for k, v in TINY_OPT.items() if k != "model_type"}
    llm = OPTForCausalLM(OPTConfig(**opt_sizes))
    save_transformers_blip2(ours, vision.model, tmp_path, language_model=llm)
    loaded, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.eval().get_image_features(pixel_values=pixels).pooler_output
        actual = ours.soft_prompt(vision(pixels))
    assert _max_diff(actual, expected) <= TOLERANCE


def test_stage1_export_loads_in_transformers(tmp_path: Path):
    ours = Stage1Model(_our_qformer_config()).eval()
    vision = VisionEncoder(Blip2VisionModel(Blip2VisionConfig(**TINY_VISION)))
    save_transformers_blip2(ours, vision.model, tmp_path)
    loaded, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.itm_head.weight, ours.itm_head.weight)
    assert torch.equal(
        loaded.embeddings.word_embeddings.weight, ours.qformer.word_embeddings.weight
    )


def test_export_refuses_a_non_blip2_vision_tower(tmp_path: Path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    with pytest.raises(CheckpointError, match="Blip2VisionModel"):
        save_transformers_blip2(Stage1Model(_our_qformer_config()), clip, tmp_path)


# ---- LAVIS ---------------------------------------------------------------------------------


def _lavis_name(hf_name: str) -> str:
    """LAVIS names for a transformers retrieval checkpoint, written out independently here."""
    replacements = [
        ("vision_model.post_layernorm.", "ln_vision."),
        ("embeddings.word_embeddings.", "Qformer.bert.embeddings.word_embeddings."),
        ("embeddings.position_embeddings.", "Qformer.bert.embeddings.position_embeddings."),
        ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
        ("qformer.encoder.layer.", "Qformer.bert.encoder.layer."),
        (".attention.attention.", ".attention.self."),
        (".crossattention.attention.", ".crossattention.self."),
        ("vision_projection.", "vision_proj."),
        ("text_projection.", "text_proj."),
    ]
    for old, new in replacements:
        if old in hf_name:
            hf_name = hf_name.replace(old, new)
    return hf_name


def _lavis_checkpoint(hf_model: Blip2ForImageTextRetrieval, path: Path) -> dict:
    state = {
        _lavis_name(k): v
        for k, v in hf_model.state_dict().items()
        if not k.startswith("vision_model.") or k.startswith("vision_model.post_layernorm.")
    }
    vocab, hidden = state["Qformer.bert.embeddings.word_embeddings.weight"].shape
    state["temp"] = torch.tensor(0.05)
    state["Qformer.cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden)
    state["Qformer.cls.predictions.transform.dense.bias"] = torch.randn(hidden)
    state["Qformer.cls.predictions.transform.LayerNorm.weight"] = torch.rand(hidden)
    state["Qformer.cls.predictions.transform.LayerNorm.bias"] = torch.randn(hidden)
    state["Qformer.cls.predictions.bias"] = torch.randn(vocab)
    state["Qformer.cls.predictions.decoder.weight"] = state[
        "Qformer.bert.embeddings.word_embeddings.weight"
    ]
    state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    torch.save({"model": state}, path)
    return state


def test_lavis_checkpoint_loads_every_tensor(tmp_path: Path):
    hf_model = Blip2ForImageTextRetrieval(_blip2_config(with_text=True)).eval()
    state = _lavis_checkpoint(hf_model, tmp_path / "blip2_stage1.pth")
    ours = Stage1Model(_our_qformer_config()).eval()
    report = load_external_weights(ours, tmp_path / "blip2_stage1.pth")
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == [
        "Qformer.cls.predictions.decoder.bias",
        "Qformer.cls.predictions.decoder.weight",
    ]
    assert ours.temp.item() == pytest.approx(0.05)
    assert torch.equal(ours.lm_head.bias, state["Qformer.cls.predictions.bias"])
    assert torch.equal(
        ours.qformer.layers[2].cross_attention.attention.value.weight,
        hf_model.qformer.encoder.layer[2].crossattention.attention.value.weight,
    )


def test_lavis_stage2_projection_and_unknown_keys_are_reported(tmp_path: Path):
    ours = Stage2Model(_our_qformer_config(), llm_hidden_size=40)
    state = {
        "query_tokens": torch.randn(1, NUM_QUERIES, 64),
        "t5_proj.weight": torch.randn(40, 64),
        "t5_proj.bias": torch.randn(40),
        "some_new_head.weight": torch.randn(3),
    }
    torch.save({"model": state}, tmp_path / "stage2.pth")
    report = load_external_weights(ours, tmp_path / "stage2.pth")
    assert torch.equal(ours.llm_proj.weight, state["t5_proj.weight"])
    assert report.unexpected == ["some_new_head.weight"]
    assert "qformer.layers.0.query_ffn.fc_in.weight" in report.missing


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = write_payload(tmp_path / "evil.pth", marker, torch_zip=False)
    with pytest.raises(CheckpointError, match="refused"):
        load_external_weights(Stage2Model(_our_qformer_config(), 40), evil)
    assert not marker.exists()


# ---- BERT init -----------------------------------------------------------------------------


def test_bert_init_copies_embeddings_attention_and_ffn_into_both_ffns(tmp_path: Path):
    bert_config = BertConfig(
        vocab_size=TINY_QFORMER["vocab_size"] - 1,  # BLIP-2 adds [DEC] on top of BERT's vocabulary
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
    )
    bert = BertForMaskedLM(bert_config).eval()
    _perturb_layer_norms(bert)
    with torch.no_grad():
        bert.bert.embeddings.token_type_embeddings.weight.zero_()  # BLIP-2 has no token types
    bert.save_pretrained(tmp_path)

    ours = Stage1Model(_our_qformer_config()).eval()
    report = load_external_weights(ours, tmp_path)
    assert report.unexpected == []
    assert "bert.embeddings.token_type_embeddings.weight" in report.ignored
    assert report.resized == [
        "qformer.word_embeddings.weight (98, 64)->(99, 64)",
        "lm_head.bias (98,)->(99,)",
    ]
    missing = set(report.missing)
    assert {
        "qformer.query_tokens",
        "qformer.layers.0.cross_attention.attention.key.weight",
    } <= missing
    assert not any("ffn" in name or "self_attention" in name for name in missing)
    layer = ours.qformer.layers[1]
    assert torch.equal(layer.query_ffn.fc_in.weight, layer.text_ffn.fc_in.weight)
    assert torch.equal(
        layer.query_ffn.fc_in.weight, bert.bert.encoder.layer[1].intermediate.dense.weight
    )

    # A text-only pass is BERT itself; the ITG head is BERT's MLM head (vocabulary minus [DEC]).
    input_ids = torch.randint(1, bert_config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = bert(input_ids=input_ids, output_hidden_states=True)
        text = ours.qformer(input_ids=input_ids, use_queries=False, pattern="unimodal").text_output
        logits = ours.lm_logits(text)
    assert _max_diff(text, expected.hidden_states[-1]) <= TOLERANCE
    assert _max_diff(logits[..., : bert_config.vocab_size], expected.logits) <= 1e-4


def test_missing_and_unknown_formats_are_clear(tmp_path: Path):
    model = Stage2Model(_our_qformer_config(), 40)
    with pytest.raises(CheckpointError, match="no such file"):
        load_external_weights(model, tmp_path / "absent.pth.tar")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown weight format"):
        load_external_weights(model, tmp_path / "weights.npz")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_external_weights(model, tmp_path / "broken")
    with pytest.raises(CheckpointError):
        import_state_dict(model, {"query_tokens": torch.zeros(1, 3, 64)}, "lavis")
