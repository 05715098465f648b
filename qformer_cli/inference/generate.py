"""Batched captioning and question answering with a stage-2 model.

The soft visual prompt is placed before the text prompt and the frozen LLM generates with
transformers' ``generate`` (KV cache, beam search, sampling). Decoder-only LLMs stop at the
newline BLIP-2 trains them to end captions with, or at EOS; prompts of different lengths are
left-padded (pads between the soft prompt and the text, masked out).
"""

from __future__ import annotations

from typing import Any

import torch

from qformer_cli.config import GenerationConfig
from qformer_cli.errors import UsageError
from qformer_cli.models.backbones import LanguageModel
from qformer_cli.models.blip2 import Stage2Model, soft_prompt_inputs


def stop_token_ids(tokenizer, model_ends: list[int] | tuple[int, ...] = ()) -> list[int]:
    """EOS, ``model_ends`` and the newline token (BLIP-2 ends every training caption with
    "\\n"), once each."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    return list(dict.fromkeys([*ids, *model_ends, *newline[-1:]]))


def generation_stop_ids(llm: LanguageModel, tokenizer) -> list[int]:
    """The token ids generation stops at. Decoder-only LLMs: the tokenizer's EOS, every end
    token of the model's ``generation_config`` (chat models end turns with their own: Llama 3's
    ``<|eot_id|>``, Qwen2's ``<|im_end|>``) and newline (BLIP-2's caption ending).
    Encoder-decoder ones: the model's own ``eos_token_id`` (T5 never emits a newline token: its
    tokenizer has none)."""
    eos = llm.model.generation_config.eos_token_id
    model_ends = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    if llm.family == "decoder-only":
        return stop_token_ids(tokenizer, model_ends)
    tokenizer_eos = tokenizer.eos_token_id
    return model_ends or ([tokenizer_eos] if tokenizer_eos is not None else [])


@torch.no_grad()
def generate_text(
    bridge: Stage2Model,
    llm: LanguageModel,
    tokenizer,
    image_embeds: torch.Tensor,
    prompts: list[str],
    settings: GenerationConfig,
    qformer_tokenizer=None,
) -> list[str]:
    """One generated text per image (B, N, C) for the given text prompts (B strings). An
    instruction-aware Q-Former (InstructBLIP) reads each prompt too, tokenized by
    ``qformer_tokenizer``, as the LLM does."""
    soft_prompt = instructed_soft_prompt(bridge, image_embeds, prompts, qformer_tokenizer)
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, padding="longest", return_tensors="pt").to(soft_prompt.device)
    embeds, mask = soft_prompt_inputs(
        llm.model, soft_prompt, encoded["input_ids"], encoded["attention_mask"]
    )
    options = {
        "num_beams": settings.num_beams,
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "length_penalty": settings.length_penalty,
        "repetition_penalty": settings.repetition_penalty,
        "do_sample": settings.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": generation_stop_ids(llm, tokenizer),
    }
    if settings.do_sample:
        options.update(top_p=settings.top_p, temperature=settings.temperature)
    with torch.random.fork_rng(enabled=settings.do_sample and settings.seed is not None):
        if settings.do_sample and settings.seed is not None:
            torch.manual_seed(settings.seed)  # this batch's draws only: the caller's RNG is kept
        output = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **options)
    return decode_until_stop(tokenizer, output, options["eos_token_id"])


def encode_instructions(
    qformer_tokenizer: Any, prompts: list[str], max_length: int, tensors: str
) -> Any:
    """The prompts in the Q-Former's vocabulary, right-padded to the longest and cut at the
    Q-Former's positions (as LAVIS's InstructBLIP truncates; it: 128 tokens); ``tensors``:
    "pt" or "np"."""
    qformer_tokenizer.padding_side = "right"
    return qformer_tokenizer(
        prompts, padding="longest", truncation=True, max_length=max_length, return_tensors=tensors
    )


def instructed_soft_prompt(
    bridge: Stage2Model, image_embeds: torch.Tensor, prompts: list[str], qformer_tokenizer
) -> torch.Tensor:
    """The soft prompt (B, Q, D); an instruction-aware bridge also reads the prompts."""
    if not bridge.instruction_aware:
        return bridge.soft_prompt(image_embeds)
    if qformer_tokenizer is None:
        raise UsageError("an instruction-aware Q-Former needs its tokenizer (qformer_tokenizer/)")
    encoded = encode_instructions(
        qformer_tokenizer, prompts, bridge.config.max_position_embeddings, "pt"
    ).to(image_embeds.device)
    return bridge.soft_prompt(image_embeds, encoded["input_ids"], encoded["attention_mask"])


def decode_until_stop(tokenizer, sequences: Any, stop_ids: list[int]) -> list[str]:
    """Each generated sequence (rows of token ids, torch or numpy) decoded up to its first stop
    token: a chat model's end token that its tokenizer does not mark special is not text."""
    texts = []
    for row in sequences.tolist():
        ends = [index for index, token in enumerate(row) if token in stop_ids]
        kept = row[: ends[0]] if ends else row
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts
