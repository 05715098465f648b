"""``qformer info``: sizes, FLOPs and memory of a configuration, built on the meta device.

Nothing is allocated and nothing is downloaded when the backbone shapes are given inline in the
config (``model.vision.config`` / ``model.llm.config``) or the backbone directory is local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qformer_cli.config import ModelConfig
from qformer_cli.flops import count_flops
from qformer_cli.models.backbones import (
    LanguageModel,
    VisionEncoder,
    build_language_model,
    build_vision_encoder,
)
from qformer_cli.models.blip2 import Stage1Model, Stage2Model

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}
# AdamW training of a trainable parameter: fp32 master weight + fp32 grad + two fp32 moments.
TRAIN_BYTES_PER_TRAINABLE = 16
TEXT_TOKENS = 32  # text length assumed for the per-sample FLOP figures (BLIP-2's max_txt_len)


def count(module: nn.Module | nn.Parameter) -> int:
    if isinstance(module, nn.Parameter):
        return module.numel()
    return sum(p.numel() for p in module.parameters())


@dataclass
class MetaModels:
    stage1: Stage1Model
    stage2: Stage2Model
    vision: VisionEncoder
    llm: LanguageModel


def build_meta_models(config: ModelConfig) -> MetaModels:
    vision = build_vision_encoder(config.vision, meta=True)
    llm = build_language_model(config.llm, meta=True)
    qformer_config = config.qformer_config().fitted_to_backbones(encoder_width=vision.hidden_size)
    with torch.device("meta"):
        stage1 = Stage1Model(qformer_config)
        stage2 = Stage2Model(
            qformer_config, llm.embedding_dim, instruction_aware=config.instruction_aware
        )
    return MetaModels(stage1, stage2, vision, llm)


def parameter_table(models: MetaModels) -> dict[str, dict[str, int]]:
    """Parameters per component, each marked trainable or frozen."""
    qformer = models.stage1.qformer
    bare = count(qformer.embed_layer_norm) + sum(
        count(layer) - (count(layer.text_ffn) if layer.text_ffn is not None else 0)
        for layer in qformer.layers
    )
    text_parts = (
        count(qformer.word_embeddings)
        + count(qformer.position_embeddings)
        + sum(count(layer.text_ffn) for layer in qformer.layers if layer.text_ffn is not None)
    )
    heads = models.stage1
    components = {
        "vision_encoder": (count(models.vision), False),
        "ln_vision": (count(qformer.ln_vision), True),
        "query_tokens": (count(qformer.query_tokens), True),
        "qformer_encoder": (bare, True),
        "qformer_text_parts (stage 1)": (text_parts, True),
        "itc_itm_heads (stage 1)": (
            count(heads.vision_proj) + count(heads.text_proj) + count(heads.itm_head) + 1,
            True,
        ),
        "lm_head (stage 1, decoder tied)": (count(heads.lm_head), True),
        "llm_projection (stage 2)": (count(models.stage2.llm_proj), True),
        "llm": (count(models.llm.model), False),
    }
    return {
        name: {"parameters": n, "trainable": n if trainable else 0, "frozen": 0 if trainable else n}
        for name, (n, trainable) in components.items()
    }


def stage_totals(models: MetaModels) -> dict[str, dict[str, int]]:
    vision, llm = count(models.vision), count(models.llm.model)
    return {
        "stage1": {"trainable": count(models.stage1), "frozen": vision},
        "stage2": {"trainable": count(models.stage2), "frozen": vision + llm},
    }


def _flops(fn: Any) -> int:
    return int(count_flops(fn)[0])


def forward_flops(models: MetaModels, image_size: int) -> dict[str, int]:
    """Forward FLOPs for one sample, per component (multiply-add = 2 FLOPs)."""
    with torch.device("meta"):
        pixels = torch.empty(1, 3, image_size, image_size)
        image_embeds = models.vision(pixels)  # (1, N, C)
        text_ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long)
        prompt = torch.empty(1, models.stage1.config.num_query_tokens, models.llm.embedding_dim)
        text_embeds = torch.empty(1, TEXT_TOKENS, models.llm.embedding_dim)
        # an instruction-aware Q-Former also reads a prompt (TEXT_TOKENS of it)
        instruction = (
            (text_ids, torch.ones_like(text_ids)) if models.stage2.instruction_aware else ()
        )

        def stage1_qformer() -> None:
            qformer = models.stage1.qformer
            image_kv = qformer.encode_image(image_embeds)
            image_pass = qformer(image_kv=image_kv)  # ITC image side (+ ITG's cached queries)
            qformer(input_ids=text_ids, use_queries=False, pattern="unimodal")  # ITC text side
            pairs = image_kv.index_select(torch.zeros(3, dtype=torch.long))  # ITM: 3 pairs
            qformer(image_kv=pairs, input_ids=text_ids.expand(3, -1), pattern="bidirectional")
            itg = qformer(
                input_ids=text_ids,
                use_queries=False,
                pattern="causal",
                past_query_kv=image_pass.query_kv,
            )
            models.stage1.lm_logits(itg.text_output)

        def llm_forward() -> None:
            inputs = torch.cat([prompt, text_embeds], dim=1)
            if models.llm.family == "encoder-decoder":
                models.llm.model(inputs_embeds=inputs, decoder_input_ids=text_ids)
            else:
                models.llm.model(inputs_embeds=inputs)

        return {
            "vision_encoder": _flops(lambda: models.vision(pixels)),
            "qformer_queries (stage 2 / inference)": _flops(
                lambda: models.stage2.soft_prompt(image_embeds, *instruction)
            ),
            "qformer_stage1_objectives (ITC+ITM+ITG passes)": _flops(stage1_qformer),
            f"llm (32 queries + {TEXT_TOKENS} text tokens)": _flops(llm_forward),
            "image_tokens": int(image_embeds.shape[1]),
        }


def memory_estimate(totals: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Bytes for weights, gradients and AdamW state (activations excluded), per precision.

    Frozen backbones are held in the given precision; the trainable Q-Former keeps fp32 master
    weights (autocast computes in bf16/fp16), as BLIP-2 needs for a stable Q-Former.
    """
    estimate = {}
    for precision, nbytes in BYTES_PER_PARAM.items():
        s1, s2 = totals["stage1"], totals["stage2"]
        estimate[precision] = {
            "inference": s2["frozen"] * nbytes + s2["trainable"] * 4,
            "stage1_training": s1["frozen"] * nbytes + s1["trainable"] * TRAIN_BYTES_PER_TRAINABLE,
            "stage2_training": s2["frozen"] * nbytes + s2["trainable"] * TRAIN_BYTES_PER_TRAINABLE,
        }
    return estimate


def image_size_of(models: MetaModels) -> int:
    config = models.vision.model.config
    size = getattr(config, "image_size", 224)
    return size if isinstance(size, int) else int(size[0])


def describe(config: ModelConfig) -> dict[str, Any]:
    """Everything ``qformer info`` reports, as a JSON-ready dict."""
    models = build_meta_models(config)
    totals = stage_totals(models)
    return {
        "preset": config.preset,
        "qformer": vars(models.stage1.config).copy(),
        "vision_model": config.vision.model or config.vision.config.get("model_type", ""),
        "llm": config.llm.model or config.llm.config.get("model_type", ""),
        "llm_family": models.llm.family,
        "parameters": parameter_table(models),
        "totals": totals,
        "forward_flops_per_sample": forward_flops(models, image_size_of(models)),
        "memory_bytes": memory_estimate(totals),
    }
