"""Stage 2: the soft prompt, label masking for both LLM families, and the prefix-LM split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from qformer_cli.data import sample_backbone_dir
from qformer_cli.models.backbones import LanguageModel
from qformer_cli.models.blip2 import Stage2Model
from qformer_cli.models.config import qformer_preset
from qformer_cli.train.stage2 import Stage2Batch, Stage2Objective, split_for_prefix_lm


def _opt(vocab: int) -> LanguageModel:
    config = OPTConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
        word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0,
    )  # fmt: skip
    return LanguageModel(OPTForCausalLM(config).eval().requires_grad_(False), "decoder-only")


def _bridge(width: int) -> Stage2Model:
    return Stage2Model(qformer_preset("tiny", num_layers=2, hidden_dropout=0.0), width).eval()


def test_decoder_only_loss_masks_queries_prompt_and_padding():
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    llm, bridge = _opt(len(tokenizer)), _bridge(32)
    objective = Stage2Objective(bridge, llm, tokenizer, max_text_len=32)
    captions = ["a red circle", "two blue squares on the left"]
    images = torch.randn(2, 9, 128)
    loss = objective(Stage2Batch.captions(images, captions, "a photo of")).total

    # Worked out independently: score only the caption tokens and the final newline.
    with torch.no_grad():
        prompt = bridge.soft_prompt(images)  # (2, Q, 32)
    total, count = 0.0, 0
    for row, caption in enumerate(captions):
        prompt_ids = tokenizer("a photo of").input_ids
        full_ids = tokenizer(f"a photo of {caption}\n").input_ids
        assert full_ids[: len(prompt_ids)] == prompt_ids
        embeds = torch.cat([prompt[row], llm.model.get_input_embeddings()(torch.tensor(full_ids))])
        logits = llm.model(inputs_embeds=embeds[None]).logits[0]
        queries = prompt.shape[1]
        for position in range(len(prompt_ids), len(full_ids)):
            target = full_ids[position]
            total += F.cross_entropy(logits[queries + position - 1][None], torch.tensor([target]))
            count += 1
    assert loss.item() == pytest.approx(float(total) / count, rel=1e-4)


def test_gradients_reach_the_bridge_but_not_the_llm():
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    llm, bridge = _opt(len(tokenizer)), _bridge(32)
    objective = Stage2Objective(bridge, llm, tokenizer, max_text_len=16)
    objective.train()
    assert not llm.model.training  # the frozen LLM stays in eval mode (no dropout)
    objective(
        Stage2Batch.captions(torch.randn(2, 9, 128), ["a red circle", "a cat"], "")
    ).total.backward()
    assert bridge.llm_proj.weight.grad is not None
    assert bridge.qformer.query_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.model.parameters())


def test_an_instruction_aware_bridge_learns_from_the_prompt_it_reads():
    """model.instruction_aware: the prompt's Q-Former tokens get gradients (they were read
    beside the queries), and two prompts give two soft prompts for the same image."""
    from qformer_cli.models.backbones import load_qformer_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    qformer_tokenizer = load_qformer_tokenizer(str(sample_backbone_dir("bert")))
    config = qformer_preset("tiny", num_layers=2, hidden_dropout=0.0)
    config = config.fitted_to_backbones(encoder_width=128, vocab_size=len(qformer_tokenizer))
    bridge = Stage2Model(config, 32, instruction_aware=True)
    objective = Stage2Objective(
        bridge, _opt(len(tokenizer)), tokenizer, max_text_len=16,
        qformer_tokenizer=qformer_tokenizer,
    )  # fmt: skip
    images = torch.randn(2, 9, 128)
    batch = Stage2Batch(images, ["what colour is the circle?", "a photo of"], ["red", "a cat"],
                        [False, True])  # fmt: skip
    objective(batch).total.backward()
    read = qformer_tokenizer("what colour is the circle?").input_ids
    grads = bridge.qformer.word_embeddings.weight.grad
    assert all(grads[token].abs().sum() > 0 for token in read)
    with torch.no_grad():
        ids = qformer_tokenizer(["a photo of", "what colour?"], padding=True, return_tensors="pt")
        prompts = bridge.soft_prompt(
            images[:1].expand(2, -1, -1), ids.input_ids, ids.attention_mask
        )
    assert not torch.allclose(prompts[0], prompts[1])


def test_encoder_decoder_loss_predicts_the_suffix():
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("t5"))
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    llm = LanguageModel(T5ForConditionalGeneration(config).eval(), "encoder-decoder")
    bridge = _bridge(32)
    generator = torch.Generator().manual_seed(0)
    objective = Stage2Objective(bridge, llm, tokenizer, max_text_len=16, generator=generator)
    caption = "a small red circle above a blue square"
    images = torch.randn(1, 9, 128)
    loss = objective(Stage2Batch.captions(images, [caption], "")).total

    # Independently: the same split, the encoder sees [soft prompt; prefix], the decoder is
    # teacher-forced on the suffix (shifted right from the start token) and scored on it.
    prefix, suffix = split_for_prefix_lm(caption, torch.Generator().manual_seed(0))
    target = tokenizer(suffix).input_ids  # ends with </s>
    with torch.no_grad():
        soft_prompt = bridge.soft_prompt(images)[0]
        prefix_ids = torch.tensor(tokenizer(prefix).input_ids)
        encoder_embeds = torch.cat([soft_prompt, llm.model.get_input_embeddings()(prefix_ids)])
        decoder_ids = torch.tensor([[config.decoder_start_token_id, *target[:-1]]])
        logits = llm.model(inputs_embeds=encoder_embeds[None], decoder_input_ids=decoder_ids).logits
    expected = F.cross_entropy(logits[0], torch.tensor(target))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_prefix_split_keeps_every_word_and_a_nonempty_suffix(seed: int):
    caption = "a small red circle above a blue square"
    prefix, suffix = split_for_prefix_lm(caption, torch.Generator().manual_seed(seed))
    assert suffix
    assert f"{prefix} {suffix}".strip() == caption


def test_one_word_caption_is_all_suffix():
    assert split_for_prefix_lm("circle", torch.Generator()) == ("", "circle")


def test_a_vqa_pair_learns_only_the_answer():
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    llm, bridge = _opt(len(tokenizer)), _bridge(32)
    objective = Stage2Objective(bridge, llm, tokenizer, max_text_len=32)
    images = torch.randn(1, 9, 128)
    question = "Question: what color is the circle? Answer:"
    batch = Stage2Batch(images, [question], ["red"], [False])
    loss = objective(batch).total
    with torch.no_grad():
        prompt = bridge.soft_prompt(images)[0]
        prompt_ids = tokenizer(question).input_ids
        full_ids = tokenizer(f"{question} red\n").input_ids
        embeds = torch.cat([prompt, llm.model.get_input_embeddings()(torch.tensor(full_ids))])
        logits = llm.model(inputs_embeds=embeds[None]).logits[0]
    queries = prompt.shape[0]
    positions = range(len(prompt_ids), len(full_ids))  # " red" and the newline
    expected = sum(
        F.cross_entropy(logits[queries + p - 1][None], torch.tensor([full_ids[p]]))
        for p in positions
    ) / len(positions)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
