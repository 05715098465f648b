"""Run an ``export_onnx`` directory with onnxruntime and numpy: soft prompt, prefill, decode.

Greedy decoding here follows ``qformer_cli.generate.generate_text`` with ``num_beams=1``: the
soft prompt goes before the left-padded prompt tokens, generation stops per sequence at a stop
token (EOS or newline) and finished sequences are padded until all are done or
``max_new_tokens`` is reached.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qformer_cli.errors import CheckpointError, UsageError
from qformer_cli.generate import GenerationSettings


def _gpu_usable() -> bool:
    # onnxruntime-gpu lists CUDAExecutionProvider even without a GPU (and logs errors when asked
    # for it), so ask torch whether a device is actually there.
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        return False
    return bool(torch.cuda.is_available())


Provider = str | tuple[str, dict[str, Any]]


def choose_providers() -> list[Provider]:
    """CUDA then CPU when a GPU is usable and this onnxruntime has CUDA; CPU alone otherwise."""
    import onnxruntime

    if _gpu_usable() and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        # TF32 matmuls (on by default in the CUDA provider) would break fp32 parity (1e-4) and
        # greedy agreement with PyTorch, which keeps TF32 off for matmuls by default.
        return [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(path: Path, providers: list[Provider] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path``, quiet about provider fallbacks."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: hides onnxruntime-gpu's CPU-machine warnings
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=providers or choose_providers()
    )


@dataclass
class OnnxPipeline:
    """The loaded graphs, embedding table, tokenizer and manifest of an export directory."""

    directory: Path
    manifest: dict[str, Any]
    vision_qformer: Any  # onnxruntime.InferenceSession
    prefill: Any
    decode: Any
    embed_tokens: np.ndarray  # (V, D)
    tokenizer: Any

    @property
    def provider(self) -> str:
        """The execution provider actually used (``CUDAExecutionProvider`` / ``CPU...``)."""
        return self.vision_qformer.get_providers()[0]

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.manifest["precision"] == "fp16" else np.float32)

    @property
    def image_processor_source(self) -> str:
        """Where ``load_transform_config`` finds the image settings (this directory)."""
        return str(self.directory)

    @property
    def prompt(self) -> str:
        return self.manifest.get("prompt", "")

    @classmethod
    def load(cls, export_dir: Path, providers: list[Provider] | None = None) -> OnnxPipeline:
        from transformers import AutoTokenizer

        directory = Path(export_dir)
        manifest_file = directory / "manifest.json"
        if not manifest_file.is_file():
            raise CheckpointError(f"{directory}: no manifest.json (not an export-onnx directory)")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("llm_family") != "decoder-only":
            raise UsageError("the ONNX backend supports decoder-only LLMs only")
        graphs = manifest["graphs"]
        providers = providers or choose_providers()

        def session(name: str) -> Any:
            return create_session(directory / graphs[name]["file"], providers)

        return cls(
            directory=directory,
            manifest=manifest,
            vision_qformer=session("vision_qformer"),
            prefill=session("llm_prefill"),
            decode=session("llm_decode"),
            embed_tokens=np.load(directory / manifest["embeddings"]["file"]),
            tokenizer=AutoTokenizer.from_pretrained(directory / manifest["tokenizer"]),
        )

    def soft_prompt(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> soft prompt (B, Q, D)."""
        pixels = np.ascontiguousarray(pixel_values, dtype=self.float_dtype)
        return self.vision_qformer.run(["soft_prompt"], {"pixel_values": pixels})[0]


def _run_llm(session: Any, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits (B, S, V), presents [key_0, value_0, ...]) of a prefill or decode step."""
    outputs = session.run(None, feed)
    return outputs[0], outputs[1:]


def generate_text_onnx(
    pipeline: OnnxPipeline,
    pixel_values: np.ndarray,
    prompts: list[str],
    settings: GenerationSettings,
) -> list[str]:
    """One generated text per image (B, 3, H, W) for the prompts (B strings); greedy only."""
    if settings.num_beams != 1 or settings.do_sample:
        raise UsageError("the ONNX backend decodes greedily: use num_beams=1 without sampling")
    if settings.repetition_penalty != 1.0:
        raise UsageError("the ONNX backend does not apply a repetition penalty")
    tokenizer = pipeline.tokenizer
    dtype = pipeline.float_dtype
    soft_prompt = pipeline.soft_prompt(pixel_values).astype(dtype)  # (B, Q, D)
    batch, queries = soft_prompt.shape[:2]
    if len(prompts) != batch:
        raise UsageError(f"{len(prompts)} prompts for {batch} images")

    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, padding="longest", return_tensors="np")
    token_embeds = pipeline.embed_tokens[encoded["input_ids"]].astype(dtype)  # (B, T, D)
    embeds = np.concatenate([soft_prompt, token_embeds], axis=1)  # (B, Q + T, D)
    mask = np.concatenate(
        [np.ones((batch, queries), dtype=np.int64), encoded["attention_mask"].astype(np.int64)],
        axis=1,
    )  # (B, Q + T)

    stop_ids = np.asarray(pipeline.manifest["stop_token_ids"], dtype=np.int64)
    pad_id = pipeline.manifest.get("pad_token_id")
    pad_id = int(pad_id if pad_id is not None else stop_ids[0])
    past_names = [i.name for i in pipeline.decode.get_inputs()][2:]

    logits, presents = _run_llm(pipeline.prefill, {"inputs_embeds": embeds, "attention_mask": mask})
    generated = np.zeros((batch, 0), dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    for step in range(settings.max_new_tokens):
        scores = logits[:, -1, :].astype(np.float32)  # (B, V)
        if step < settings.min_new_tokens and stop_ids.size:
            scores[:, stop_ids] = -np.inf
        tokens = scores.argmax(axis=-1)
        # Like generate: a finished sequence keeps receiving the pad token.
        tokens = np.where(finished, pad_id, tokens)
        generated = np.concatenate([generated, tokens[:, None]], axis=1)
        finished |= np.isin(tokens, stop_ids)
        if finished.all() or step + 1 == settings.max_new_tokens:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)  # (B, P + 1)
        feed = {
            "inputs_embeds": pipeline.embed_tokens[tokens][:, None, :].astype(dtype),  # (B, 1, D)
            "attention_mask": mask,
            **dict(zip(past_names, presents, strict=True)),
        }
        logits, presents = _run_llm(pipeline.decode, feed)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [text.strip() for text in texts]


def generate_for_samples_onnx(
    pipeline: OnnxPipeline,
    samples: list[Any],
    settings: GenerationSettings,
    prompt_for: Callable[[Any], str],
    *,
    batch_size: int,
    skip_bad_samples: bool = False,
) -> tuple[list[tuple[Any, str]], Any]:
    """``eval.captioning.generate_for_samples`` for the ONNX backend: one text per sample,
    batched, in input order; images preprocessed with the exported image processor settings."""
    from qformer_cli.data import (
        BadSampleLog,
        SampleDataset,
        build_transform,
        load_transform_config,
        make_dataloader,
    )

    bad = BadSampleLog(skip=skip_bad_samples)
    transform = build_transform(load_transform_config(pipeline.image_processor_source), train=False)
    dataset = SampleDataset(samples, transform, bad_samples=bad)
    results: list[tuple[Any, str]] = []
    for batch in make_dataloader(dataset, batch_size=batch_size):
        prompts = [prompt_for(sample) for sample in batch.samples]
        texts = generate_text_onnx(pipeline, batch.images.numpy(), prompts, settings)
        results.extend(zip(batch.samples, texts, strict=True))
    return results, bad
