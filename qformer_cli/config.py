"""Typed run configuration: dataclasses (nesting the models' own, :mod:`qformer_cli.models.config`:
Q-Former sizes, named presets, backbones), YAML files and dotted overrides.

A configuration is built in one direction: preset sizes -> YAML file -> ``--set key=value``
overrides -> validated dataclasses. Unknown keys and wrong types raise :class:`UsageError`
(exit code 2) naming the offending key, before anything expensive happens.

The YAML file is ``--config`` (a path, or a shipped config's name: ``tiny``,
``blip2_vitg_opt2.7b``), and ``configs/tiny.yaml`` without one: that file *is* the embedded
default. Every file is laid over the dataclass defaults below, which equal ``configs/tiny.yaml``
except for the stage-2 VQA mix (``data.vqa_questions`` / ``data.vqa_annotations``), which a
config of one's own must ask for (tests/test_config.py holds the two to that).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qformer_cli.embedded import configs_dir, resolve_embedded_path
from qformer_cli.errors import UsageError
from qformer_cli.models.config import BackboneConfig, QFormerConfig, qformer_preset

# auto: bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU with
# AVX-512-BF16 or AMX), else fp32 (runtime.resolve_precision); the run config records the choice.
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    preset: str = "tiny"
    qformer: dict[str, Any] = field(default_factory=dict)  # overrides on top of the preset
    vision: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(model="sample_data/backbones/vision")
    )
    llm: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(model="sample_data/backbones/opt")
    )
    bert: str = "sample_data/backbones/bert"  # Q-Former init and its tokenizer
    max_text_len: int = 32
    # Stage 2's Linear(H -> LLM hidden): normal(0, std). 0.02 as transformers initializes BLIP-2.
    # An LLM whose token embeddings are much larger (the tiny T5's rows have norm ~11) reads a
    # soft prompt of matching scale far sooner: configs/tiny_t5.yaml uses 0.1 (README: demo).
    llm_proj_init_std: float = 0.02
    # Stage 2: an instruction-aware Q-Former (InstructBLIP): each sample's prompt (the caption
    # prompt, or the formatted VQA question) is also the Q-Former's text input, beside the
    # queries (models/blip2.py Stage2Model); the Q-Former keeps its text parts for it.
    instruction_aware: bool = False

    def qformer_config(self) -> QFormerConfig:
        known = {f.name for f in dataclasses.fields(QFormerConfig)}
        for key in self.qformer:
            if key not in known:
                raise UsageError(f"unknown config key 'model.qformer.{key}'")
        return qformer_preset(self.preset, **self.qformer)


@dataclass
class DataConfig:
    root: str = ""  # the embedded default (sample_data/) when empty
    train: str = ""  # training captions: Karpathy or COCO JSON (default: the root's train split)
    image_root: str = ""  # where the JSON's image paths resolve (default: beside the JSON)
    image_size: int = 0  # 0 = the vision encoder's own image processor size
    # Stage 2 may also learn VQA answers: VQAv2 questions + annotations of the training images.
    # Off here, so that a config of one's own never mixes in the synthetic world's questions;
    # configs/tiny.yaml (used when there is no --config) turns it on: its tiny LM cannot answer
    # zero-shot from captions alone.
    vqa_questions: str = ""
    vqa_annotations: str = ""
    vqa_images: str = ""  # default: images/train beside the questions file
    vqa_prompt: str = "Question: {} Answer:"
    # Stage 2: whether the training captions (train / sources) are learned; off trains on the
    # VQA questions and instructions alone (finetune --task vqa)
    captions: bool = True
    # Stage 2: instruction data, a JSONL / CSV table with image, instruction, response (images
    # beside it), learned as the response after the instruction (finetune --task instruct)
    instructions: str = ""
    # Stage 2: captions and VQA questions given as instructions from built-in templates, several
    # per task (qformer_cli/data/instructions.py). Unset (null): off, except in
    # `finetune --task instruct`; configs/tiny.yaml turns it off there too (its tiny LM)
    instruction_templates: bool | None = None
    # Stage 1 only: a feature cache from `qformer extract-features` (the frozen encoder's outputs)
    # read instead of the images; the encoder is then not loaded at all. Excludes `augment`.
    features: str = ""
    augment: bool = False  # RandomResizedCrop(0.5-1.0) + flip, the paper's training transform
    hflip: bool = True  # part of augment; off where captions name left/right
    num_workers: int = 0
    skip_bad_samples: bool = False
    # validation (train.eval_every): a caption file of held-out images (default: the root's val
    # split), its first val_limit images (0: all)
    val: str = ""
    val_limit: int = 0
    # Several training sources, one per global batch drawn by weight (BLIP-2's practice), each
    # {"path": any --data value, "weight": 1.0}; replaces `train` (--data given twice or more
    # sets it, weights 1). See qformer_cli/data/mixture.py.
    sources: list[dict[str, Any]] = field(default_factory=list)
    # column names of a parquet file or a datasets source when not the usual ones, e.g.
    # {"image": "jpg", "caption": "alt_text", "image_id": "key"}
    columns: dict[str, str] = field(default_factory=dict)
    # which source gives each step's batch: "interleaved" (each within one batch of its weighted
    # share) or "random" (drawn by weight each step, as LAVIS does)
    mixture_order: Literal["interleaved", "random"] = "interleaved"
    # decompression-bomb guard: images declaring more pixels are bad samples; large photos
    # below it are decoded reduced (qformer_cli.data.sample.REDUCE_ABOVE_PIXELS)
    max_image_pixels: int = 256_000_000  # a 108 MP phone photo passes
    # Read webdataset shards front to back, never indexed, each DataLoader worker of each rank
    # its own files (qformer_cli/data/streams.py); runs then count train.max_steps. Off: shards
    # are indexed once (their tar headers) and shuffled as one set, like JSON files.
    streaming: bool = False
    # streamed shards: samples shuffled within a file through a buffer of this many (held
    # encoded, per source and DataLoader worker)
    shuffle_buffer: int = 1000


@dataclass
class TrainConfig:
    """Defaults: the embedded default's recipe (a few CPU minutes); configs/blip2_*.yaml hold the
    paper's (lr 1e-4, warmup 2000, cosine to 1e-5 / 5e-5)."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 50
    warmup_start_lr: float = 1e-6
    max_steps: int = 300  # 0 = run for `epochs`
    epochs: int = 1
    batch_size: int = 32
    grad_accum: int = 1
    precision: Precision = "auto"
    seed: int = 42
    deterministic: bool = False  # bitwise-reproducible kernels (slower; exact resume checks)
    # torch.compile the objective (the Q-Former passes and losses): minutes of compilation once,
    # then fused elementwise work; bf16 stage-1 steps ran 1.58x faster on an H100 (BENCHMARKS.md)
    compile: bool = False
    # Stage 2, for LLMs too big to hold whole on every process (qformer_cli/train/sharding.py):
    fsdp: bool = False  # shard the frozen LLM's weights across processes with FSDP2 (torchrun)
    activation_checkpointing: bool = False  # recompute LLM block activations in backward
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 2
    # Validation on data.val every N steps and at the last step (0: none); the checkpoint with
    # the highest keep_best_by is kept as checkpoints/best ("": val_r_mean for stage 1,
    # val_cider for stage 2). See qformer_cli/train/validation.py.
    eval_every: int = 0
    keep_best_by: str = ""
    # train under a --precision this CPU runs far slower than fp32 (refused by default)
    allow_slow_precision: bool = False
    # the image id of every sample trained on, per step, in <out>/sample_ids.rank<R>.txt (which
    # samples each rank saw: coverage across ranks, the same samples after a resume)
    log_sample_ids: bool = False
    max_nonfinite_steps: int = 5  # this many non-finite steps in a row stop the run; 0: never
    # The vision encoder trains too when vision_lr > 0 (the paper's fine-tuning): held in fp32,
    # its peak learning rate vision_lr on lr's warmup + cosine schedule, saved with each
    # checkpoint (vision.safetensors). 0: frozen. Unset (null): frozen in pre-training, the
    # task's default in `finetune` (train/finetune.py).
    vision_lr: float | None = None
    # Layer-wise decay of vision_lr: block i of L gets vision_lr * decay^(L - i), the patch
    # embeddings decay^(L + 1) (LAVIS's retrieval fine-tuning: 0.95; 1: none)
    vision_layer_decay: float = 1.0
    # recompute the vision encoder's block activations in backward (less memory, more time)
    vision_checkpointing: bool = False

    @property
    def trains_vision(self) -> bool:
        return bool(self.vision_lr)


@dataclass
class GenerationConfig:
    """How text is generated: the one set of settings behind ``caption`` (section ``generate``,
    also the prompt stage 2 trains with), ``eval-vqa`` (section ``vqa``), the onnxruntime
    backend and the settings an ONNX export records. ``prompt`` is the text after the soft
    prompt; for VQA a template with ``{}`` for the question, or ``answer`` / ``short-answer``."""

    prompt: str = "a photo of"
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int | None = None  # with do_sample: the same samples every run (None: fresh ones)

    def decoding(self) -> dict[str, Any]:
        """Every setting but the prompt (what an export records as its decoding settings)."""
        return {key: value for key, value in asdict(self).items() if key != "prompt"}


def vqa_generation() -> GenerationConfig:
    """BLIP-2's zero-shot VQA decoding (LAVIS): 5 beams, short answers, length penalty -1."""
    return GenerationConfig(
        prompt="answer", num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0
    )


FROM_PRESET = "preset"

# Stage 1's objective as LAVIS 1.0.2's Blip2Qformer: with these the losses and gradients equal
# LAVIS's on the same weights and inputs (README "Stage 1 as LAVIS",
# tests/train/test_lavis_parity.py).
LAVIS_STAGE1: dict[str, Any] = {
    "itc_gradient": "lavis",
    "itm_negatives": "lavis",
    "temperature_clamp": None,
    "head_init": "lavis",
}

# Stage 1's objective per model preset (``stage1.*: preset`` takes these).
STAGE1_PRESETS: dict[str, dict[str, Any]] = {
    "blip2": LAVIS_STAGE1,
    # LAVIS's too: it learned better on the synthetic world than the earlier recipe (full ITC
    # gradient, distinct negatives, BLIP's clamp, normal(0, 0.02) heads). Demo recipe, 300 steps,
    # eval-retrieval --k 8, seeds 42 / 7, ITC-only R@1 image->text 32.0 / 26.0 vs 23.0 / 23.3,
    # text->image 24.7 / 25.0 vs 19.9 / 15.4 (README). The templated captions' duplicates, which
    # LAVIS may draw as ITM negatives (0.5 rows per batch of 32), did not hurt: with distinct
    # negatives instead the same run gave 31.3 / 25.7. Through stage 2 the earlier recipe answered
    # VQA better on both seeds measured (README "What make demo shows"): a trade-off still open.
    "tiny": LAVIS_STAGE1,
}


@dataclass
class Stage1Config:
    """Stage 1's objective choices where implementations differ; ``preset`` (the default) takes
    the model preset's (``STAGE1_PRESETS``), and the saved run config records the resolved value.

    ``itc_gradient``: ``lavis`` (the gathered side of the ITC similarity a constant, as LAVIS)
    or ``full`` (gradient through both sides, as open_clip). ``itm_negatives``: ``lavis``
    (softmax + 1e-4, only the positive excluded) or ``distinct`` (no sample of the same image or
    the same caption text). ``temperature_clamp``: ``[low, high]`` for the ITC temperature, or
    null for none (LAVIS BLIP-2). ``head_init``: the vision/text projections and ITM head as
    torch's default ``nn.Linear`` init (``lavis``) or normal(0, initializer_range) with zero bias.

    Two additions to BLIP-2's objective, off by default (every preset): ``itm_weight`` scales
    the ITM loss in the sum (BLIP-2: 1, an unweighted sum); ``itm_negative_warmup`` N draws a
    share of the ITM negatives uniformly among the candidates instead of by ITC similarity, all
    of them at step 0 falling linearly to none at step N (BLIP-2: 0, by similarity from the
    start), so that ITM first learns from easy negatives (README "What make demo shows").
    A third, also off by default: ``itm_hard_negatives``, a file of captions with a hard
    negative (SugarCrepe's layout, as ``eval-retrieval --hard-negatives`` reads), from which a
    training caption listed there gives its image's ITM negative text: the listed negative
    instead of one drawn from the batch (NegCLIP-style; BLIP-2 draws every one from the batch).
    """

    itc_gradient: Literal["preset", "lavis", "full"] = FROM_PRESET
    itm_negatives: Literal["preset", "lavis", "distinct"] = FROM_PRESET
    temperature_clamp: list[float] | Literal["preset"] | None = FROM_PRESET
    head_init: Literal["preset", "lavis", "normal"] = FROM_PRESET
    itm_weight: float = 1.0
    itm_negative_warmup: int = 0
    itm_hard_negatives: str = ""

    def __post_init__(self) -> None:
        if self.itm_weight <= 0:
            raise UsageError(f"config key 'stage1.itm_weight' must be > 0, got {self.itm_weight}")
        if self.itm_negative_warmup < 0:
            raise UsageError(
                f"config key 'stage1.itm_negative_warmup' must be >= 0, got "
                f"{self.itm_negative_warmup}"
            )
        clamp = self.temperature_clamp
        if isinstance(clamp, list) and not (len(clamp) == 2 and 0 < clamp[0] < clamp[1]):
            raise UsageError(
                f"config key 'stage1.temperature_clamp': expected null or [low, high] with "
                f"0 < low < high, got {clamp!r}"
            )

    def resolved(self, preset: str) -> Stage1Config:
        """Every ``preset`` field replaced by the model preset's choice."""
        if preset not in STAGE1_PRESETS:
            raise UsageError(
                f"unknown Q-Former preset {preset!r} (known: {', '.join(STAGE1_PRESETS)})"
            )
        values = {
            name: STAGE1_PRESETS[preset][name] if value == FROM_PRESET else value
            for name, value in asdict(self).items()
        }
        return Stage1Config(**values)

    @property
    def temperature_range(self) -> tuple[float, float] | None:
        """The clamp as ``itc_loss`` takes it (None: unclamped)."""
        clamp = self.temperature_clamp
        if clamp == FROM_PRESET:
            raise ValueError("stage1.temperature_clamp is unresolved (call resolved(preset))")
        return None if clamp is None else (clamp[0], clamp[1])


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: ``low``/``high`` inclusive (None: unbounded);
    ``above`` a bound the value must exceed."""

    low: float | None = None
    high: float | None = None
    above: float | None = None

    def admits(self, value: float) -> bool:
        return (
            (self.low is None or value >= self.low)
            and (self.high is None or value <= self.high)
            and (self.above is None or value > self.above)
        )

    def __str__(self) -> str:
        parts = [f">= {self.low:g}"] if self.low is not None else []
        parts += [f"> {self.above:g}"] if self.above is not None else []
        parts += [f"<= {self.high:g}"] if self.high is not None else []
        return " and ".join(parts)


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(low=0), Range(low=1), Range(above=0)
# Checked whenever a config is built (file, --set, the commands' flags), before any model loads.
RANGES: dict[type, dict[str, Range]] = {
    TrainConfig: {
        "lr": POSITIVE,
        "min_lr": AT_LEAST_0,
        "weight_decay": AT_LEAST_0,
        "warmup_steps": AT_LEAST_0,
        "warmup_start_lr": AT_LEAST_0,
        "max_steps": AT_LEAST_0,
        "epochs": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "log_every": AT_LEAST_1,
        "save_every": AT_LEAST_0,
        "eval_every": AT_LEAST_0,
        "keep_last": AT_LEAST_1,
        "max_nonfinite_steps": AT_LEAST_0,
        "vision_lr": AT_LEAST_0,
        "vision_layer_decay": Range(high=1, above=0),
    },
    BackboneConfig: {"layer": Range(high=-1)},  # counted from the last: -1, -2, ...
    DataConfig: {
        "num_workers": AT_LEAST_0,
        "max_image_pixels": AT_LEAST_1,
        "val_limit": AT_LEAST_0,
        "shuffle_buffer": AT_LEAST_0,
    },
    GenerationConfig: {
        "num_beams": AT_LEAST_1,
        "max_new_tokens": AT_LEAST_1,
        "min_new_tokens": AT_LEAST_0,
        "repetition_penalty": POSITIVE,
        "top_p": Range(high=1, above=0),
        "temperature": POSITIVE,
    },
}


def check_ranges(settings: Any, prefix: str) -> None:
    """Refuse a numeric setting of ``settings`` outside its :data:`RANGES` entry, naming its key
    (``prefix.name``); for generation also ``min_new_tokens <= max_new_tokens``."""
    for name, allowed in RANGES.get(type(settings), {}).items():
        value = getattr(settings, name)
        if value is not None and not allowed.admits(value):
            raise UsageError(f"{prefix}.{name} = {shown_value(value)}: must be {allowed}")
    if isinstance(settings, GenerationConfig) and settings.min_new_tokens > settings.max_new_tokens:
        raise UsageError(
            f"{prefix}.min_new_tokens = {settings.min_new_tokens}: more than "
            f"{prefix}.max_new_tokens = {settings.max_new_tokens}"
        )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerationConfig = field(default_factory=GenerationConfig)
    vqa: GenerationConfig = field(default_factory=vqa_generation)
    stage1: Stage1Config = field(default_factory=Stage1Config)

    def __post_init__(self) -> None:
        self.stage1 = self.stage1.resolved(self.model.preset)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _SafeLoader(yaml.SafeLoader):
    """Safe YAML loading that also reads ``1e-4`` as a float (plain YAML 1.1 says string)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)

# --------------------------------------------------------------------------------------------
# Validation: plain dicts (from YAML and overrides) -> dataclasses, with one-line errors.


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` if it matches the type hint (ints are accepted for floats), else raise."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            raise UsageError(f"config key '{key}': {shown_value(value)} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, key)
            except UsageError:
                continue
        raise UsageError(
            f"config key '{key}': expected {_type_name(hint)}, got {shown_value(value)}"
        )
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise UsageError(f"config key '{key}': expected a list, got {shown_value(value)}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [_check_value(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}': expected a mapping, got {shown_value(value)}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is type(None) and value is None:
        return None
    if (
        isinstance(hint, type)
        and isinstance(value, hint)
        and not (hint is int and isinstance(value, bool))
    ):
        return value
    raise UsageError(f"config key '{key}': expected {_type_name(hint)}, got {shown_value(value)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UsageError(f"config section '{prefix or '.'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise UsageError(
                f"unknown config key '{where}' (known here: {', '.join(sorted(known))})"
            )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            # A partial section overrides the parent's default for it, not the section class's
            # own defaults: `model.vision.config.x=1` keeps model.vision.model.
            values[name] = from_dict(hint, _merged(_field_default(fields[name]), value), key)
        else:
            values[name] = _check_value(value, hint, key)
    built = cls(**values)
    check_ranges(built, prefix)
    return built


def _field_default(spec: dataclasses.Field) -> dict[str, Any]:
    if spec.default_factory is not dataclasses.MISSING:
        return asdict(spec.default_factory())
    if spec.default is not dataclasses.MISSING and dataclasses.is_dataclass(spec.default):
        return asdict(spec.default)
    return {}


def _merged(base: dict[str, Any], update: Any) -> Any:
    """``update`` laid over ``base``, section by section (non-mappings replace)."""
    if not isinstance(update, dict):
        return update
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        merged[key] = _merged(old, value) if isinstance(old, dict) else value
    return merged


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected key=value, e.g. train.lr=2e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"--set {text!r}: empty key component")
    try:
        value = yaml.load(raw, Loader=_SafeLoader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {text!r}: cannot parse value ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    for text in overrides:
        parts, value = _parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few kB; a larger file is not one (and YAML
# parsing in Python would take a minute per 100 MB before saying so)
MAX_SHOWN_VALUE = 60


def shown_value(value: Any) -> str:
    """``repr(value)`` for a one-line message, cut to MAX_SHOWN_VALUE characters."""
    text = repr(value)
    if len(text) <= MAX_SHOWN_VALUE:
        return text
    return f"{text[:MAX_SHOWN_VALUE]}... ({len(text):,} characters)"


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config with the safe loader (no Python objects)."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UsageError(f"{path}: {size:,} bytes, not a run config (at most 1 MiB)")
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config file must be a mapping of sections")
    return data


def settings_for_command(data: dict[str, Any], command: str | None) -> dict[str, Any]:
    """A config file's settings as ``command`` reads them: its ``per_command`` section for that
    command (e.g. ``per_command: {pretrain-stage2: {train: {lr: 5.0e-4}}}``) laid over the
    rest; ``command`` None (library use) takes the rest alone. Every command's section is
    checked here, so that a wrong key under one is refused whichever command runs."""
    data = dict(data)
    sections = data.pop(PER_COMMAND, None)
    if not sections:
        return data
    if not isinstance(sections, dict):
        raise UsageError(f"config section '{PER_COMMAND}' must map command names to sections")
    from_dict(RunConfig, data)  # the shared settings first, so that their errors name them
    for name, section in sections.items():
        if name not in CONFIG_COMMANDS:
            raise UsageError(
                f"config section '{PER_COMMAND}.{name}': not a command that reads --config "
                f"({', '.join(CONFIG_COMMANDS)})"
            )
        if not isinstance(section, dict):
            raise UsageError(f"config section '{PER_COMMAND}.{name}' must be a mapping")
        try:
            from_dict(RunConfig, _merged(data, section))
        except UsageError as error:
            raise UsageError(f"config section '{PER_COMMAND}.{name}': {error}") from None
    return _merged(data, sections.get(command, {}))


DEFAULT_CONFIG = "tiny"  # with no --config: configs/tiny.yaml, the embedded default's recipe


def shipped_config_names() -> list[str]:
    return sorted(path.stem for path in configs_dir().glob("*.yaml"))


def resolve_config_path(config: str | Path) -> Path:
    """``--config``: a YAML file (a path as given; ``configs/...`` also finds the shipped copy
    from any directory) or a shipped config's name (``tiny``, ``blip2_vitg_opt2.7b.yaml``)."""
    path = resolve_embedded_path(str(config))
    if path.is_file():
        return path
    name = Path(config).name.removesuffix(".yaml")
    shipped = configs_dir() / f"{name}.yaml"
    if str(config) in (name, f"{name}.yaml") and shipped.is_file():
        return shipped
    problem = "is a directory" if path.is_dir() else "no such config file"
    raise UsageError(
        f"{config}: {problem} (or give a shipped config by name: "
        f"{', '.join(shipped_config_names())})"
    )


# The commands that read --config. A config file's `per_command` section may give any of them
# settings of its own (tests/test_config.py checks this list against the command line).
CONFIG_COMMANDS = (
    "pretrain-stage1",
    "pretrain-stage2",
    "finetune",
    "extract-features",
    "caption",
    "eval-caption",
    "eval-vqa",
    "ask",
    "match",
    "eval-retrieval",
    "info",
)
PER_COMMAND = "per_command"


def load_config(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    command: str | None = None,
) -> RunConfig:
    """The one way to build a :class:`RunConfig`: defaults <- YAML file (``configs/tiny.yaml``
    when ``config`` is None) <- the file's ``per_command`` settings for ``command`` <- ``--set``
    overrides."""
    path = resolve_config_path(DEFAULT_CONFIG if config is None else config)
    data = load_yaml(path)
    if isinstance(data, dict) and "stage" in data and "run" in data:
        # A checkpoint's config.json (CheckpointMeta: stage, sizes, the run config it was trained
        # with), not a run's run_config.json.
        raise UsageError(
            f"{path}: the config of a stage-{data['stage']} checkpoint, not a run config "
            "(continue that run with --resume DIR, or start from it with pretrain-stage2 --init)"
        )
    data = settings_for_command(data, command)
    data = apply_overrides(data, overrides or [])
    run_config = from_dict(RunConfig, data)
    run_config.model.qformer_config()  # validate the Q-Former overrides now, not mid-run
    return run_config
