"""Run a stage-2 ``export_onnx`` directory with onnxruntime and numpy: soft prompt, LLM steps.

Decoding follows ``inference.generate.generate_text`` (greedy, or beam search as transformers
runs it): the soft prompt goes before the left-padded prompt tokens; a decoder-only LLM
continues that sequence (prefill, then one decode step per token), an encoder-decoder LLM
encodes it and decodes from ``decoder_start_token_id`` (the first decoder step also returns the
cross-attention K/V, which every later step takes back unchanged). Generation stops per
sequence at a stop token (EOS, the model's end tokens, and newline for decoder-only LLMs) and
finished sequences are padded until all are done or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qformer_cli.config import GenerationConfig
from qformer_cli.data.transforms import ImageTransformConfig, load_transform_config
from qformer_cli.errors import CheckpointError, UsageError
from qformer_cli.inference.generate import decode_until_stop, encode_instructions


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
    """The loaded graphs, embedding table, tokenizer and manifest of a stage-2 export."""

    directory: Path
    manifest: dict[str, Any]
    vision_qformer: Any  # onnxruntime.InferenceSession
    encoder: Any | None  # encoder-decoder LLMs only
    prefill: Any
    decode: Any
    embed_tokens: np.ndarray  # (V, D)
    tokenizer: Any
    qformer_tokenizer: Any = None  # an instruction-aware Q-Former's (it reads the prompts)

    @property
    def instruction_aware(self) -> bool:
        return bool(self.manifest.get("instruction_aware"))

    @property
    def provider(self) -> str:
        """The execution provider actually used (``CUDAExecutionProvider`` / ``CPU...``)."""
        return self.vision_qformer.get_providers()[0]

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.manifest["precision"] == "fp16" else np.float32)

    @property
    def image_transform(self) -> ImageTransformConfig:
        """How the exported model reads images: the image processor config written with it."""
        return load_transform_config(str(self.directory))

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
        if manifest.get("stage", 2) != 2:
            raise UsageError(
                f"{manifest_file}: a stage-{manifest.get('stage')} (ITC retrieval) export; "
                "captioning and VQA need a stage-2 export"
            )
        family = manifest.get("llm_family")
        if family not in ("decoder-only", "encoder-decoder"):
            raise CheckpointError(f"{manifest_file}: unknown llm_family {family!r}")
        graphs = manifest["graphs"]
        providers = providers or choose_providers()

        def session(name: str) -> Any:
            if name not in graphs:
                raise CheckpointError(f"{manifest_file}: no graphs.{name} entry")
            return create_session(directory / graphs[name]["file"], providers)

        return cls(
            directory=directory,
            manifest=manifest,
            vision_qformer=session("vision_qformer"),
            encoder=session("llm_encoder") if family == "encoder-decoder" else None,
            prefill=session("llm_prefill"),
            decode=session("llm_decode"),
            embed_tokens=np.load(directory / manifest["embeddings"]["file"]),
            tokenizer=AutoTokenizer.from_pretrained(directory / manifest["tokenizer"]),
            qformer_tokenizer=AutoTokenizer.from_pretrained(
                directory / manifest["qformer_tokenizer"]
            )
            if manifest.get("instruction_aware")
            else None,
        )

    def soft_prompt(self, pixel_values: np.ndarray, prompts: list[str] | None = None) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> soft prompt (B, Q, D); an instruction-aware
        Q-Former also reads each image's prompt."""
        feed = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=self.float_dtype)}
        if self.instruction_aware:
            if prompts is None or len(prompts) != len(pixel_values):
                raise UsageError("an instruction-aware Q-Former reads one prompt per image")
            max_length = self.manifest["instruction_max_length"]
            encoded = encode_instructions(self.qformer_tokenizer, prompts, max_length, "np")
            feed["instruction_ids"] = encoded["input_ids"].astype(np.int64)
            feed["instruction_mask"] = encoded["attention_mask"].astype(np.int64)
        return self.vision_qformer.run(["soft_prompt"], feed)[0]

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (B, T) -> embeddings (B, T, D) in the graphs' dtype."""
        return self.embed_tokens[token_ids].astype(self.float_dtype)


def _run(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A graph's outputs by name."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


@dataclass
class DecoderState:
    """What the next decode step needs besides its token, every array batch-first (so a beam
    search can reorder rows): the self-attention cache as ``past.N.key/value`` inputs, the fixed
    inputs (encoder mask and cross K/V of an encoder-decoder LLM) and, for a decoder-only LLM,
    the attention mask (B, P) that grows by one column per step."""

    past: dict[str, np.ndarray]  # past.N.key / past.N.value (B, heads, P, head_dim)
    fixed: dict[str, np.ndarray]
    mask: np.ndarray | None

    def select(self, rows: np.ndarray) -> DecoderState:
        """The state of the sequences ``rows`` (B',) in that order."""
        return DecoderState(
            past={name: value[rows] for name, value in self.past.items()},
            fixed={name: value[rows] for name, value in self.fixed.items()},
            mask=None if self.mask is None else self.mask[rows],
        )


def _take_step(outputs: dict[str, np.ndarray], state: DecoderState) -> np.ndarray:
    """Store a step's presents as the next step's pasts; its last-position logits (B, V)."""
    state.past = {
        name.replace("present.", "past.", 1): value
        for name, value in outputs.items()
        if name.startswith("present.")
    }
    return outputs["logits"][:, -1, :].astype(np.float32)


def start_decoding(
    pipeline: OnnxPipeline, embeds: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, DecoderState]:
    """Run the LLM on the input sequence ``embeds`` (B, S, D) / ``mask`` (B, S): the logits
    (B, V) of the first new token and the state for the next steps."""
    if pipeline.encoder is None:
        outputs = _run(pipeline.prefill, {"inputs_embeds": embeds, "attention_mask": mask})
        state = DecoderState(past={}, fixed={}, mask=mask)
        return _take_step(outputs, state), state
    encoder_states = _run(pipeline.encoder, {"inputs_embeds": embeds, "attention_mask": mask})
    start = np.full((embeds.shape[0], 1), pipeline.manifest["decoder_start_token_id"])
    outputs = _run(
        pipeline.prefill,
        {
            "inputs_embeds": pipeline.embed(start),  # (B, 1, D)
            "encoder_hidden_states": encoder_states["encoder_hidden_states"],
            "encoder_attention_mask": mask,
        },
    )
    cross = {name: value for name, value in outputs.items() if name.startswith("cross.")}
    state = DecoderState(past={}, fixed={"encoder_attention_mask": mask, **cross}, mask=None)
    return _take_step(outputs, state), state


def decode_step(pipeline: OnnxPipeline, state: DecoderState, tokens: np.ndarray) -> np.ndarray:
    """Feed the tokens (B,) chosen last; the logits (B, V) of the next ones. Updates ``state``."""
    feed = {"inputs_embeds": pipeline.embed(tokens[:, None]), **state.fixed, **state.past}
    if state.mask is not None:
        ones = np.ones((state.mask.shape[0], 1), dtype=np.int64)
        state.mask = np.concatenate([state.mask, ones], axis=1)  # (B, P + 1)
        feed["attention_mask"] = state.mask
    return _take_step(_run(pipeline.decode, feed), state)


def prompt_inputs(
    pipeline: OnnxPipeline, soft_prompt: np.ndarray, prompts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``[soft prompt; left-padded prompt tokens]`` (B, Q + T, D) and its mask (B, Q + T), as
    ``models.blip2.soft_prompt_inputs`` builds them, from the soft prompt (B, Q, D)."""
    soft_prompt = soft_prompt.astype(pipeline.float_dtype)
    batch, queries = soft_prompt.shape[:2]
    if len(prompts) != batch:
        raise UsageError(f"{len(prompts)} prompts for {batch} images")
    pipeline.tokenizer.padding_side = "left"
    encoded = pipeline.tokenizer(prompts, padding="longest", return_tensors="np")
    embeds = np.concatenate([soft_prompt, pipeline.embed(encoded["input_ids"])], axis=1)
    query_mask = np.ones((batch, queries), dtype=np.int64)
    mask = np.concatenate([query_mask, encoded["attention_mask"].astype(np.int64)], axis=1)
    return embeds, mask


def generate_text_onnx(
    pipeline: OnnxPipeline,
    soft_prompt: np.ndarray,
    prompts: list[str],
    settings: GenerationConfig,
) -> list[str]:
    """One generated text per soft prompt (B, Q, D) (``pipeline.soft_prompt`` of the images)
    for the prompts (B strings): greedy, or beam search with ``num_beams`` > 1."""
    if settings.do_sample:
        raise UsageError("the ONNX backend searches (greedy or beams): sampling is torch-only")
    if settings.repetition_penalty != 1.0:
        raise UsageError("the ONNX backend does not apply a repetition penalty")
    embeds, mask = prompt_inputs(pipeline, soft_prompt, prompts)
    stop_ids = np.asarray(pipeline.manifest["stop_token_ids"], dtype=np.int64)
    pad_id = pipeline.manifest.get("pad_token_id")
    pad_id = int(pad_id if pad_id is not None else stop_ids[0])
    search = _greedy if settings.num_beams == 1 else _beam_search
    generated = search(pipeline, embeds, mask, settings, stop_ids, pad_id)
    return decode_until_stop(pipeline.tokenizer, generated, stop_ids.tolist())


def _greedy(
    pipeline: OnnxPipeline,
    embeds: np.ndarray,
    mask: np.ndarray,
    settings: GenerationConfig,
    stop_ids: np.ndarray,
    pad_id: int,
) -> np.ndarray:
    """The most likely token at each step; (B, L) generated tokens."""
    scores, state = start_decoding(pipeline, embeds, mask)  # (B, V)
    batch = embeds.shape[0]
    generated = np.zeros((batch, 0), dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    for step in range(settings.max_new_tokens):
        if step < settings.min_new_tokens and stop_ids.size:
            scores[:, stop_ids] = -np.inf
        tokens = scores.argmax(axis=-1)
        # Like generate: a finished sequence keeps receiving the pad token.
        tokens = np.where(finished, pad_id, tokens)
        generated = np.concatenate([generated, tokens[:, None]], axis=1)
        finished |= np.isin(tokens, stop_ids)
        if finished.all() or step + 1 == settings.max_new_tokens:
            break
        scores = decode_step(pipeline, state, tokens)
    return generated


_FINISHED = np.float32(-1.0e9)  # the score that takes a candidate out of a ranking


def _top(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest values of each row, largest first (ties: lower index).
    A partial selection first: a full sort of beams x vocabulary scores per step cost a quarter
    of the search."""
    if count < values.shape[-1]:
        chosen = np.argpartition(-values, count - 1, axis=-1)[:, :count]
    else:
        chosen = np.broadcast_to(np.arange(values.shape[-1]), values.shape)
    order = np.lexsort((chosen, -np.take_along_axis(values, chosen, axis=-1)), axis=-1)
    return np.take_along_axis(chosen, order, axis=-1)


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _beam_search(
    pipeline: OnnxPipeline,
    embeds: np.ndarray,
    mask: np.ndarray,
    settings: GenerationConfig,
    stop_ids: np.ndarray,
    pad_id: int,
) -> np.ndarray:
    """Beam search as transformers' ``generate`` runs it (its vectorized beam search with the
    default ``early_stopping=False``): each step ranks (1 + stop tokens, at least 2) x beams
    continuations of all beams; those that end (a stop token or the last step) compete, scored
    ``sum log p / length ** length_penalty``, for the beams' finished hypotheses; the best of
    the others run on. The prompt is prefilled once per image and its cache copied to the beams.
    Returns the best finished hypothesis of each image, (B, L) tokens."""
    beams, max_new = settings.num_beams, settings.max_new_tokens
    scores, state = start_decoding(pipeline, embeds, mask)  # (B, V)
    batch, vocab = scores.shape
    state = state.select(np.repeat(np.arange(batch), beams))  # (B * beams, ...)
    log_probs = np.repeat(_log_softmax(scores), beams, axis=0)  # (B * beams, V)
    keep = max(2, 1 + stop_ids.size) * beams
    candidate_is_top = np.arange(keep) < beams  # only these may end as finished hypotheses
    rows = np.arange(batch)[:, None]
    running = np.full((batch, beams, max_new), pad_id, dtype=np.int64)
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = _FINISHED  # the beams start as one: rank only the first
    done = running.copy()
    done_scores = np.full((batch, beams), _FINISHED, dtype=np.float32)
    done_flags = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones((batch, 1), dtype=bool)
    for step in range(max_new):
        if step < settings.min_new_tokens and stop_ids.size:
            log_probs[:, stop_ids] = -np.inf
        totals = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(
            batch, beams * vocab
        )
        chosen = _top(totals, keep)  # (B, K)
        chosen_scores = totals[rows, chosen].astype(np.float32)
        source, tokens = chosen // vocab, chosen % vocab  # (B, K) beam and token of each
        candidates = running[rows, source]  # (B, K, max_new)
        candidates[:, :, step] = tokens
        ends = np.isin(tokens, stop_ids) | (step + 1 >= max_new)  # (B, K)

        # the best candidates that go on are next step's beams
        going_on = chosen_scores + ends.astype(np.float32) * _FINISHED
        best = _top(going_on, beams)  # (B, beams)
        running, running_scores = candidates[rows, best], going_on[rows, best]
        running_source = source[rows, best]

        # the top candidates that end join the finished hypotheses when better
        ended = ends & candidate_is_top[None, :]
        ended_scores = chosen_scores / np.float32((step + 1) ** settings.length_penalty)
        ended_scores = ended_scores + (~improvable).astype(np.float32) * _FINISHED
        ended_scores = ended_scores + (~ended).astype(np.float32) * _FINISHED
        merged_scores = np.concatenate([done_scores, ended_scores], axis=1)
        kept = _top(merged_scores, beams)
        done = np.concatenate([done, candidates], axis=1)[rows, kept]
        done_scores = merged_scores[rows, kept]
        done_flags = np.concatenate([done_flags, ended], axis=1)[rows, kept]

        # can a running beam still beat the worst finished one? (transformers' heuristic)
        best_running = running_scores[:, :1] / np.float32((step + 1) ** settings.length_penalty)
        worst_done = np.where(done_flags, done_scores.min(axis=1, keepdims=True), _FINISHED)
        improvable &= np.any(best_running > worst_done, axis=1, keepdims=True)
        if not improvable.any() or ends.all():
            break
        sources = (np.arange(batch)[:, None] * beams + running_source).reshape(-1)
        if not np.array_equal(sources, np.arange(sources.size)):  # else no beam moved: no copy
            state = state.select(sources)
        tokens_now = running[:, :, step].reshape(-1)
        log_probs = _log_softmax(decode_step(pipeline, state, tokens_now))
    return done[:, 0, : step + 1]
