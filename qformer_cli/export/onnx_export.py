"""Export a stage-2 model as ONNX graphs that onnxruntime can run end to end, with a parity check.

Graphs (all with dynamic batch / sequence axes):

- ``vision_qformer.onnx``: pixel_values (B, 3, H, W) -> soft_prompt (B, Q, D), i.e. the frozen
  vision encoder, the Q-Former and the projection into the LLM's embedding space;
- ``llm_prefill.onnx`` (decoder-only LLMs): inputs_embeds (B, S, D) + attention_mask (B, S) ->
  logits (B, S, V) and one present key/value pair per layer, (B, heads, S, head_dim) each;
- ``llm_decode.onnx``: inputs_embeds (B, 1, D) + attention_mask (B, P + 1) + the past pairs
  (B, heads, P, head_dim) -> logits (B, 1, V) and the presents (B, heads, P + 1, head_dim);
- ``embed_tokens.npy``: the LLM's input embedding matrix (V, D), so the runtime can embed the
  prompt tokens without a graph of its own.

``manifest.json`` describes all of them. After writing, every graph is run with onnxruntime on
fresh random inputs at two batch sizes and compared with the PyTorch modules it came from.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from qformer_cli.errors import QformerError, UsageError
from qformer_cli.generate import GenerationSettings, stop_token_ids
from qformer_cli.pretrained import Stage2Pipeline

Precision = Literal["fp32", "fp16"]

MANIFEST = "manifest.json"
VISION_GRAPH = "vision_qformer.onnx"
PREFILL_GRAPH = "llm_prefill.onnx"
DECODE_GRAPH = "llm_decode.onnx"
EMBEDDINGS = "embed_tokens.npy"
TOKENIZER_DIR = "tokenizer"
IMAGE_PROCESSOR = "preprocessor_config.json"

TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2}
PARITY_BATCH_SIZES = (1, 3)
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


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


def _cache_argument(model: nn.Module) -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache`` in the model forwards.
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class DecoderStep(nn.Module):
    """A decoder-only LLM with its KV cache as flat tensors, for tracing.

    ``forward(inputs_embeds (B, S, D), attention_mask (B, P + S), *past)`` where ``past`` is
    ``key_0, value_0, key_1, value_1, ...`` of shape (B, heads, P, head_dim) (none for prefill)
    returns ``(logits (B, S, V), key_0, value_0, ...)``, the presents (B, heads, P + S, head_dim).
    """

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.cache_argument = _cache_argument(model)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs or None, config=self.model.config)
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
        presents: list[torch.Tensor] = []
        for layer in cache.layers:
            presents.extend((layer.keys, layer.values))
        return (output.logits, *presents)


# ---------------------------------------------------------------------------------------------
# Example / random inputs
# ---------------------------------------------------------------------------------------------


def _image_shape(pipeline: Stage2Pipeline) -> tuple[int, int, int]:
    config = pipeline.vision.model.config
    config = getattr(config, "vision_config", None) or config
    size = int(config.image_size)
    return int(getattr(config, "num_channels", 3)), size, size


def _kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder-only LLM, read from a one-token forward."""
    dim = model.get_input_embeddings().embedding_dim
    probe = DecoderStep(model, 0)
    param = next(model.parameters())
    with torch.no_grad():
        outputs = probe(
            torch.zeros(1, 1, dim, dtype=param.dtype, device=param.device),
            torch.ones(1, 1, dtype=torch.long, device=param.device),
        )
    key = outputs[1]  # (1, heads, 1, head_dim)
    return (len(outputs) - 1) // 2, int(key.shape[1]), int(key.shape[3])


def _left_padded_mask(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(B, length) int64 mask; row 0 unpadded, the others with 0 .. length // 2 left pads
    (so a trace never sees only all-ones masks, and parity covers padding)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pads = int(torch.randint(0, length // 2 + 1, (1,), generator=generator))
        mask[row, :pads] = 0
    return mask


def _llm_inputs(
    kv: tuple[int, int, int],
    dim: int,
    batch: int,
    new: int,
    past: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, ...]:
    """Random (inputs_embeds (B, new, D), mask (B, past + new), past pairs (B, h, past, hd)...)."""
    layers, heads, head_dim = kv
    embeds = torch.randn(batch, new, dim, generator=generator) * 0.5
    mask = _left_padded_mask(batch, past + new, generator)
    pasts = [
        torch.randn(batch, heads, past, head_dim, generator=generator)
        for _ in range(2 * layers if past else 0)
    ]
    tensors = [embeds.to(dtype), mask, *(p.to(dtype) for p in pasts)]
    return tuple(t.to(device) for t in tensors)


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


def _kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def export_onnx(
    pipeline: Stage2Pipeline,
    out_dir: Path,
    *,
    precision: Precision = "fp32",
    opset: int = 17,
    check: bool = True,
) -> dict[str, Any]:
    """Write the ONNX graphs, embeddings, tokenizer and manifest of ``pipeline`` to ``out_dir``.

    Returns the manifest (a dict), with ``parity`` filled in unless ``check=False``. Raises
    ``QformerError`` when a graph disagrees with PyTorch beyond the precision's tolerance, and
    ``UsageError`` for what cannot be exported yet (encoder-decoder LLMs).
    """
    import onnx

    if precision not in _DTYPES:
        raise UsageError(f"precision must be fp32 or fp16, not {precision!r}")
    if opset < 17:
        raise UsageError(f"opset must be at least 17 (got {opset})")
    if pipeline.llm.family != "decoder-only":
        raise UsageError("ONNX export of encoder-decoder LLMs is not supported yet")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Trace fp32 CPU copies, leaving the caller's pipeline untouched; fp16 graphs are converted
    # from the fp32 ones afterwards (tracing a half model on CPU gives mixed-type LayerNorms).
    dtype = torch.float32
    vision_qformer = copy.deepcopy(VisionQFormer(pipeline)).to("cpu", dtype).eval()
    llm = copy.deepcopy(pipeline.llm.model).to("cpu", dtype).eval()
    generator = torch.Generator().manual_seed(0)
    exporters: dict[str, str] = {}

    channels, height, width = _image_shape(pipeline)
    pixels = torch.randn(2, channels, height, width, generator=generator).to(dtype)
    exporters[VISION_GRAPH] = _export_graph(
        vision_qformer,
        (pixels,),
        out_dir / VISION_GRAPH,
        ["pixel_values"],
        ["soft_prompt"],
        {"pixel_values": {0: "batch"}, "soft_prompt": {0: "batch"}},
        opset,
    )

    kv = _kv_shape(llm)
    layers = kv[0]
    dim = pipeline.llm.embedding_dim
    step = DecoderStep(llm, layers)
    presents = _kv_names("present", layers)
    # Traced with batch 2, a left-padded row, and sizes the parity check does not reuse, so that
    # any size baked into the graph shows up as a parity failure.
    prefill_args = _llm_inputs(kv, dim, 2, 5, 0, dtype, torch.device("cpu"), generator)
    exporters[PREFILL_GRAPH] = _export_graph(
        step,
        prefill_args,
        out_dir / PREFILL_GRAPH,
        ["inputs_embeds", "attention_mask"],
        ["logits", *presents],
        {
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 2: "sequence"} for name in presents},
        },
        opset,
    )
    pasts = _kv_names("past", layers)
    decode_args = _llm_inputs(kv, dim, 2, 1, 4, dtype, torch.device("cpu"), generator)
    exporters[DECODE_GRAPH] = _export_graph(
        step,
        decode_args,
        out_dir / DECODE_GRAPH,
        ["inputs_embeds", "attention_mask", *pasts],
        ["logits", *presents],
        {
            "inputs_embeds": {0: "batch"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch"},
            **{name: {0: "batch", 2: "past_sequence"} for name in pasts},
            **{name: {0: "batch", 2: "total_sequence"} for name in presents},
        },
        opset,
    )

    graphs = {}
    for name in (VISION_GRAPH, PREFILL_GRAPH, DECODE_GRAPH):
        if precision == "fp16":
            _convert_to_fp16(out_dir / name)
        onnx.checker.check_model(str(out_dir / name), full_check=True)
        graphs[name.removesuffix(".onnx")] = {
            "file": name,
            "exporter": exporters[name],
            **graph_signature(out_dir / name),
        }

    # The prompt-token embedding table (V, D), in the graphs' precision.
    weights = llm.get_input_embeddings().weight.detach().cpu().to(_DTYPES[precision])
    np.save(out_dir / EMBEDDINGS, weights.numpy())

    pipeline.tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    processor_file = Path(pipeline.image_processor_source) / IMAGE_PROCESSOR
    image_processor = None
    if processor_file.is_file():
        shutil.copyfile(processor_file, out_dir / IMAGE_PROCESSOR)
        image_processor = IMAGE_PROCESSOR

    manifest: dict[str, Any] = {
        "format": "qformer-onnx",
        "version": 1,
        "opset": opset,
        "precision": precision,
        "llm_family": pipeline.llm.family,
        "num_query_tokens": int(pipeline.bridge.config.num_query_tokens),
        "embedding_dim": int(dim),
        "vocab_size": int(weights.shape[0]),
        "num_layers": layers,
        "num_kv_heads": kv[1],
        "head_dim": kv[2],
        "image_size": [channels, height, width],
        "graphs": graphs,
        "embeddings": {"file": EMBEDDINGS, "shape": list(weights.shape), "dtype": precision},
        "tokenizer": TOKENIZER_DIR,
        "image_processor": image_processor,
        "stop_token_ids": stop_token_ids(pipeline.tokenizer),
        "pad_token_id": pipeline.tokenizer.pad_token_id,
        "prompt": pipeline.prompt,
        "generation": asdict(GenerationSettings()),
        "source": str(pipeline.directory),
    }
    if check:
        manifest["parity"] = check_parity(pipeline, out_dir, precision=precision)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------
# Parity check
# ---------------------------------------------------------------------------------------------


def _max_diffs(
    names: list[str], expected: tuple[torch.Tensor, ...], actual: list[np.ndarray]
) -> dict[str, float]:
    diffs = {}
    for name, ref, got in zip(names, expected, actual, strict=True):
        ref_np = ref.detach().float().cpu().numpy()
        if ref_np.shape != got.shape:
            raise QformerError(f"parity: {name} has shape {got.shape}, PyTorch {ref_np.shape}")
        diffs[name] = float(np.max(np.abs(ref_np - got.astype(np.float32)), initial=0.0))
    return diffs


def check_parity(
    pipeline: Stage2Pipeline,
    out_dir: Path,
    *,
    precision: Precision = "fp32",
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    seed: int = 1,
) -> dict[str, Any]:
    """Run each exported graph with onnxruntime on fresh random inputs at each batch size and
    compare it with ``pipeline``'s PyTorch modules (cast to ``precision``, on CPU).

    The PyTorch side runs in fp32 on the same inputs (rounded to fp16 first for fp16 graphs),
    so for fp16 the reported difference is the whole error of the deployed graph.

    Returns ``{"provider": ..., "tolerance": ..., "max_abs_diff": {graph: {"batch_N":
    {output: diff}}}}``; raises ``QformerError`` if any difference is above the tolerance.
    """
    from qformer_cli.export.onnx_runtime import create_session

    out_dir = Path(out_dir)
    dtype = _DTYPES[precision]
    tolerance = TOLERANCE[precision]
    vision_qformer = copy.deepcopy(VisionQFormer(pipeline)).to("cpu", torch.float32).eval()
    llm = copy.deepcopy(pipeline.llm.model).to("cpu", torch.float32).eval()
    kv = _kv_shape(llm)
    step = DecoderStep(llm, kv[0])
    dim = pipeline.llm.embedding_dim
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = _image_shape(pipeline)
    cpu = torch.device("cpu")

    def inputs_for(graph: str, batch: int) -> tuple[torch.Tensor, ...]:
        if graph == VISION_GRAPH:
            return (torch.randn(batch, channels, height, width, generator=generator).to(dtype),)
        if graph == PREFILL_GRAPH:
            return _llm_inputs(kv, dim, batch, 7, 0, dtype, cpu, generator)
        return _llm_inputs(kv, dim, batch, 1, 6, dtype, cpu, generator)

    modules = {VISION_GRAPH: vision_qformer, PREFILL_GRAPH: step, DECODE_GRAPH: step}
    report: dict[str, Any] = {"tolerance": tolerance, "max_abs_diff": {}}
    failures = []
    for graph, module in modules.items():
        session = create_session(out_dir / graph)
        report["provider"] = session.get_providers()[0]
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]
        per_batch = {}
        for batch in batch_sizes:
            args = inputs_for(graph, batch)  # float inputs in the graph's dtype
            with torch.no_grad():
                expected = module(*(a.float() if a.is_floating_point() else a for a in args))
            if isinstance(expected, torch.Tensor):
                expected = (expected,)
            feed = {name: t.numpy() for name, t in zip(input_names, args, strict=True)}
            actual = session.run(output_names, feed)
            diffs = _max_diffs(output_names, expected, actual)
            per_batch[f"batch_{batch}"] = diffs
            failures.extend(
                f"{graph}:{name} (batch {batch}) {diff:.3g}"
                for name, diff in diffs.items()
                if not diff <= tolerance  # NaN fails too
            )
        report["max_abs_diff"][graph.removesuffix(".onnx")] = per_batch
    if failures:
        raise QformerError(
            f"ONNX parity check failed (max abs diff above {tolerance:g}): " + ", ".join(failures)
        )
    return report
