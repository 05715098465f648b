"""Export a trained model as ONNX graphs that onnxruntime runs end to end, with a parity check.

Stage 2 (caption / VQA); all graphs have dynamic batch and sequence axes:

- ``vision_qformer.onnx``: pixel_values (B, 3, H, W) -> soft_prompt (B, Q, D), i.e. the frozen
  vision encoder, the Q-Former and the projection into the LLM's embedding space; for an
  instruction-aware Q-Former (InstructBLIP) also instruction_ids + instruction_mask (B, T), the
  prompt in the Q-Former's vocabulary (``qformer_tokenizer/``), right-padded;
- decoder-only LLMs (OPT, ...):

  - ``llm_prefill.onnx``: inputs_embeds (B, S, D) + attention_mask (B, S) -> logits (B, S, V)
    and ``present.N.key`` / ``present.N.value`` per layer, (B, heads, S, head_dim) each;
  - ``llm_decode.onnx``: inputs_embeds (B, 1, D) + attention_mask (B, P + 1) + ``past.N.key`` /
    ``past.N.value`` (B, heads, P, head_dim) -> logits (B, 1, V) and the presents
    (B, heads, P + 1, head_dim);

- encoder-decoder LLMs (T5 / FlanT5):

  - ``llm_encoder.onnx``: inputs_embeds (B, S, D) + attention_mask (B, S) ->
    encoder_hidden_states (B, S, D);
  - ``llm_prefill.onnx`` (the first decoder step): inputs_embeds (B, T, D) of the decoder tokens
    (the start token) + encoder_hidden_states (B, S, D) + encoder_attention_mask (B, S) ->
    logits (B, T, V), the self-attention presents (B, heads, T, head_dim) and the cross-attention
    ``cross.N.key`` / ``cross.N.value`` (B, heads, S, head_dim) per layer;
  - ``llm_decode.onnx``: inputs_embeds (B, 1, D) + encoder_attention_mask (B, S) + the self
    pasts (B, heads, P, head_dim) + the cross pairs -> logits (B, 1, V) and the self presents
    (B, heads, P + 1, head_dim).

  The cross-attention K/V depend on the encoder states only, so the prefill graph computes them
  once and every decode step takes them as inputs unchanged (they are not recomputed, and the
  decode graph has no encoder_hidden_states input);

- ``embed_tokens.npy``: the LLM's input embedding matrix (V, D), so the runtime embeds prompt
  tokens (and an encoder-decoder LLM's decoder tokens: T5 shares one table) without a graph.

Stage 1 (retrieval):

- ``vision_itc.onnx``: pixel_values (B, 3, H, W) -> image_embeds (B, Q, E): frozen vision
  encoder, Q-Former, vision_proj, L2-normalized (``Stage1Model.image_feats``);
- ``text_itc.onnx``: input_ids + attention_mask (B, T) -> text_embeds (B, E), the normalized
  [CLS] projection (``Stage1Model.text_feat``). An image-text similarity is the max
  over the Q queries of the dot products.

``manifest.json`` describes all of them. After writing, every graph is run with onnxruntime on
fresh random inputs at two batch sizes (and sequence lengths other than the traced ones) and
compared with the PyTorch modules it came from.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from qformer_cli.config import GenerationConfig
from qformer_cli.data.transforms import ImageTransformConfig, image_processor_settings
from qformer_cli.errors import QformerError, UsageError
from qformer_cli.eval.retrieval import RETRIEVAL_MAX_TEXT_LEN
from qformer_cli.inference.generate import generation_stop_ids
from qformer_cli.pretrained import Stage1Pipeline, Stage2Pipeline

# int8: dynamic quantization (int8 weights, activations quantized per run; float32 in and out)
Precision = Literal["fp32", "fp16", "int8"]

MANIFEST = "manifest.json"
VISION_GRAPH = "vision_qformer.onnx"
ENCODER_GRAPH = "llm_encoder.onnx"
PREFILL_GRAPH = "llm_prefill.onnx"
DECODE_GRAPH = "llm_decode.onnx"
VISION_ITC_GRAPH = "vision_itc.onnx"
TEXT_ITC_GRAPH = "text_itc.onnx"
EMBEDDINGS = "embed_tokens.npy"
TOKENIZER_DIR = "tokenizer"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # an instruction-aware Q-Former's
IMAGE_PROCESSOR = "preprocessor_config.json"

# Parity tolerance, relative to each output's scale max(1, max |PyTorch value|): an fp16 output
# carries about three significant digits, so logits of magnitude 20 are spaced 0.016 apart
# in fp16 and no absolute 1e-2 could hold for them.
# int8 rounds each weight matmul's weights and inputs to 256 levels, so its outputs carry about
# two significant digits (the demo's model: 1.9e-2 of the scale at most, 2026-12-01).
TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-1}
PARITY_BATCH_SIZES = (1, 3)
# the graphs' float inputs and outputs (and the embedding table) per precision
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.float32,
}


@dataclass(frozen=True)
class Sizes:
    """Sequence lengths of random graph inputs."""

    sequence: int  # prompt / encoder input / text tokens
    past: int  # decode: tokens already in the self-attention cache
    decoder: int  # encoder-decoder prefill: decoder tokens


# Graphs are traced at one batch size and set of lengths and checked at others (including the
# lengths the runtime uses: one decoder start token), so that any size baked into a graph shows
# up as a parity failure.
TRACE_BATCH = 2
TRACE_SIZES = Sizes(sequence=5, past=4, decoder=2)
PARITY_SIZES = Sizes(sequence=7, past=6, decoder=1)

RandomInputs = Callable[[int, Sizes, torch.Generator], tuple[torch.Tensor, ...]]


@dataclass
class GraphSpec:
    """One graph to write: the module traced, its input/output names and dynamic axes, and how
    to make random inputs for it (float tensors fp32, masks and ids int64)."""

    file: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    random_inputs: RandomInputs

    def __post_init__(self) -> None:
        # A wrapper module starts in training mode; the exporter restores the mode it found,
        # which would otherwise switch the wrapped models to training after the trace.
        self.module.eval()

    @property
    def name(self) -> str:
        return self.file.removesuffix(".onnx")


class KvShape(NamedTuple):
    layers: int
    heads: int
    head_dim: int


# ---------------------------------------------------------------------------------------------
# Modules traced into the graphs
# ---------------------------------------------------------------------------------------------


class VisionQFormer(nn.Module):
    """Pixels (B, 3, H, W) -> frozen vision features (B, N, C) -> soft prompt (B, Q, D)."""

    def __init__(self, pipeline: Stage2Pipeline) -> None:
        super().__init__()
        self.vision = pipeline.vision
        self.bridge = pipeline.bridge

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values)
        # generate_for_samples feeds the bridge the vision features cast to its own dtype.
        features = features.to(next(self.bridge.parameters()).dtype)
        return self.bridge.soft_prompt(features)


class InstructedVisionQFormer(VisionQFormer):
    """An instruction-aware Q-Former's graph: pixels (B, 3, H, W) and the instruction's Q-Former
    tokens (B, T), right-padded, with their mask (B, T) -> soft prompt (B, Q, D)."""

    def forward(  # type: ignore[override]
        self,
        pixel_values: torch.Tensor,
        instruction_ids: torch.Tensor,
        instruction_mask: torch.Tensor,
    ) -> torch.Tensor:
        features = self.vision(pixel_values).to(next(self.bridge.parameters()).dtype)
        return self.bridge.soft_prompt(features, instruction_ids, instruction_mask)


class VisionITC(nn.Module):
    """Pixels (B, 3, H, W) -> normalized ITC image embeddings (B, Q, E), as retrieval does."""

    def __init__(self, pipeline: Stage1Pipeline) -> None:
        super().__init__()
        self.vision = pipeline.vision
        self.model = pipeline.model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # load_retrieval_set keeps the frozen features in fp32.
        return self.model.image_feats(self.vision(pixel_values).float())


class TextITC(nn.Module):
    """Token ids and mask (B, T) -> normalized ITC text embedding (B, E)."""

    def __init__(self, pipeline: Stage1Pipeline) -> None:
        super().__init__()
        self.model = pipeline.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_feat(input_ids, attention_mask)


def _cache_argument(model: nn.Module) -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache`` in the model forwards.
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``key_0, value_0, key_1, ...`` -> ``[(key_0, value_0), ...]``."""
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


def _flat(cache: Any) -> list[torch.Tensor]:
    """A transformers ``DynamicCache`` -> ``[key_0, value_0, key_1, ...]``."""
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


class DecoderStep(nn.Module):
    """A decoder-only LLM with its KV cache as flat tensors, for tracing.

    ``forward(inputs_embeds (B, S, D), attention_mask (B, P + S), *past)`` where ``past`` is
    ``key_0, value_0, key_1, value_1, ...`` of shape (B, heads, P, head_dim) (none for prefill)
    returns ``(logits (B, S, V), key_0, value_0, ...)``, the presents (B, heads, P + S, head_dim).
    """

    pairs_per_layer = 1  # prefill outputs: one self-attention pair per layer

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache_argument = _cache_argument(model)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=_pairs(past) or None, config=self.model.config)
        # Positions as transformers' generate makes them from a left-padded mask: count only the
        # real tokens, pads get 0; keep the last S (the new tokens). Passing them explicitly keeps
        # LLMs whose own default is arange(P, P + S) in step with generate.
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 0)
        positions = positions[:, -inputs_embeds.shape[1] :]
        output = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        return (output.logits, *_flat(cache))


class LlmEncoder(nn.Module):
    """An encoder-decoder LLM's encoder: inputs_embeds (B, S, D) + mask (B, S) -> (B, S, D)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask)[0]


class EncoderDecoderStep(nn.Module):
    """An encoder-decoder LLM's decoder with its caches as flat tensors, for tracing.

    First step (``first=True``): ``forward(inputs_embeds (B, T, D), encoder_hidden_states
    (B, S, D), encoder_attention_mask (B, S))`` -> ``(logits (B, T, V), *self presents, *cross)``
    with the self presents (B, heads, T, head_dim) and the cross-attention K/V (B, heads, S,
    head_dim) as ``key_0, value_0, ...``.

    Later steps: ``forward(inputs_embeds (B, 1, D), encoder_attention_mask (B, S), *self past
    (B, heads, P, head_dim), *cross)`` -> ``(logits (B, 1, V), *self presents (P + 1))``.
    """

    pairs_per_layer = 2  # first-step outputs: a self-attention and a cross-attention pair

    def __init__(self, model: nn.Module, *, first: bool) -> None:
        super().__init__()
        self.model = model
        self.first = first
        self.cache_argument = _cache_argument(model)

    def forward(self, inputs_embeds: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor]:
        from transformers import DynamicCache, EncoderDecoderCache

        config = self.model.config
        if self.first:
            encoder_states, encoder_mask = tensors
            self_cache, cross_cache = DynamicCache(config=config), DynamicCache(config=config)
        else:
            encoder_mask, *past = tensors
            half = len(past) // 2
            self_cache = DynamicCache(ddp_cache_data=_pairs(tuple(past[:half])), config=config)
            cross_cache = DynamicCache(ddp_cache_data=_pairs(tuple(past[half:])), config=config)
            # The decoder runs cross-attention only when given encoder states; with the cross
            # K/V cached it reads nothing from them but their shape (B, S, D).
            batch, _, dim = inputs_embeds.shape
            encoder_states = inputs_embeds.new_zeros(batch, past[half].shape[2], dim)
        # A non-empty cross cache marks its layers as computed: they are reused, not recomputed.
        cache = EncoderDecoderCache(self_cache, cross_cache)
        output = self.model(
            encoder_outputs=(encoder_states,),
            attention_mask=encoder_mask,
            decoder_inputs_embeds=inputs_embeds,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        cross = _flat(cache.cross_attention_cache) if self.first else []
        return (output.logits, *_flat(cache.self_attention_cache), *cross)


# ---------------------------------------------------------------------------------------------
# Graph specs: modules, names, axes and random inputs
# ---------------------------------------------------------------------------------------------


def _image_shape(pipeline: Stage1Pipeline | Stage2Pipeline) -> tuple[int, int, int]:
    """(C, H, W) of the images the model reads: at the size it was trained with."""
    config = pipeline.vision.model.config
    config = getattr(config, "vision_config", None) or config
    size = int(pipeline.image_transform.image_size)
    return int(getattr(config, "num_channels", 3)), size, size


def _left_padded_mask(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(B, length) int64 mask; row 0 unpadded, the others with 0 .. length // 2 left pads
    (so a trace never sees only all-ones masks, and parity covers padding)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pads = int(torch.randint(0, length // 2 + 1, (1,), generator=generator))
        mask[row, :pads] = 0
    return mask


def _embeds(batch: int, length: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=generator) * 0.5  # (B, length, D)


def _random_pairs(
    kv: KvShape, batch: int, length: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``2 * layers`` tensors (B, heads, length, head_dim): key_0, value_0, key_1, ..."""
    shape = (batch, kv.heads, length, kv.head_dim)
    return [torch.randn(*shape, generator=generator) for _ in range(2 * kv.layers)]


def _kv_shape(step: nn.Module, probe: tuple[torch.Tensor, ...]) -> KvShape:
    """(layers, kv heads, head dim) of an LLM, read from its first-step outputs on ``probe``."""
    with torch.no_grad():
        outputs = step(*probe)
    key = outputs[1]  # (B, heads, S, head_dim)
    layers = (len(outputs) - 1) // (2 * step.pairs_per_layer)
    return KvShape(layers, int(key.shape[1]), int(key.shape[3]))


def _kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _vision_spec(
    file: str, module: nn.Module, output: str, image_shape: tuple[int, int, int]
) -> GraphSpec:
    def random_inputs(batch: int, sizes: Sizes, generator: torch.Generator) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *image_shape, generator=generator),)

    axes = {"pixel_values": {0: "batch"}, output: {0: "batch"}}
    return GraphSpec(file, module, ["pixel_values"], [output], axes, random_inputs)


def _instructed_vision_spec(
    module: InstructedVisionQFormer, image_shape: tuple[int, int, int]
) -> GraphSpec:
    vocab_size = module.bridge.config.vocab_size

    def random_inputs(batch: int, sizes: Sizes, generator: torch.Generator):
        pixels = torch.randn(batch, *image_shape, generator=generator)
        ids = torch.randint(0, vocab_size, (batch, sizes.sequence), generator=generator)
        mask = _left_padded_mask(batch, sizes.sequence, generator).flip(-1)  # BERT pads right
        return pixels, ids, mask

    names = ["pixel_values", "instruction_ids", "instruction_mask"]
    axes = {
        "pixel_values": {0: "batch"},
        "instruction_ids": {0: "batch", 1: "instruction"},
        "instruction_mask": {0: "batch", 1: "instruction"},
        "soft_prompt": {0: "batch"},
    }
    return GraphSpec(VISION_GRAPH, module, names, ["soft_prompt"], axes, random_inputs)


def _decoder_only_specs(llm: nn.Module, dim: int) -> tuple[list[GraphSpec], KvShape]:
    step = DecoderStep(llm)
    kv = _kv_shape(step, (torch.zeros(1, 1, dim), torch.ones(1, 1, dtype=torch.long)))
    presents, pasts = _kv_names("present", kv.layers), _kv_names("past", kv.layers)

    def prefill_inputs(batch: int, sizes: Sizes, generator: torch.Generator):
        embeds = _embeds(batch, sizes.sequence, dim, generator)
        return embeds, _left_padded_mask(batch, sizes.sequence, generator)

    def decode_inputs(batch: int, sizes: Sizes, generator: torch.Generator):
        embeds = _embeds(batch, 1, dim, generator)
        mask = _left_padded_mask(batch, sizes.past + 1, generator)
        return embeds, mask, *_random_pairs(kv, batch, sizes.past, generator)

    prefill = GraphSpec(
        PREFILL_GRAPH,
        step,
        ["inputs_embeds", "attention_mask"],
        ["logits", *presents],
        {
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 2: "sequence"} for name in presents},
        },
        prefill_inputs,
    )
    decode = GraphSpec(
        DECODE_GRAPH,
        step,
        ["inputs_embeds", "attention_mask", *pasts],
        ["logits", *presents],
        {
            "inputs_embeds": {0: "batch"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch"},
            **{name: {0: "batch", 2: "past_sequence"} for name in pasts},
            **{name: {0: "batch", 2: "total_sequence"} for name in presents},
        },
        decode_inputs,
    )
    return [prefill, decode], kv


def _check_shared_embeddings(llm: nn.Module) -> None:
    """The runtime embeds decoder tokens with the encoder's table (embed_tokens.npy)."""
    encoder_table = llm.get_input_embeddings()
    decoder_table = llm.get_decoder().get_input_embeddings()
    if type(decoder_table) is not nn.Embedding or not torch.equal(
        decoder_table.weight, encoder_table.weight
    ):
        raise UsageError(
            "ONNX export of an encoder-decoder LLM needs its decoder to share the encoder's plain "
            "token embedding table (T5 / FlanT5 do)"
        )


def _encoder_decoder_specs(llm: nn.Module, dim: int) -> tuple[list[GraphSpec], KvShape]:
    _check_shared_embeddings(llm)
    first, later = EncoderDecoderStep(llm, first=True), EncoderDecoderStep(llm, first=False)
    probe = (torch.zeros(1, 1, dim), torch.zeros(1, 1, dim), torch.ones(1, 1, dtype=torch.long))
    kv = _kv_shape(first, probe)
    presents, pasts = _kv_names("present", kv.layers), _kv_names("past", kv.layers)
    cross = _kv_names("cross", kv.layers)
    batch_encoder = {0: "batch", 1: "encoder_sequence"}

    def encoder_inputs(batch: int, sizes: Sizes, generator: torch.Generator):
        embeds = _embeds(batch, sizes.sequence, dim, generator)
        return embeds, _left_padded_mask(batch, sizes.sequence, generator)

    def prefill_inputs(batch: int, sizes: Sizes, generator: torch.Generator):
        embeds = _embeds(batch, sizes.decoder, dim, generator)
        states = torch.randn(batch, sizes.sequence, dim, generator=generator)
        return embeds, states, _left_padded_mask(batch, sizes.sequence, generator)

    def decode_inputs(batch: int, sizes: Sizes, generator: torch.Generator):
        embeds = _embeds(batch, 1, dim, generator)
        mask = _left_padded_mask(batch, sizes.sequence, generator)
        past = _random_pairs(kv, batch, sizes.past, generator)
        return embeds, mask, *past, *_random_pairs(kv, batch, sizes.sequence, generator)

    encoder = GraphSpec(
        ENCODER_GRAPH,
        LlmEncoder(llm),
        ["inputs_embeds", "attention_mask"],
        ["encoder_hidden_states"],
        {
            "inputs_embeds": batch_encoder,
            "attention_mask": batch_encoder,
            "encoder_hidden_states": batch_encoder,
        },
        encoder_inputs,
    )
    prefill = GraphSpec(
        PREFILL_GRAPH,
        first,
        ["inputs_embeds", "encoder_hidden_states", "encoder_attention_mask"],
        ["logits", *presents, *cross],
        {
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "encoder_hidden_states": batch_encoder,
            "encoder_attention_mask": batch_encoder,
            "logits": {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 2: "sequence"} for name in presents},
            **{name: {0: "batch", 2: "encoder_sequence"} for name in cross},
        },
        prefill_inputs,
    )
    decode = GraphSpec(
        DECODE_GRAPH,
        later,
        ["inputs_embeds", "encoder_attention_mask", *pasts, *cross],
        ["logits", *presents],
        {
            "inputs_embeds": {0: "batch"},
            "encoder_attention_mask": batch_encoder,
            "logits": {0: "batch"},
            **{name: {0: "batch", 2: "past_sequence"} for name in pasts},
            **{name: {0: "batch", 2: "encoder_sequence"} for name in cross},
            **{name: {0: "batch", 2: "total_sequence"} for name in presents},
        },
        decode_inputs,
    )
    return [encoder, prefill, decode], kv


def stage2_graph_specs(pipeline: Stage2Pipeline) -> tuple[list[GraphSpec], KvShape]:
    """The graphs of a stage-2 pipeline (traced from fp32 CPU copies) and its LLM's KV shape."""
    image_shape = _image_shape(pipeline)
    instructed = pipeline.bridge.instruction_aware
    module = (InstructedVisionQFormer if instructed else VisionQFormer)(pipeline)
    module = copy.deepcopy(module).to("cpu", torch.float32).eval()
    if instructed:
        vision = _instructed_vision_spec(module, image_shape)
    else:
        vision = _vision_spec(VISION_GRAPH, module, "soft_prompt", image_shape)
    llm = copy.deepcopy(pipeline.llm.model).to("cpu", torch.float32).eval()
    dim = pipeline.llm.embedding_dim
    if pipeline.llm.family == "decoder-only":
        llm_specs, kv = _decoder_only_specs(llm, dim)
    else:
        llm_specs, kv = _encoder_decoder_specs(llm, dim)
    return [vision, *llm_specs], kv


def stage1_graph_specs(pipeline: Stage1Pipeline) -> list[GraphSpec]:
    """The ITC image and text graphs of a stage-1 pipeline, traced from fp32 CPU copies."""
    copied = copy.deepcopy(pipeline)
    copied.model = copied.model.to("cpu", torch.float32).eval()
    copied.vision = copied.vision.to("cpu", torch.float32).eval()
    vocab_size = copied.model.config.vocab_size

    def text_inputs(batch: int, sizes: Sizes, generator: torch.Generator):
        ids = torch.randint(0, vocab_size, (batch, sizes.sequence), generator=generator)
        mask = _left_padded_mask(batch, sizes.sequence, generator).flip(-1)  # BERT pads right
        return ids, mask

    text = GraphSpec(
        TEXT_ITC_GRAPH,
        TextITC(copied),
        ["input_ids", "attention_mask"],
        ["text_embeds"],
        {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "text_embeds": {0: "batch"},
        },
        text_inputs,
    )
    image_shape = _image_shape(copied)
    return [_vision_spec(VISION_ITC_GRAPH, VisionITC(copied), "image_embeds", image_shape), text]


def graph_specs(source: Stage1Pipeline | Stage2Pipeline) -> list[GraphSpec]:
    if isinstance(source, Stage1Pipeline):
        return stage1_graph_specs(source)
    return stage2_graph_specs(source)[0]


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> str:
    """Write ``module`` traced on ``args`` to ``path``; the legacy (TorchScript) exporter first,
    the dynamo exporter if it fails. Returns which one was used."""
    options: dict[str, Any] = dict(
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        do_constant_folding=True,
    )
    with torch.no_grad():
        traced = module(*args)
    shapes = [tuple(t.shape) for t in (traced if isinstance(traced, tuple) else (traced,))]
    try:
        # Tracer warnings about Python-side shape values are expected: every graph is checked
        # on sizes other than the traced ones afterwards.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=False, **options)
        _pin_static_dims(path, dict(zip(output_names, shapes, strict=True)), dynamic_axes)
        return "torchscript"
    except Exception as legacy_error:  # any tracing failure: try the dynamo exporter
        try:
            with torch.no_grad():
                torch.onnx.export(module, args, str(path), dynamo=True, **options)
            _pin_static_dims(path, dict(zip(output_names, shapes, strict=True)), dynamic_axes)
            return "dynamo"
        except Exception as dynamo_error:
            raise QformerError(
                f"ONNX export of {path.name} failed: legacy exporter: {legacy_error}; "
                f"dynamo exporter: {dynamo_error}"
            ) from dynamo_error


def _pin_static_dims(
    path: Path, shapes: dict[str, tuple[int, ...]], dynamic_axes: dict[str, dict[int, str]]
) -> None:
    """Write the traced sizes into output dims that are not declared dynamic.

    The exporter names some fixed output dims symbolically (e.g. the soft prompt's Q as
    ``Addsoft_prompt_dim_1``); the manifest and consumers should see the number instead.
    """
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        dynamic = dynamic_axes.get(output.name, {})
        for index, dim in enumerate(dims):
            if index in dynamic:
                dim.dim_param = dynamic[index]
            elif output.name in shapes:
                dim.dim_value = shapes[output.name][index]
    onnx.save(model, str(path))


def _convert_to_fp16(path: Path) -> None:
    """Rewrite an fp32 graph as fp16, float inputs and outputs included (int masks stay)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=False), str(path))


def _quantize_to_int8(path: Path) -> None:
    """Rewrite an fp32 graph with int8 weights for its matmuls (onnxruntime's dynamic
    quantization: each activation is quantized as it runs; inputs and outputs stay float32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name(f"{path.stem}.int8{path.suffix}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process, printed per graph, is for CNNs
    try:
        quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    quantized.replace(path)


def _onnx_dtype_name(elem_type: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def graph_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph: names, shapes (ints or symbolic names), dtypes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
        return {"name": value.name, "shape": shape, "dtype": _onnx_dtype_name(tensor.elem_type)}

    initializers = {init.name for init in graph.initializer}
    return {
        "inputs": [describe(v) for v in graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in graph.output],
    }


def _write_graphs(
    specs: list[GraphSpec], out_dir: Path, precision: Precision, opset: int
) -> dict[str, Any]:
    """Trace, (for fp16) convert and check every graph; their manifest entries by name."""
    import onnx

    generator = torch.Generator().manual_seed(0)
    graphs = {}
    for spec in specs:
        path = out_dir / spec.file
        args = spec.random_inputs(TRACE_BATCH, TRACE_SIZES, generator)
        exporter = _export_graph(
            spec.module, args, path, spec.input_names, spec.output_names, spec.dynamic_axes, opset
        )
        if precision == "fp16":
            _convert_to_fp16(path)
        elif precision == "int8":
            _quantize_to_int8(path)
        onnx.checker.check_model(str(path), full_check=True)
        graphs[spec.name] = {"file": spec.file, "exporter": exporter, **graph_signature(path)}
    return graphs


def _write_preprocessing(
    tokenizer: Any, image_transform: ImageTransformConfig, out_dir: Path
) -> str:
    """Save the tokenizer, and the image transform the model uses as a transformers image
    processor config; return the latter's file name."""
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    kind, settings = image_processor_settings(image_transform)
    processor = {"image_processor_type": kind, **settings}
    (out_dir / IMAGE_PROCESSOR).write_text(json.dumps(processor, indent=2) + "\n")
    return IMAGE_PROCESSOR


def _check_options(precision: str, opset: int) -> None:
    if precision not in _DTYPES:
        raise UsageError(f"precision must be fp32, fp16 or int8, not {precision!r}")
    if opset < 17:
        raise UsageError(f"opset must be at least 17 (got {opset})")


def export_onnx(
    source: Stage2Pipeline | Stage1Pipeline,
    out_dir: Path,
    *,
    precision: Precision = "fp32",
    opset: int = 17,
    check: bool = True,
) -> dict[str, Any]:
    """Write the ONNX graphs, tokenizer, image settings and manifest of a stage-2 pipeline
    (caption / VQA) or a stage-1 one (ITC retrieval embeddings) to ``out_dir``.

    Returns the manifest (a dict), with ``parity`` filled in unless ``check=False``. Raises
    ``QformerError`` when a graph disagrees with PyTorch beyond the precision's tolerance, and
    ``UsageError`` for bad options or an LLM that cannot be exported.
    """
    _check_options(precision, opset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Graphs are traced from fp32 CPU copies, leaving the caller's models untouched; fp16 graphs
    # are converted from the fp32 ones (tracing a half model on CPU gives mixed-type LayerNorms).
    if isinstance(source, Stage1Pipeline):
        manifest = _export_stage1(source, out_dir, precision, opset)
    else:
        manifest = _export_stage2(source, out_dir, precision, opset)
    if check:
        manifest["parity"] = check_parity(source, out_dir, precision=precision)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest_head(stage: int, precision: Precision, opset: int) -> dict[str, Any]:
    return {
        "format": "qformer-onnx",
        "version": 1,
        "stage": stage,
        "opset": opset,
        "precision": precision,
    }


def _export_stage2(
    pipeline: Stage2Pipeline, out_dir: Path, precision: Precision, opset: int
) -> dict[str, Any]:
    specs, kv = stage2_graph_specs(pipeline)
    graphs = _write_graphs(specs, out_dir, precision, opset)
    llm = pipeline.llm.model
    weights = _embedding_table(llm).to(_DTYPES[precision])
    np.save(out_dir / EMBEDDINGS, weights.numpy())
    encoder_decoder = pipeline.llm.family == "encoder-decoder"
    return {
        **_manifest_head(2, precision, opset),
        "llm_family": pipeline.llm.family,
        "num_query_tokens": int(pipeline.bridge.config.num_query_tokens),
        "embedding_dim": int(pipeline.llm.embedding_dim),
        "vocab_size": int(weights.shape[0]),
        "num_layers": kv.layers,
        "num_kv_heads": kv.heads,
        "head_dim": kv.head_dim,
        "image_size": list(_image_shape(pipeline)),
        "graphs": graphs,
        # encoder-decoder: llm_prefill outputs the cross-attention K/V (cross.N.key/value) once;
        # every llm_decode call takes them back unchanged.
        "cross_attention": "computed once by llm_prefill" if encoder_decoder else None,
        "decoder_start_token_id": _decoder_start_token_id(llm) if encoder_decoder else None,
        "embeddings": {"file": EMBEDDINGS, "shape": list(weights.shape), "dtype": precision},
        "tokenizer": TOKENIZER_DIR,
        "image_processor": _write_preprocessing(
            pipeline.tokenizer, pipeline.image_transform, out_dir
        ),
        "stop_token_ids": generation_stop_ids(pipeline.llm, pipeline.tokenizer),
        "pad_token_id": pipeline.tokenizer.pad_token_id,
        "prompt": pipeline.prompt,
        "generation": GenerationConfig().decoding(),
        "source": str(pipeline.directory),
        **_instruction_entries(pipeline, out_dir),
    }


def _instruction_entries(pipeline: Stage2Pipeline, out_dir: Path) -> dict[str, Any]:
    """An instruction-aware Q-Former's manifest entries, with its tokenizer written: the
    vision_qformer graph then also takes each prompt's Q-Former tokens, right-padded and cut at
    ``instruction_max_length`` (as ``inference.generate.instructed_soft_prompt`` does)."""
    if not pipeline.bridge.instruction_aware:
        return {"instruction_aware": False}
    pipeline.qformer_tokenizer.save_pretrained(out_dir / QFORMER_TOKENIZER_DIR)
    return {
        "instruction_aware": True,
        "qformer_tokenizer": QFORMER_TOKENIZER_DIR,
        "instruction_max_length": int(pipeline.bridge.config.max_position_embeddings),
    }


@torch.no_grad()
def _embedding_table(llm: nn.Module) -> torch.Tensor:
    """(V, D) what the LLM's input embedding module gives each token id: its weight, times
    whatever the module applies (Gemma scales by sqrt(D) inside it), as the runtime's lookup
    must give what ``soft_prompt_inputs`` does in PyTorch."""
    embeddings = llm.get_input_embeddings()
    ids = torch.arange(embeddings.weight.shape[0], device=embeddings.weight.device)
    return embeddings(ids).float().cpu()


def _decoder_start_token_id(llm: nn.Module) -> int:
    """The token an encoder-decoder LLM's generate starts decoding from (T5: the pad token)."""
    start = llm.generation_config.decoder_start_token_id
    if start is None:
        start = llm.config.decoder_start_token_id
    if start is None:
        raise UsageError("the encoder-decoder LLM's config has no decoder_start_token_id")
    return int(start)


def _export_stage1(
    pipeline: Stage1Pipeline, out_dir: Path, precision: Precision, opset: int
) -> dict[str, Any]:
    config = pipeline.model.config
    return {
        **_manifest_head(1, precision, opset),
        "num_query_tokens": int(config.num_query_tokens),
        "embed_dim": int(config.embed_dim),
        "max_text_len": RETRIEVAL_MAX_TEXT_LEN,
        # image-text similarity: max over the queries of image_embeds (Q, E) . text_embeds (E)
        "similarity": "max_over_queries_dot",
        "image_size": list(_image_shape(pipeline)),
        "graphs": _write_graphs(stage1_graph_specs(pipeline), out_dir, precision, opset),
        "tokenizer": TOKENIZER_DIR,
        "image_processor": _write_preprocessing(
            pipeline.tokenizer, pipeline.image_transform, out_dir
        ),
        "source": str(pipeline.directory),
    }


# ---------------------------------------------------------------------------------------------
# Parity check
# ---------------------------------------------------------------------------------------------


def _max_diffs(
    names: list[str], expected: tuple[torch.Tensor, ...], actual: list[np.ndarray]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per output: the largest absolute difference, and the scale it is judged against,
    max(1, largest |PyTorch value|)."""
    diffs, scales = {}, {}
    for name, ref, got in zip(names, expected, actual, strict=True):
        ref_np = ref.detach().float().cpu().numpy()
        if ref_np.shape != got.shape:
            raise QformerError(f"parity: {name} has shape {got.shape}, PyTorch {ref_np.shape}")
        diffs[name] = float(np.max(np.abs(ref_np - got.astype(np.float32)), initial=0.0))
        scales[name] = max(1.0, float(np.max(np.abs(ref_np), initial=0.0)))
    return diffs, scales


def check_parity(
    source: Stage2Pipeline | Stage1Pipeline,
    out_dir: Path,
    *,
    precision: Precision = "fp32",
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    seed: int = 1,
) -> dict[str, Any]:
    """Run each exported graph with onnxruntime on fresh random inputs at each batch size and
    compare it with the PyTorch module it was traced from (an fp32 CPU copy of ``source``'s).

    The PyTorch side runs in fp32 on the same inputs (rounded to fp16 first for fp16 graphs),
    so for fp16 the reported difference is the whole error of the deployed graph.

    Returns ``{"provider": ..., "tolerance": ..., "max_abs_diff": {graph: {"batch_N":
    {output: diff}}}, "scale": {graph: {"batch_N": {output: scale}}}}``; raises
    ``QformerError`` if any difference is above the tolerance times its output's scale,
    max(1, max |PyTorch value|).
    """
    from qformer_cli.export.onnx_runtime import create_session

    out_dir = Path(out_dir)
    dtype = _DTYPES[precision]
    tolerance = TOLERANCE[precision]
    generator = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {"tolerance": tolerance, "max_abs_diff": {}, "scale": {}}
    failures = []
    for spec in graph_specs(source):
        session = create_session(out_dir / spec.file)
        report["provider"] = session.get_providers()[0]
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]
        per_batch, scale_per_batch = {}, {}
        for batch in batch_sizes:
            args = [
                a.to(dtype) if a.is_floating_point() else a
                for a in spec.random_inputs(batch, PARITY_SIZES, generator)
            ]  # float inputs in the graph's dtype
            with torch.no_grad():
                expected = spec.module(*(a.float() if a.is_floating_point() else a for a in args))
            if isinstance(expected, torch.Tensor):
                expected = (expected,)
            feed = {name: t.numpy() for name, t in zip(input_names, args, strict=True)}
            diffs, scales = _max_diffs(output_names, expected, session.run(output_names, feed))
            per_batch[f"batch_{batch}"], scale_per_batch[f"batch_{batch}"] = diffs, scales
            failures.extend(
                f"{spec.file}:{name} (batch {batch}) {diff:.3g} (scale {scales[name]:.3g})"
                for name, diff in diffs.items()
                if not diff <= tolerance * scales[name]  # NaN fails too
            )
        report["max_abs_diff"][spec.name] = per_batch
        report["scale"][spec.name] = scale_per_batch
    if failures:
        raise QformerError(
            f"ONNX parity check failed (max abs diff above {tolerance:g} x max(1, max |output|)): "
            + ", ".join(failures)
        )
    return report
