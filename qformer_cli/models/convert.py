"""State-dict maps between this package's BLIP-2 models and the checkpoints people already have.

Three external layouts are understood:

* ``transformers`` -- ``Blip2QFormerModel``, ``Blip2ForConditionalGeneration`` and
  ``Blip2ForImageTextRetrieval`` ``save_pretrained`` directories (safetensors);
* ``lavis`` -- Salesforce LAVIS ``{"model": state_dict}`` ``.pth`` files;
* ``bert`` -- a BERT checkpoint directory, to initialize a stage-1 Q-Former as BLIP-2 does
  (embeddings, self-attention and FFN from BERT; the FFN copied into the query FFN too;
  cross-attention and queries left at random init).

Each layout is a list of regex rules from *our* parameter names to the external ones. Loading
walks our parameters, so every parameter is either found or reported missing, and every external
tensor is either consumed, known to be irrelevant (frozen backbones, tied aliases), or reported
as unexpected. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from qformer_cli.errors import CheckpointError, first_line
from qformer_cli.models.blip2 import Stage1Model, Stage2Model
from qformer_cli.models.config import QFormerConfig
from qformer_cli.models.qformer import QFormer

Layout = Literal[
    "transformers", "transformers-qformer", "transformers-instructblip", "lavis", "bert"
]

_LAYER = r"qformer\.layers\.(\d+)\."

# Per-layer names shared by the three BERT-derived layouts: (ours, transformers, lavis/bert).
_LAYER_PARTS: list[tuple[str, str, str]] = [
    ("self_attention.attention.", "attention.attention.", "attention.self."),
    ("self_attention.out_proj.", "attention.output.dense.", "attention.output.dense."),
    ("self_attention.layer_norm.", "attention.output.LayerNorm.", "attention.output.LayerNorm."),
    ("cross_attention.attention.", "crossattention.attention.", "crossattention.self."),
    ("cross_attention.out_proj.", "crossattention.output.dense.", "crossattention.output.dense."),
    (
        "cross_attention.layer_norm.",
        "crossattention.output.LayerNorm.",
        "crossattention.output.LayerNorm.",
    ),
    ("query_ffn.fc_in.", "intermediate_query.dense.", "intermediate_query.dense."),
    ("query_ffn.fc_out.", "output_query.dense.", "output_query.dense."),
    ("query_ffn.layer_norm.", "output_query.LayerNorm.", "output_query.LayerNorm."),
    ("text_ffn.fc_in.", "intermediate.dense.", "intermediate.dense."),
    ("text_ffn.fc_out.", "output.dense.", "output.dense."),
    ("text_ffn.layer_norm.", "output.LayerNorm.", "output.LayerNorm."),
]


def _layer_rules(column: int, prefix: str) -> list[tuple[str, str]]:
    return [
        (_LAYER + re.escape(parts[0]), prefix + r"\1." + parts[column]) for parts in _LAYER_PARTS
    ]


_TRANSFORMERS_RULES: list[tuple[str, str | None]] = [
    (r"qformer\.query_tokens$", "query_tokens"),
    (r"qformer\.ln_vision\.", "vision_model.post_layernorm."),
    (r"qformer\.word_embeddings\.", "embeddings.word_embeddings."),
    (r"qformer\.position_embeddings\.", "embeddings.position_embeddings."),
    (r"qformer\.embed_layer_norm\.", "qformer.layernorm."),
    *_layer_rules(1, "qformer.encoder.layer."),
    (r"vision_proj\.", "vision_projection."),
    (r"text_proj\.", "text_projection."),
    (r"itm_head\.", "itm_head."),
    (r"llm_proj\.", "language_projection."),
    (r"temp$", None),  # transformers has no ITC temperature or Q-Former LM head
    (r"lm_head\.", None),
]

# transformers' InstructBLIP: the Q-Former's text embeddings and their LayerNorm (which also
# normalizes the queries) live under qformer.embeddings; everything else as in BLIP-2.
_INSTRUCTBLIP_EMBEDDINGS = {
    r"qformer\.word_embeddings\.": "qformer.embeddings.word_embeddings.",
    r"qformer\.position_embeddings\.": "qformer.embeddings.position_embeddings.",
    r"qformer\.embed_layer_norm\.": "qformer.embeddings.layernorm.",
}
_INSTRUCTBLIP_RULES = [
    (ours, _INSTRUCTBLIP_EMBEDDINGS.get(ours, theirs)) for ours, theirs in _TRANSFORMERS_RULES
]

_LAVIS_RULES: list[tuple[str, str | None]] = [
    (r"qformer\.query_tokens$", "query_tokens"),
    (r"qformer\.ln_vision\.", "ln_vision."),
    (r"qformer\.word_embeddings\.", "Qformer.bert.embeddings.word_embeddings."),
    (r"qformer\.position_embeddings\.", "Qformer.bert.embeddings.position_embeddings."),
    (r"qformer\.embed_layer_norm\.", "Qformer.bert.embeddings.LayerNorm."),
    *_layer_rules(2, "Qformer.bert.encoder.layer."),
    (r"vision_proj\.", "vision_proj."),
    (r"text_proj\.", "text_proj."),
    (r"itm_head\.", "itm_head."),
    (r"temp$", "temp"),
    (r"lm_head\.dense\.", "Qformer.cls.predictions.transform.dense."),
    (r"lm_head\.layer_norm\.", "Qformer.cls.predictions.transform.LayerNorm."),
    (r"lm_head\.bias$", "Qformer.cls.predictions.bias"),
    (r"llm_proj\.", "opt_proj."),  # FlanT5 checkpoints: t5_proj, handled by _LAVIS_ALIASES
]

# BERT init: the BERT FFN goes into both the text FFN and the query FFN (BLIP-2's init).
_BERT_RULES: list[tuple[str, str | None]] = [
    (r"qformer\.word_embeddings\.", "bert.embeddings.word_embeddings."),
    (r"qformer\.position_embeddings\.", "bert.embeddings.position_embeddings."),
    (r"qformer\.embed_layer_norm\.", "bert.embeddings.LayerNorm."),
    (_LAYER + r"self_attention\.attention\.", r"bert.encoder.layer.\1.attention.self."),
    (_LAYER + r"self_attention\.out_proj\.", r"bert.encoder.layer.\1.attention.output.dense."),
    (
        _LAYER + r"self_attention\.layer_norm\.",
        r"bert.encoder.layer.\1.attention.output.LayerNorm.",
    ),
    (_LAYER + r"(?:query|text)_ffn\.fc_in\.", r"bert.encoder.layer.\1.intermediate.dense."),
    (_LAYER + r"(?:query|text)_ffn\.fc_out\.", r"bert.encoder.layer.\1.output.dense."),
    (_LAYER + r"(?:query|text)_ffn\.layer_norm\.", r"bert.encoder.layer.\1.output.LayerNorm."),
    (r"lm_head\.dense\.", "cls.predictions.transform.dense."),
    (r"lm_head\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
    (r"lm_head\.bias$", "cls.predictions.bias"),
    # Not in BERT: left at their random init (and reported as missing).
    (r"qformer\.(query_tokens|ln_vision\.)", None),
    (_LAYER + r"cross_attention\.", None),
    (r"(vision_proj|text_proj|itm_head|llm_proj)\.|temp$", None),
]

_RULES: dict[str, list[tuple[str, str | None]]] = {
    "transformers": _TRANSFORMERS_RULES,
    "transformers-instructblip": _INSTRUCTBLIP_RULES,
    "lavis": _LAVIS_RULES,
    "bert": _BERT_RULES,
}

# External tensors that are known and deliberately not loaded into the trainable model.
_IGNORED: dict[str, list[str]] = {
    "transformers": [
        r"vision_model\.(?!post_layernorm\.)",  # the frozen vision encoder (loaded separately)
        r"language_model\.",  # the frozen LLM (loaded separately)
        r"embeddings\.position_ids$",
    ],
    "transformers-instructblip": [
        r"vision_model\.(?!post_layernorm\.)",
        r"language_model\.",
        r"qformer\.embeddings\.position_ids$",
    ],
    "lavis": [
        r"visual_encoder\.",
        r"(opt|t5)_model\.",
        r"Qformer\.cls\.predictions\.decoder\.weight$",  # tied to the word embeddings
        r"Qformer\.cls\.predictions\.decoder\.bias$",  # alias of predictions.bias
        r"Qformer\.bert\.embeddings\.position_ids$",
    ],
    "bert": [
        r"(bert\.)?embeddings\.token_type_embeddings\.",  # BLIP-2 uses no token types
        r"(bert\.)?embeddings\.position_ids$",
        r"(bert\.)?pooler\.",
        r"cls\.predictions\.decoder\.",  # tied to the word embeddings
        r"cls\.seq_relationship\.",
    ],
}

# Ours -> accepted alternatives, tried when the first external name is absent.
_LAVIS_ALIASES = {"opt_proj.": "t5_proj."}


@dataclass
class LoadReport:
    """What a weight import did, by parameter name."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ours, not found in the source
    unexpected: list[str] = field(default_factory=list)  # source keys nothing maps to
    ignored: list[str] = field(default_factory=list)  # source keys irrelevant by design
    resized: list[str] = field(default_factory=list)  # rows copied into a larger table

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.missing:
            parts.append(f"missing (left at init): {_preview(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (not loaded): {_preview(self.unexpected)}")
        if self.resized:
            parts.append(f"resized: {_preview(self.resized)}")
        return "; ".join(parts)


def _preview(names: list[str], limit: int = 8) -> str:
    head = ", ".join(names[:limit])
    return head + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def external_name(our_key: str, layout: str) -> str | None:
    """The external name of one of our parameters, or None where the layout has no such tensor."""
    for pattern, replacement in _RULES[layout]:
        match = re.match(pattern, our_key)
        if match:
            if replacement is None:
                return None
            return match.expand(replacement) + our_key[match.end() :]
    raise KeyError(f"no {layout} name for parameter {our_key!r}")


def _lookup(source: dict[str, torch.Tensor], name: str, layout: str) -> str | None:
    if name in source:
        return name
    if layout == "lavis":
        for ours, theirs in _LAVIS_ALIASES.items():
            if name.startswith(ours) and theirs + name[len(ours) :] in source:
                return theirs + name[len(ours) :]
    if layout == "bert" and name.startswith("bert.") and name[5:] in source:
        return name[5:]  # a bare BertModel checkpoint has no "bert." prefix
    return None


def _copy_into(target: torch.Tensor, value: torch.Tensor, key: str, report: LoadReport) -> None:
    if target.shape == value.shape:
        target.copy_(value)
        return
    # Vocabulary or position tables may be larger here (e.g. [DEC] added to BERT's vocabulary):
    # copy the rows the source has, keep the rest at init.
    grows_rows = target.dim() == value.dim() and target.shape[1:] == value.shape[1:]
    if grows_rows and value.shape[0] < target.shape[0]:
        target[: value.shape[0]].copy_(value)
        report.resized.append(f"{key} {tuple(value.shape)}->{tuple(target.shape)}")
        return
    raise CheckpointError(
        f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(target.shape)} in the model "
        "(does the model config match the checkpoint?)"
    )


@torch.no_grad()
def import_state_dict(
    model: nn.Module, source: dict[str, torch.Tensor], layout: str, *, prefix: str = ""
) -> LoadReport:
    """Copy ``source`` (external names) into ``model``; ``prefix`` is the model's own name prefix
    within a BLIP-2 model (``"qformer."`` to load a bare :class:`QFormer`)."""
    report = LoadReport()
    consumed: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        full_key = prefix + key
        name = external_name(full_key, layout)
        found = None if name is None else _lookup(source, name, layout)
        if found is None:
            report.missing.append(full_key)
            continue
        _copy_into(tensor.data, source[found].to(tensor.dtype), full_key, report)
        consumed.add(found)
        report.loaded.append(full_key)
    for name in source:
        if name in consumed:
            continue
        if any(re.match(pattern, name) for pattern in _IGNORED[layout]):
            report.ignored.append(name)
        else:
            report.unexpected.append(name)
    return report


def export_state_dict(
    model: nn.Module, layout: str, *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Our parameters under external names (those the layout has)."""
    exported = {}
    for key, tensor in model.state_dict().items():
        name = external_name(prefix + key, layout)
        if name is not None:
            exported[name] = tensor.detach().clone()
    return exported


# --------------------------------------------------------------------------------------------
# Reading checkpoint files safely (safetensors, or torch.load with weights_only=True).


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` directory (single file or sharded index)."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(_load_safetensors(directory / shard))
        return tensors
    raise CheckpointError(f"{directory}: no model.safetensors (or sharded index) found")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.bin`` of tensors only: pickled code is refused, never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = first_line(exc)
        raise CheckpointError(
            f"{path}: refused to load (only plain tensors are accepted: {reason})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # LAVIS wraps the weights as {"model": state_dict, ...}
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory}: no config.json (not a save_pretrained directory)"
        ) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON (line {exc.lineno}: {exc.msg})") from None


# model_type of a full transformers BLIP-2 config (Blip2Model, Blip2ForConditionalGeneration)
BLIP2_MODEL_TYPES = ("blip-2", "blip_2")
INSTRUCTBLIP_MODEL_TYPES = ("instructblip",)


def _source_prefix(config: dict, directory: Path) -> str:
    """What to put before a transformers BLIP-2 directory's keys to get full BLIP-2 names."""
    model_type = config.get("model_type")
    if model_type == "blip_2_qformer":
        return "qformer."  # a bare Blip2QFormerModel: "encoder.layer..." -> "qformer.encoder..."
    if model_type in BLIP2_MODEL_TYPES:
        return ""
    raise CheckpointError(
        f"{directory}: not a BLIP-2 or BERT checkpoint (model_type {model_type!r})"
    )


def read_external_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors and layout of a transformers BLIP-2 or BERT directory, or a LAVIS ``.pth``."""
    path = Path(path)
    if path.is_dir():
        config = read_config_json(path)
        tensors = read_safetensors_dir(path)
        if config.get("model_type") == "bert":
            return tensors, "bert"
        prefix = _source_prefix(config, path)
        return {prefix + key: value for key, value in tensors.items()}, "transformers"
    if path.suffix in (".pth", ".pt", ".bin"):
        return read_torch_weights(path), "lavis"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: unknown weight format (expected a transformers/BERT directory or a LAVIS .pth)"
    )


def load_external_weights(model: nn.Module, path: Path, *, prefix: str = "") -> LoadReport:
    """Load a transformers BLIP-2 / LAVIS / BERT checkpoint into ``model`` and report by name."""
    tensors, layout = read_external_weights(path)
    return import_state_dict(model, tensors, layout, prefix=prefix)


# --------------------------------------------------------------------------------------------
# Writing transformers checkpoints.


def transformers_qformer_config(config: QFormerConfig, *, with_text: bool) -> dict:
    """Our Q-Former sizes as ``Blip2QFormerConfig`` keyword arguments."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "cross_attention_frequency": config.cross_attention_freq,
        "encoder_hidden_size": config.encoder_width,
        "use_qformer_text_input": with_text,
    }


def qformer_config_from_transformers(blip2_config: Any) -> QFormerConfig:
    """A transformers ``Blip2Config``'s Q-Former sizes as ours: the inverse of
    :func:`transformers_qformer_config` (plus the query count and ``ln_vision``'s epsilon, which
    transformers keeps on the outer config and the vision config)."""
    qformer = blip2_config.qformer_config
    return QFormerConfig(
        hidden_size=qformer.hidden_size,
        num_layers=qformer.num_hidden_layers,
        num_heads=qformer.num_attention_heads,
        intermediate_size=qformer.intermediate_size,
        num_query_tokens=blip2_config.num_query_tokens,
        encoder_width=qformer.encoder_hidden_size,
        cross_attention_freq=qformer.cross_attention_frequency,
        vocab_size=qformer.vocab_size,
        max_position_embeddings=qformer.max_position_embeddings,
        layer_norm_eps=qformer.layer_norm_eps,
        vision_layer_norm_eps=blip2_config.vision_config.layer_norm_eps,
    )


def _load_exactly(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{what}: missing {_preview(result.missing_keys)}; "
            f"unexpected {_preview(result.unexpected_keys)}"
        )


def save_transformers_qformer(qformer: QFormer, directory: Path) -> None:
    """Write ``qformer`` as a transformers ``Blip2QFormerModel`` ``save_pretrained`` directory."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    hf_config = Blip2QFormerConfig(
        **transformers_qformer_config(qformer.config, with_text=qformer.with_text)
    )
    hf_model = Blip2QFormerModel(hf_config)
    exported = export_state_dict(qformer, "transformers", prefix="qformer.")
    state = {k[len("qformer.") :]: v for k, v in exported.items() if k.startswith("qformer.")}
    _load_exactly(hf_model, state, "Blip2QFormerModel export")
    hf_model.save_pretrained(directory)


def save_transformers_blip2(
    model: Stage1Model | Stage2Model,
    vision_model: nn.Module,
    directory: Path,
    language_model: nn.Module | None = None,
    image_token_index: int | None = None,
) -> None:
    """Write a full transformers BLIP-2 directory: ``Blip2ForImageTextRetrieval`` for a stage-1
    model, ``Blip2ForConditionalGeneration`` for a stage-2 one (with its frozen LLM),
    ``InstructBlipForConditionalGeneration`` for an instruction-aware stage-2 one.

    transformers' BLIP-2 vision tower is ``Blip2VisionModel`` (EVA ViT-g style); its
    ``post_layernorm`` is our trainable ``ln_vision``.
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2VisionModel,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    if not isinstance(vision_model, Blip2VisionModel):
        raise CheckpointError(
            "transformers BLIP-2 checkpoints need a Blip2VisionModel vision encoder, "
            f"not {type(vision_model).__name__}"
        )
    is_stage1 = isinstance(model, Stage1Model)
    instruct = isinstance(model, Stage2Model) and model.instruction_aware
    qformer_config = transformers_qformer_config(model.config, with_text=is_stage1 or instruct)
    vision_config = vision_model.config.to_dict()
    if instruct:  # the same tower under InstructBLIP's config class
        vision_config.pop("model_type", None)
    config_kwargs = {
        "vision_config": vision_config,
        "qformer_config": qformer_config,
        "num_query_tokens": model.config.num_query_tokens,
    }
    state = export_state_dict(model, "transformers-instructblip" if instruct else "transformers")
    for key, value in vision_model.state_dict().items():
        if not key.startswith("post_layernorm."):
            state[f"vision_model.{key}"] = value
    if is_stage1:
        config_kwargs["image_text_hidden_size"] = model.config.embed_dim
        hf_model = Blip2ForImageTextRetrieval(Blip2Config(**config_kwargs))
    else:
        if language_model is None:
            raise CheckpointError("a stage-2 export needs its language model")
        config_kwargs["text_config"] = language_model.config.to_dict()
        config_kwargs["image_token_index"] = image_token_index
        if instruct:
            hf_model = InstructBlipForConditionalGeneration(InstructBlipConfig(**config_kwargs))
        else:
            hf_model = Blip2ForConditionalGeneration(Blip2Config(**config_kwargs))
        for key, value in language_model.state_dict().items():
            state[f"language_model.{key}"] = value
    _load_exactly(hf_model, state, f"{type(hf_model).__name__} export")
    hf_model.save_pretrained(directory)


def save_lavis(model: Stage1Model | Stage2Model, path: Path) -> None:
    """Write LAVIS's ``{"model": state_dict}`` layout (trainable parameters only, as LAVIS saves;
    the LM head's decoder is tied to the word embeddings and written under both names)."""
    state = export_state_dict(model, "lavis")
    if "Qformer.cls.predictions.bias" in state:
        state["Qformer.cls.predictions.decoder.weight"] = state[
            "Qformer.bert.embeddings.word_embeddings.weight"
        ]
        state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
