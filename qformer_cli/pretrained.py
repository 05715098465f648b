"""Loading trained models for inference (caption, eval, export): never imports the trainer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qformer_cli import checkpoint
from qformer_cli.config import RunConfig, from_dict, load_config
from qformer_cli.data.transforms import ImageTransformConfig, load_transform_config
from qformer_cli.errors import CheckpointError
from qformer_cli.models.backbones import (
    LanguageModel,
    VisionEncoder,
    build_language_model,
    build_vision_encoder,
    load_llm_tokenizer,
    load_qformer_tokenizer,
    qformer_vocabulary,
    resolve_model_name,
)
from qformer_cli.models.blip2 import Stage1Model, Stage2Model
from qformer_cli.models.convert import (
    BLIP2_MODEL_TYPES,
    INSTRUCTBLIP_MODEL_TYPES,
    import_state_dict,
    load_external_weights,
    qformer_config_from_transformers,
    read_config_json,
    read_safetensors_dir,
    read_torch_weights,
)


@dataclass
class Stage1Checkpoint:
    model: Stage1Model
    tokenizer: PreTrainedTokenizerBase
    run_config: RunConfig
    directory: Path


def _checkpoint_meta(directory: Path, stage: int) -> checkpoint.CheckpointMeta:
    saved = checkpoint.load_meta(directory)
    if saved.stage != stage:
        raise CheckpointError(
            f"{directory}: a stage-{saved.stage} checkpoint; this needs stage {stage}"
        )
    return saved


def checkpoint_vision(
    run_config: RunConfig, directory: Path, dtype: torch.dtype = torch.float32
) -> VisionEncoder:
    """The vision encoder a checkpoint was trained with: the one its run config names, with the
    checkpoint's own tower weights where the run fine-tuned it (``vision.safetensors``)."""
    vision = build_vision_encoder(run_config.model.vision, dtype=dtype)
    weights = checkpoint.load_vision_weights(directory)
    if weights is None:
        return vision
    result = vision.model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{directory / checkpoint.VISION_WEIGHTS}: does not fit {run_config.model.vision.model}"
            f" (missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return vision


def _load_state(model: torch.nn.Module, directory: Path) -> None:
    result = model.load_state_dict(checkpoint.load_weights(directory), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{directory}: weights do not fit the model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )


def load_stage1(path: Path, device: torch.device) -> Stage1Checkpoint:
    """A stage-1 model from a run or checkpoint directory, in eval mode on ``device``."""
    model, directory = load_trainable(path)
    if not isinstance(model, Stage1Model):
        raise CheckpointError(f"{directory}: a stage-2 checkpoint; this needs stage 1")
    run_config = from_dict(RunConfig, _checkpoint_meta(directory, stage=1).run)
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    return Stage1Checkpoint(model.to(device).eval(), tokenizer, run_config, directory)


def image_transform_config(run_config: RunConfig) -> ImageTransformConfig:
    """How a model of ``run_config`` reads images, in training and inference alike: its vision
    encoder's image processor settings, at the run's ``data.image_size`` (0: the processor's
    own size)."""
    vision_name = resolve_model_name(run_config.model.vision.model)
    return load_transform_config(vision_name, run_config.data.image_size or None)


@dataclass
class Stage1Pipeline:
    """A stage-1 model with its frozen vision encoder: what ITC image/text embeddings need."""

    model: Stage1Model
    vision: VisionEncoder
    tokenizer: PreTrainedTokenizerBase  # the Q-Former's (BERT) tokenizer
    image_transform: ImageTransformConfig  # how the model reads images (as it was trained)
    directory: Path


def load_stage1_pipeline(
    path: Path, device: torch.device, backbones: RunConfig | None = None
) -> Stage1Pipeline:
    """``load_stage1`` plus the frozen vision encoder named in its run config; or a
    transformers ``Blip2ForImageTextRetrieval`` directory; or a LAVIS ``.pth`` with the
    backbones (and Q-Former sizes) ``backbones`` names."""
    path = Path(path)
    if _is_transformers_blip2(path):
        return _load_transformers_retrieval(path, device)
    if is_lavis_file(path):
        _require_lavis_stage(path, 1)
        return _load_lavis_stage1(path, device, backbones or load_config(None))
    loaded = load_stage1(path, device)
    return Stage1Pipeline(
        model=loaded.model,
        vision=checkpoint_vision(loaded.run_config, loaded.directory).to(device),
        tokenizer=loaded.tokenizer,
        image_transform=image_transform_config(loaded.run_config),
        directory=loaded.directory,
    )


def checkpoint_stage(path: Path) -> int:
    """1 or 2: the stage of a run/checkpoint directory, of a transformers BLIP-2 directory
    (``Blip2ForImageTextRetrieval``: 1; ``Blip2ForConditionalGeneration``: 2), or of a LAVIS
    ``.pth`` (2 when it holds an LLM projection)."""
    path = Path(path)
    if _is_transformers_blip2(path):
        return 1 if _is_retrieval_model(path) else 2
    if is_lavis_file(path):
        tensors = read_torch_weights(path)
        return 2 if any(key.startswith(LAVIS_LLM_PROJECTIONS) for key in tensors) else 1
    return checkpoint.load_meta(checkpoint.resolve_checkpoint(path)).stage


# LAVIS names the stage-2 projection after its LLM family
LAVIS_LLM_PROJECTIONS = ("opt_proj.", "t5_proj.", "llm_proj.")
LAVIS_SUFFIXES = (".pth", ".pt", ".bin")
LAVIS_WORD_EMBEDDINGS = "Qformer.bert.embeddings.word_embeddings.weight"


def is_lavis_file(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix in LAVIS_SUFFIXES


def _require_lavis_stage(path: Path, stage: int) -> None:
    found = checkpoint_stage(path)
    if found != stage:
        raise CheckpointError(f"{path}: a stage-{found} LAVIS checkpoint; this needs stage {stage}")


def _check_lavis_report(path: Path, report: Any, optional: tuple[str, ...]) -> None:
    needed = [key for key in report.missing if not key.startswith(optional)]
    if needed:
        raise CheckpointError(
            f"{path}: not the LAVIS checkpoint of this model (missing {needed[:3]}, "
            f"{len(needed)} in all); its Q-Former sizes and backbones come from --config/--set"
        )


def _load_lavis_stage1(path: Path, device: torch.device, backbones: RunConfig) -> Stage1Pipeline:
    """A LAVIS stage-1 ``.pth`` (``Blip2Qformer``'s trainable weights), with the frozen vision
    encoder and the BERT tokenizer the run config names."""
    vision = build_vision_encoder(backbones.model.vision)
    tokenizer = load_qformer_tokenizer(backbones.model.bert)
    qformer_config = backbones.model.qformer_config().fitted_to_backbones(
        encoder_width=vision.hidden_size, **qformer_vocabulary(tokenizer)
    )
    model = Stage1Model(qformer_config)
    _check_lavis_report(path, load_external_weights(model, path), ("temp",))
    return Stage1Pipeline(
        model=model.to(device).eval(),
        vision=vision.to(device),
        tokenizer=tokenizer,
        image_transform=image_transform_config(backbones),
        directory=path,
    )


def _load_lavis_stage2(
    path: Path, device: torch.device, dtype: torch.dtype, backbones: RunConfig
) -> Stage2Pipeline:
    """A LAVIS stage-2 ``.pth`` (``Blip2OPT`` / ``Blip2T5``'s trainable weights), with the frozen
    vision encoder and LLM the run config names. One whose Q-Former keeps its word embeddings
    is instruction-aware (LAVIS's InstructBLIP models): it reads the prompt with ``model.bert``'s
    tokenizer."""
    vision = build_vision_encoder(backbones.model.vision, dtype=dtype)
    llm = build_language_model(backbones.model.llm, dtype=dtype)
    tensors = read_torch_weights(path)
    instruct = LAVIS_WORD_EMBEDDINGS in tensors
    vocabulary = (
        qformer_vocabulary(load_qformer_tokenizer(backbones.model.bert)) if instruct else {}
    )
    qformer_config = backbones.model.qformer_config().fitted_to_backbones(
        encoder_width=vision.hidden_size, **vocabulary
    )
    bridge = Stage2Model(qformer_config, llm.embedding_dim, instruction_aware=instruct)
    _check_lavis_report(path, import_state_dict(bridge, tensors, "lavis"), ())
    return _stage2_pipeline(backbones, vision, bridge, llm, device, path)


def _stage2_pipeline(
    run_config: RunConfig,
    vision: VisionEncoder,
    bridge: Stage2Model,
    llm: LanguageModel,
    device: torch.device,
    directory: Path,
) -> Stage2Pipeline:
    """The parts on ``device``, with the tokenizer, image settings and prompt ``run_config``
    names."""
    return Stage2Pipeline(
        vision=vision.to(device),
        bridge=bridge.to(device).eval(),
        llm=LanguageModel(llm.model.to(device), llm.family),
        tokenizer=load_llm_tokenizer(run_config.model.llm.model),
        image_transform=image_transform_config(run_config),
        directory=directory,
        prompt=run_config.generate.prompt,
        qformer_tokenizer=load_qformer_tokenizer(run_config.model.bert)
        if bridge.instruction_aware
        else None,
    )


def _is_retrieval_model(path: Path) -> bool:
    architectures = read_config_json(path).get("architectures") or []
    return any("ImageTextRetrieval" in name for name in architectures)


def _load_transformers_retrieval(path: Path, device: torch.device) -> Stage1Pipeline:
    """A transformers ``Blip2ForImageTextRetrieval`` directory (with its BERT tokenizer and
    image processor, as ``convert --to transformers`` writes it), split into our parts."""
    from transformers import Blip2Config, Blip2VisionModel

    if not _is_retrieval_model(path):
        raise CheckpointError(
            f"{path}: a transformers BLIP-2 generation model; retrieval and matching need "
            "Blip2ForImageTextRetrieval (a stage-1 model)"
        )
    config = Blip2Config.from_pretrained(path)
    tensors = read_safetensors_dir(path)
    vision_model = Blip2VisionModel(config.vision_config)
    _load_prefixed(vision_model, tensors, "vision_model.", path)
    qformer_config = dataclasses.replace(
        qformer_config_from_transformers(config), embed_dim=config.image_text_hidden_size
    )
    model = Stage1Model(qformer_config)
    report = import_state_dict(model, tensors, "transformers")
    # transformers' retrieval model has no ITG head and no ITC temperature: neither is used by
    # retrieval or matching, so they keep their initial values here
    needed = [key for key in report.missing if not key.startswith(("lm_head.", "temp"))]
    if needed:
        raise CheckpointError(f"{path}: missing BLIP-2 retrieval weights: {needed[:5]}")
    return Stage1Pipeline(
        model=model.to(device).eval(),
        vision=VisionEncoder(vision_model).to(device),
        tokenizer=AutoTokenizer.from_pretrained(path),
        image_transform=load_transform_config(str(path)),
        directory=path,
    )


@dataclass
class Stage2Pipeline:
    """Everything needed to caption or answer: frozen vision, bridge, frozen LLM, tokenizer."""

    vision: VisionEncoder
    bridge: Stage2Model
    llm: LanguageModel
    tokenizer: PreTrainedTokenizerBase
    image_transform: ImageTransformConfig  # how the model reads images (as it was trained)
    directory: Path
    prompt: str  # the prompt the model was trained with
    # an instruction-aware Q-Former's (InstructBLIP) tokenizer for the instruction; else None
    qformer_tokenizer: PreTrainedTokenizerBase | None = None


def _is_transformers_blip2(path: Path) -> bool:
    """A transformers BLIP-2 or InstructBLIP directory (not one of our checkpoints)."""
    if not (path / "config.json").is_file() or (path / checkpoint.MANIFEST).is_file():
        return False
    model_type = read_config_json(path).get("model_type")
    return model_type in BLIP2_MODEL_TYPES + INSTRUCTBLIP_MODEL_TYPES


def load_stage2(
    path: Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    backbones: RunConfig | None = None,
) -> Stage2Pipeline:
    """A stage-2 model from a run/checkpoint directory, a transformers BLIP-2 directory, or a
    LAVIS ``.pth`` with the backbones (and Q-Former sizes) ``backbones`` names (default: the
    embedded default's)."""
    path = Path(path)
    if _is_transformers_blip2(path):
        return _load_transformers_blip2(path, device, dtype)
    if is_lavis_file(path):
        _require_lavis_stage(path, 2)
        return _load_lavis_stage2(path, device, dtype, backbones or load_config(None))
    directory = checkpoint.resolve_checkpoint(path)
    saved = _checkpoint_meta(directory, stage=2)
    run_config = from_dict(RunConfig, saved.run)
    vision = checkpoint_vision(run_config, directory, dtype)
    llm = build_language_model(run_config.model.llm, dtype=dtype)
    bridge = Stage2Model(
        saved.qformer,
        saved.llm_embedding_dim,
        instruction_aware=run_config.model.instruction_aware,
    )
    _load_state(bridge, directory)
    return _stage2_pipeline(run_config, vision, bridge, llm, device, directory)


def _load_transformers_blip2(
    path: Path, device: torch.device, dtype: torch.dtype
) -> Stage2Pipeline:
    """A transformers ``Blip2ForConditionalGeneration`` or
    ``InstructBlipForConditionalGeneration`` directory, split into our parts (InstructBLIP's
    Q-Former with its text parts and its own tokenizer, ``qformer_tokenizer/``)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    instruct = read_config_json(path).get("model_type") in INSTRUCTBLIP_MODEL_TYPES
    kind = "InstructBlip" if instruct else "Blip2"
    config = getattr(transformers, f"{kind}Config").from_pretrained(path)
    tensors = read_safetensors_dir(path)
    vision_model = getattr(transformers, f"{kind}VisionModel")(config.vision_config)
    _load_prefixed(vision_model, tensors, "vision_model.", path)
    family = "decoder-only" if config.use_decoder_only_language_model else "encoder-decoder"
    llm_class = AutoModelForCausalLM if family == "decoder-only" else AutoModelForSeq2SeqLM
    language_model = llm_class.from_config(config.text_config)
    _load_prefixed(language_model, tensors, "language_model.", path)
    language_model.tie_weights()
    qformer_config = qformer_config_from_transformers(config)
    llm = LanguageModel(language_model.to(dtype).eval().requires_grad_(False), family)
    bridge = Stage2Model(qformer_config, llm.embedding_dim, instruction_aware=instruct)
    layout = "transformers-instructblip" if instruct else "transformers"
    report = import_state_dict(bridge, tensors, layout)
    if report.missing:
        raise CheckpointError(f"{path}: missing {kind} weights: {report.missing[:5]}")
    return Stage2Pipeline(
        vision=VisionEncoder(vision_model.to(dtype)).to(device),
        bridge=bridge.to(device).eval(),
        llm=LanguageModel(llm.model.to(device), family),
        tokenizer=AutoTokenizer.from_pretrained(path),
        image_transform=load_transform_config(str(path)),
        directory=path,
        prompt="",
        qformer_tokenizer=_instruction_tokenizer(path) if instruct else None,
    )


def _instruction_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """An InstructBLIP directory's Q-Former tokenizer (``InstructBlipProcessor`` saves it in
    ``qformer_tokenizer/``)."""
    folder = path / "qformer_tokenizer"
    if not folder.is_dir():
        raise CheckpointError(f"{path}: an InstructBLIP model without its qformer_tokenizer/")
    return AutoTokenizer.from_pretrained(folder)


def _load_prefixed(module: torch.nn.Module, tensors: dict, prefix: str, path: Path) -> None:
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    result = module.load_state_dict(state, strict=False)
    # Tied output embeddings are saved once; everything else must be present.
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: {prefix}* weights do not fit its config "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def load_trainable(path: Path) -> tuple[Stage1Model | Stage2Model, Path]:
    """The trainable model of a stage-1 or stage-2 checkpoint (no backbones), and its directory."""
    if is_lavis_file(Path(path)):
        raise CheckpointError(
            f"{path}: a LAVIS .pth, not a run or checkpoint directory (caption, eval-vqa, ask, "
            "match and eval-retrieval read it directly)"
        )
    directory = checkpoint.resolve_checkpoint(Path(path))
    saved = checkpoint.load_meta(directory)
    if saved.stage == 1:
        model: Stage1Model | Stage2Model = Stage1Model(saved.qformer)
    else:
        instruct = from_dict(RunConfig, saved.run).model.instruction_aware
        model = Stage2Model(saved.qformer, saved.llm_embedding_dim, instruction_aware=instruct)
    _load_state(model, directory)
    return model, directory
