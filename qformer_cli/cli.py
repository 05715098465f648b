"""The ``qformer`` command line: parse options, build the config, call one function, print.

Conventions shared by every subcommand: ``--config FILE`` and repeatable ``--set key=value``;
``--json`` prints the final result as one JSON object on stdout (tables and progress go to
stderr then); ``--debug`` shows tracebacks. Exit codes: 0 success, 1 runtime or data error,
2 usage or configuration error.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from qformer_cli import __version__
from qformer_cli.errors import QformerError

if TYPE_CHECKING:  # the config module is imported by the commands that need it
    from qformer_cli.config import RunConfig

app = typer.Typer(
    name="qformer",
    help="Train, evaluate and export BLIP-2 Q-Formers.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="YAML config file, or a shipped config's name (tiny, blip2_vitg_opt2.7b, ...; "
        "see configs/). Default: tiny, the embedded default.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.lr=2e-4 (repeatable)."),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Output directory (default: runs/<command>-<timestamp>)."),
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda (auto: a CUDA GPU when usable).")
]
PrecisionOption = Annotated[
    str | None,
    typer.Option("--precision", help="fp32 | bf16 | fp16 (autocast; master weights stay fp32)."),
]
MaxStepsOption = Annotated[int | None, typer.Option("--max-steps", help="Stop after N steps.")]
BatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", help="Global batch size (all processes).")
]
VisionModelOption = Annotated[
    str | None, typer.Option("--vision-model", help="Frozen vision encoder: hub id or path.")
]
TrainDataOption = Annotated[
    str | None, typer.Option("--data", help="Training captions: Karpathy or COCO JSON.")
]
SkipBadOption = Annotated[
    bool,
    typer.Option(
        "--skip-bad-samples", help="Skip unreadable samples and report them (else: error)."
    ),
]
FeaturesOption = Annotated[
    Path | None,
    typer.Option(
        "--features",
        help="Train on a feature cache from `qformer extract-features` instead of the images "
        "(no augmentation; the vision encoder is not loaded).",
    ),
]
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the training step (compiles for minutes once; H100: 1.6x faster "
        "stage-1 steps, see BENCHMARKS.md).",
    ),
]
MaxNonfiniteOption = Annotated[
    int | None,
    typer.Option(
        "--max-nonfinite-steps",
        help="Stop (exit 1) after this many non-finite steps in a row (0: never; default 5).",
    ),
]
ResumeOption = Annotated[
    str | None,
    typer.Option("--resume", help="auto (newest good checkpoint of --out / the latest run) | DIR."),
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="--out holds an earlier run: remove its checkpoints and metrics and start afresh "
        "(without it, such an --out is refused).",
    ),
]


def _fail(message: str, code: int) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _removing_empty_out_dirs_on_exit(command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``command``; if it raises (a refusal, a failure, an exit), the output directories it
    created and left empty are removed, so a refused command leaves no ``runs/<command>-<time>``."""
    try:
        return command(*args, **kwargs)
    except BaseException:
        # Only runtime.make_out_dir creates output directories; not imported means none were
        # created (and an error path need not import torch to find that out).
        runtime = sys.modules.get("qformer_cli.runtime")
        if runtime is not None:
            runtime.remove_empty_out_dirs()
        raise


def handles_errors(command: F) -> F:
    """Turn expected errors into one line on stderr and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            return _removing_empty_out_dirs_on_exit(command, *args, **kwargs)
        except typer.Exit:
            raise
        except QformerError as exc:
            if debug:
                raise
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:
            if debug:
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"{type(exc).__name__}: {first_line} (rerun with --debug for details)", 1)

    return wrapper  # type: ignore[return-value]


def output_console(as_json: bool) -> Console:
    """Tables go to stdout, or to stderr when stdout carries the JSON result."""
    return Console(stderr=as_json)


def print_json(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result, default=str) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qformer {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Train, evaluate and export BLIP-2 Q-Formers."""


def flag_overrides(**flags: Any) -> list[str]:
    """Dedicated flags as ``--set`` overrides (applied after the config file and --set)."""
    return [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]


def finish(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)


# --------------------------------------------------------------------------------------------
# qformer pretrain-stage1


@app.command("pretrain-stage1")
@handles_errors
def pretrain_stage1(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    resume: ResumeOption = None,
    overwrite: OverwriteOption = False,
    vision_model: VisionModelOption = None,
    data: TrainDataOption = None,
    max_steps: MaxStepsOption = None,
    batch_size: BatchSizeOption = None,
    precision: PrecisionOption = None,
    seed: SeedOption = None,
    max_nonfinite_steps: MaxNonfiniteOption = None,
    skip_bad_samples: SkipBadOption = False,
    features: FeaturesOption = None,
    compile_step: CompileOption = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Stage 1: train the Q-Former with ITC + ITM + ITG against a frozen vision encoder."""
    from qformer_cli.train.stage1 import build_stage1_recipe

    flags = {
        "model.vision.model": vision_model,
        "data.train": data,
        "data.features": str(features) if features else None,
        "train.compile": compile_step or None,
        "train.max_steps": max_steps,
        "train.batch_size": batch_size,
        "train.precision": precision,
        "train.seed": seed,
        "train.max_nonfinite_steps": max_nonfinite_steps,
        "data.skip_bad_samples": skip_bad_samples or None,
    }
    _pretrain(
        "pretrain-stage1",
        1,
        build_stage1_recipe,
        config,
        overrides,
        flags,
        out,
        resume,
        device,
        as_json,
        overwrite,
    )


@app.command("pretrain-stage2")
@handles_errors
def pretrain_stage2(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    resume: ResumeOption = None,
    overwrite: OverwriteOption = False,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from a stage-1 run/checkpoint (or a transformers/LAVIS BLIP-2 file); "
            "default: BERT init.",
        ),
    ] = None,
    llm: Annotated[
        str | None, typer.Option("--llm", help="Frozen LLM: hub id or path (causal or seq2seq).")
    ] = None,
    vision_model: VisionModelOption = None,
    data: TrainDataOption = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help='Text prompt before each caption ("a photo of").')
    ] = None,
    max_steps: MaxStepsOption = None,
    batch_size: BatchSizeOption = None,
    precision: PrecisionOption = None,
    seed: SeedOption = None,
    max_nonfinite_steps: MaxNonfiniteOption = None,
    skip_bad_samples: SkipBadOption = False,
    compile_step: CompileOption = False,
    fsdp: Annotated[
        bool,
        typer.Option("--fsdp", help="Shard the frozen LLM across the torchrun processes (FSDP2)."),
    ] = False,
    activation_checkpointing: Annotated[
        bool,
        typer.Option(
            "--activation-checkpointing",
            help="Recompute the LLM's block activations in backward (less memory, more time).",
        ),
    ] = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Stage 2: teach a frozen LLM to read the Q-Former's queries as a soft visual prompt."""
    import functools

    from qformer_cli.train.stage2 import build_stage2_recipe, inherit_init_vision

    flags = {
        "model.llm.model": llm,
        "model.vision.model": vision_model,
        "data.train": data,
        "generate.prompt": prompt,
        "train.max_steps": max_steps,
        "train.batch_size": batch_size,
        "train.precision": precision,
        "train.seed": seed,
        "train.max_nonfinite_steps": max_nonfinite_steps,
        "data.skip_bad_samples": skip_bad_samples or None,
        "train.compile": compile_step or None,
        "train.fsdp": fsdp or None,
        "train.activation_checkpointing": activation_checkpointing or None,
    }
    builder = functools.partial(build_stage2_recipe, init=init)
    given = {text.split("=", 1)[0].strip() for text in overrides or []}
    given |= {key for key, value in flags.items() if value is not None}
    _pretrain(
        "pretrain-stage2",
        2,
        builder,
        config,
        overrides,
        flags,
        out,
        resume,
        device,
        as_json,
        overwrite,
        adjust=functools.partial(inherit_init_vision, init=init, given=given),
    )


def _pretrain(
    command: str,
    stage: int,
    builder: Callable[..., Any],
    config: str | None,
    overrides: list[str] | None,
    flags: dict[str, Any],
    out: Path | None,
    resume: str | None,
    device: str,
    as_json: bool,
    overwrite: bool,
    adjust: Callable[[RunConfig], RunConfig] | None = None,
) -> None:
    from qformer_cli.config import load_config
    from qformer_cli.train.run import train_stage

    run_config = load_config(config, [*(overrides or []), *flag_overrides(**flags)])
    if adjust is not None:  # settings taken from elsewhere (stage 2: the --init run's encoder)
        run_config = adjust(run_config)
    result = train_stage(
        command,
        stage,
        builder,
        run_config,
        out=out,
        resume=resume,
        device_choice=device,
        console=Console(stderr=True),
        overwrite=overwrite,
    )
    finish(result, as_json)


# --------------------------------------------------------------------------------------------
# qformer extract-features


@app.command("extract-features")
@handles_errors
def extract_features(
    out: Annotated[Path, typer.Option("--out", help="Directory for the feature cache.")],
    config: ConfigOption = None,
    overrides: SetOption = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="--out holds a feature cache: remove it and extract afresh."
        ),
    ] = False,
    vision_model: VisionModelOption = None,
    data: TrainDataOption = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Stored precision: bf16 | fp16 | fp32.")
    ] = "bf16",
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard file.")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per encoder batch.")] = 64,
    skip_bad_samples: SkipBadOption = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Run the frozen vision encoder once over the training images and store its outputs, for
    `pretrain-stage1 --features`."""
    from qformer_cli.config import load_config
    from qformer_cli.runtime import init_distributed
    from qformer_cli.train.features import extract_features as run_extraction
    from qformer_cli.train.run import feature_out_dir

    flags = {
        "model.vision.model": vision_model,
        "data.train": data,
        "data.skip_bad_samples": skip_bad_samples or None,
    }
    run_config = load_config(config, [*(overrides or []), *flag_overrides(**flags)])
    ranks, torch_device = init_distributed(device)
    console = Console(stderr=True)
    result = run_extraction(
        run_config,
        feature_out_dir(out, overwrite=overwrite, is_main=ranks.rank == 0),
        dtype=dtype,
        shard_size=shard_size,
        batch_size=batch_size,
        device=torch_device,
        console=console,
        report=lambda message: console.print(message, markup=False, highlight=False),
    )
    if as_json:
        print_json(result)
        return
    console.print(
        f"{result['num_images']} images -> {result['out_dir']} "
        f"({result['shards']} shards, {result['dtype']}, {result['images_per_s']} images/s)",
        markup=False,
        highlight=False,
    )


# --------------------------------------------------------------------------------------------
# qformer caption / eval-caption

ModelOption = Annotated[
    Path,
    typer.Option(
        "--model", help="Stage-2 run or checkpoint directory, or a transformers BLIP-2 directory."
    ),
]
ImagesOption = Annotated[
    Path | None, typer.Option("--images", help="An image file or folder (or the GT's images).")
]
AnnotationsOption = Annotated[
    Path | None, typer.Option("--annotations", help="COCO-format caption ground truth.")
]
SplitOption = Annotated[
    str, typer.Option("--split", help="sample_data split when no --images/--annotations.")
]


def _generation_settings(
    config: str | None,
    overrides: list[str] | None,
    flags: dict[str, Any],
):
    from qformer_cli.config import load_config

    return load_config(config, [*(overrides or []), *flag_overrides(**flags)])


BackendOption = Annotated[
    str,
    typer.Option("--backend", help="torch | onnx (--model is then an export-onnx directory)."),
]


def _load_generator(backend: str, model: Path, device: str) -> Any:
    """The stage-2 pipeline for ``--backend torch`` or the onnxruntime one for ``onnx``."""
    from qformer_cli.errors import UsageError
    from qformer_cli.runtime import init_distributed

    if backend == "onnx":
        from qformer_cli.export.onnx_runtime import OnnxPipeline

        pipeline = OnnxPipeline.load(model)
        Console(stderr=True).print(f"onnxruntime provider: {pipeline.provider}", markup=False)
        return pipeline
    if backend != "torch":
        raise UsageError(f"--backend {backend!r}: choose torch or onnx")
    from qformer_cli.pretrained import load_stage2

    _, torch_device = init_distributed(device)
    return load_stage2(model, torch_device)


def _generate(
    pipeline: Any,
    samples: list,
    settings: Any,
    prompt_for: Callable[[Any], str],
    *,
    batch_size: int,
    shuffle_images: bool,
    skip_bad_samples: bool,
) -> tuple[list, Any]:
    from qformer_cli.errors import UsageError
    from qformer_cli.eval.captioning import generate_for_samples

    if not hasattr(pipeline, "bridge"):  # the onnxruntime pipeline
        from qformer_cli.export.onnx_runtime import generate_for_samples_onnx

        if shuffle_images:
            raise UsageError("--shuffle-images / --blind need --backend torch")
        return generate_for_samples_onnx(
            pipeline,
            samples,
            settings,
            prompt_for,
            batch_size=batch_size,
            skip_bad_samples=skip_bad_samples,
        )
    return generate_for_samples(
        pipeline,
        samples,
        settings,
        prompt_for,
        batch_size=batch_size,
        device=next(pipeline.bridge.parameters()).device,
        shuffle_images=shuffle_images,
        skip_bad_samples=skip_bad_samples,
    )


def _caption_and_score(
    model: Path,
    images: Path | None,
    annotations: Path | None,
    split: str,
    run_config: Any,
    prompt_given: bool,
    batch_size: int,
    shuffle_images: bool,
    device: str,
    out_dir: Path,
    backend: str = "torch",
) -> dict[str, Any]:
    from qformer_cli.eval.caption_metrics import evaluate_caption_files
    from qformer_cli.eval.captioning import caption_inputs
    from qformer_cli.generate import GenerationSettings

    pipeline = _load_generator(backend, model, device)
    samples, ground_truth = caption_inputs(images, annotations, split)
    generate = run_config.generate
    prompt = generate.prompt if prompt_given or not pipeline.prompt else pipeline.prompt
    settings = GenerationSettings(
        num_beams=generate.num_beams,
        max_new_tokens=generate.max_new_tokens,
        min_new_tokens=generate.min_new_tokens,
        length_penalty=generate.length_penalty,
        repetition_penalty=generate.repetition_penalty,
    )
    generated, bad = _generate(
        pipeline,
        samples,
        settings,
        lambda _: prompt,
        batch_size=batch_size,
        shuffle_images=shuffle_images,
        skip_bad_samples=run_config.data.skip_bad_samples,
    )
    captions = [{"image_id": s.image_id, "caption": text} for s, text in generated]
    results_path = out_dir / "captions.json"
    results_path.write_text(json.dumps(captions, indent=1))
    result: dict[str, Any] = {
        "model": str(model),
        "backend": backend,
        "prompt": prompt,
        "num_images": len(captions),
        "captions": str(results_path),
        "shuffled_images": shuffle_images,
    }
    if bad.total:
        result["bad_samples"] = bad.summary()
    if ground_truth is not None:
        scores = evaluate_caption_files(ground_truth, results_path).to_dict()
        (out_dir / "metrics.json").write_text(json.dumps(scores, indent=1))
        result["metrics"] = scores
    return result


def _print_captions(result: dict[str, Any], as_json: bool, limit: int = 10) -> None:
    if as_json:
        print_json(result)
        return
    console = output_console(as_json)
    captions = json.loads(Path(result["captions"]).read_text())
    table = Table(title=f"Captions ({len(captions)} images, first {min(limit, len(captions))})")
    table.add_column("image_id")
    table.add_column("caption")
    for row in captions[:limit]:
        table.add_row(str(row["image_id"]), row["caption"])
    console.print(table)
    if "metrics" in result:
        _print_metrics(console, result["metrics"], "Caption scores (COCO scale)")
    console.print(f"wrote {result['captions']}", markup=False, highlight=False)


def _print_metrics(console: Console, metrics: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in metrics.items():
        if isinstance(value, float | int):
            table.add_row(name, f"{value:.4f}")
    for name, reason in metrics.get("skipped", {}).items():
        table.add_row(name, f"skipped: {reason}")
    console.print(table)


@app.command()
@handles_errors
def caption(
    model: ModelOption,
    images: ImagesOption = None,
    annotations: AnnotationsOption = None,
    split: SplitOption = "val",
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Text prompt (default: the model's own).")
    ] = None,
    num_beams: Annotated[int | None, typer.Option("--num-beams")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens")] = None,
    min_new_tokens: Annotated[int | None, typer.Option("--min-new-tokens")] = None,
    length_penalty: Annotated[float | None, typer.Option("--length-penalty")] = None,
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    shuffle_images: Annotated[
        bool,
        typer.Option("--shuffle-images", help="Grounding check: images shuffled across inputs."),
    ] = False,
    backend: BackendOption = "torch",
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Caption images with a stage-2 model; scores them when the ground truth is known."""
    from qformer_cli.runtime import make_out_dir

    run_config = _generation_settings(
        config,
        overrides,
        {
            "generate.prompt": prompt,
            # the onnxruntime backend decodes greedily
            "generate.num_beams": num_beams or (1 if backend == "onnx" else None),
            "generate.max_new_tokens": max_new_tokens,
            "generate.min_new_tokens": min_new_tokens,
            "generate.length_penalty": length_penalty,
            "generate.repetition_penalty": repetition_penalty,
        },
    )
    out_dir = make_out_dir(out, "caption")
    result = _caption_and_score(
        model,
        images,
        annotations,
        split,
        run_config,
        prompt is not None,
        batch_size,
        shuffle_images,
        device,
        out_dir,
        backend,
    )
    _print_captions(result, as_json)


@app.command("eval-caption")
@handles_errors
def eval_caption(
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", help='Results file [{"image_id", "caption"}]: no model.'),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Stage-2 model to caption with first.")
    ] = None,
    annotations: AnnotationsOption = None,
    images: ImagesOption = None,
    split: SplitOption = "val",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """COCO caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when available)."""
    from qformer_cli.data import sample_split_files
    from qformer_cli.errors import UsageError
    from qformer_cli.eval.caption_metrics import evaluate_caption_files
    from qformer_cli.runtime import make_out_dir

    if (predictions is None) == (model is None):
        raise UsageError("give exactly one of --predictions FILE or --model DIR")
    out_dir = make_out_dir(out, "eval-caption")
    if model is not None:
        run_config = _generation_settings(config, overrides, {})
        result = _caption_and_score(
            model, images, annotations, split, run_config, False, batch_size, False, device, out_dir
        )
        metrics = result["metrics"]
    else:
        ground_truth = annotations or sample_split_files(split).coco_captions
        metrics = evaluate_caption_files(ground_truth, predictions).to_dict()
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if as_json:
        print_json(metrics)
        return
    _print_metrics(output_console(as_json), metrics, "Caption scores (COCO scale)")


# --------------------------------------------------------------------------------------------
# qformer eval-vqa

VQA_PROMPTS = {"answer": "Question: {} Answer:", "short-answer": "Question: {} Short answer:"}


@app.command("eval-vqa")
@handles_errors
def eval_vqa(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Stage-2 run/checkpoint or transformers BLIP-2 directory."),
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", help='Score an existing [{"question_id", "answer"}] file.'),
    ] = None,
    split: SplitOption = "val",
    questions: Annotated[
        Path | None, typer.Option("--questions", help="VQAv2-format questions JSON.")
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option("--annotations", help="VQAv2-format annotations JSON.")
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Folder holding the questions' images.")
    ] = None,
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt",
            help="Template with {} for the question, or 'answer' / 'short-answer' (LAVIS).",
        ),
    ] = "answer",
    metric: Annotated[
        str, typer.Option("--metric", help="official (GT-Vision-Lab) | lavis (BLIP-2's numbers).")
    ] = "official",
    blind: Annotated[
        bool, typer.Option("--blind", help="Shuffle images across questions (grounding check).")
    ] = False,
    num_beams: Annotated[
        int | None, typer.Option("--num-beams", help="Default 5 (1 with --backend onnx).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 10,
    min_new_tokens: Annotated[int, typer.Option("--min-new-tokens")] = 1,
    length_penalty: Annotated[float, typer.Option("--length-penalty")] = -1.0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    skip_bad_samples: Annotated[bool, typer.Option("--skip-bad-samples")] = False,
    backend: BackendOption = "torch",
    out: OutOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Zero-shot VQA scored with the VQAv2 accuracy (leave-one-out over 10 answers)."""
    from qformer_cli.data import sample_split_files
    from qformer_cli.errors import UsageError
    from qformer_cli.eval.vqa_metric import evaluate_vqa_files
    from qformer_cli.runtime import make_out_dir

    if (predictions is None) == (model is None):
        raise UsageError("give exactly one of --predictions FILE or --model DIR")
    files = sample_split_files(split)
    questions = questions or files.vqa_questions
    annotations = annotations or files.vqa_annotations
    out_dir = make_out_dir(out, "eval-vqa")
    result: dict[str, Any] = {}
    if model is not None:
        template = VQA_PROMPTS.get(prompt, prompt)
        if "{}" not in template:
            raise UsageError(f"--prompt {prompt!r}: the template needs {{}} for the question")
        predictions = out_dir / "vqa_results.json"
        result = _answer_questions(
            model,
            questions,
            annotations,
            images or files.image_dir,
            template,
            {
                "num_beams": num_beams or (1 if backend == "onnx" else 5),
                "max_new_tokens": max_new_tokens,
                "min_new_tokens": min_new_tokens,
                "length_penalty": length_penalty,
            },
            batch_size,
            blind,
            skip_bad_samples,
            device,
            predictions,
            backend,
        )
    accuracy = evaluate_vqa_files(annotations, predictions, questions, metric=metric).to_dict()
    (out_dir / "metrics.json").write_text(json.dumps(accuracy, indent=1))
    result.update(accuracy, results=str(predictions), blind=blind)
    if as_json:
        print_json(result)
        return
    _print_vqa(output_console(as_json), accuracy)


def _answer_questions(
    model: Path,
    questions: Path,
    annotations: Path,
    images: Path,
    template: str,
    generation: dict[str, Any],
    batch_size: int,
    blind: bool,
    skip_bad_samples: bool,
    device: str,
    results_path: Path,
    backend: str,
) -> dict[str, Any]:
    from qformer_cli.data import BadSampleLog, read_vqa
    from qformer_cli.generate import GenerationSettings

    pipeline = _load_generator(backend, model, device)
    bad = BadSampleLog(skip=skip_bad_samples)
    samples = read_vqa(questions, annotations, images, bad=bad)
    generated, bad_images = _generate(
        pipeline,
        samples,
        GenerationSettings(**generation),
        lambda sample: template.format(sample.question),
        batch_size=batch_size,
        shuffle_images=blind,
        skip_bad_samples=skip_bad_samples,
    )
    answers = [{"question_id": s.question_id, "answer": text} for s, text in generated]
    results_path.write_text(json.dumps(answers, indent=1))
    result: dict[str, Any] = {"model": str(model), "backend": backend, "prompt": template}
    skipped = bad.total + bad_images.total
    if skipped:
        result["bad_samples"] = f"{bad.summary()}; {bad_images.summary()}"
    return result


def _print_vqa(console: Console, accuracy: dict[str, Any]) -> None:
    table = Table(
        title=f"VQA accuracy ({accuracy['metric']} metric, {accuracy['num_questions']} questions)"
    )
    table.add_column("answer type")
    table.add_column("accuracy", justify="right")
    table.add_row("overall", f"{accuracy['overall']:.2f}")
    for name, value in accuracy["per_answer_type"].items():
        table.add_row(name, f"{value:.2f}")
    console.print(table)


# --------------------------------------------------------------------------------------------
# qformer export-onnx


@app.command("export-onnx")
@handles_errors
def export_onnx_command(
    model: Annotated[
        Path,
        typer.Option(
            "--model", help="Stage-2 (caption/VQA) or stage-1 (ITC retrieval) run or checkpoint."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the graphs and manifest.")],
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16")] = "fp32",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 17,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="onnxruntime vs PyTorch parity check.")
    ] = True,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Export to ONNX. Stage 2: vision+Q-Former and the LLM with KV cache (decoder-only: prefill
    and decode; encoder-decoder: encoder, first decoder step, decode step), for caption and
    eval-vqa --backend onnx. Stage 1: ITC image and text embeddings for retrieval. Exits 1 when
    onnxruntime and PyTorch disagree beyond 1e-4 (fp32) / 1e-2 (fp16)."""
    import torch

    from qformer_cli.export.onnx_export import export_onnx
    from qformer_cli.pretrained import checkpoint_stage, load_stage1_pipeline, load_stage2
    from qformer_cli.runtime import make_out_dir

    cpu = torch.device("cpu")
    if checkpoint_stage(model) == 1:
        source: Any = load_stage1_pipeline(model, cpu)
    else:
        source = load_stage2(model, cpu)
    manifest = export_onnx(
        source, make_out_dir(out, "export-onnx"), precision=precision, opset=opset, check=check
    )
    result = {"out": str(out), "graphs": sorted(manifest.get("graphs", {})), **manifest}
    if as_json:
        print_json(result)
        return
    console = output_console(as_json)
    parity = manifest.get("parity")
    if parity:
        table = Table(title=f"Parity, onnxruntime ({parity['provider']}) vs PyTorch")
        table.add_column("graph")
        table.add_column("max abs diff", justify="right")
        for graph, by_batch in parity["max_abs_diff"].items():
            worst = max(max(outputs.values()) for outputs in by_batch.values())
            table.add_row(graph, f"{worst:.2e}")
        console.print(table)
    console.print(f"wrote {out}", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------
# qformer convert


@app.command()
@handles_errors
def convert(
    out: Annotated[
        Path, typer.Argument(help="Output directory (transformers) or .pth file (lavis).")
    ],
    model: Annotated[Path, typer.Option("--model", help="A run or checkpoint directory.")],
    to: Annotated[str, typer.Option("--to", help="transformers | lavis")] = "transformers",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Write a checkpoint in another layout: a transformers BLIP-2 directory (stage 2) or a
    LAVIS {"model": state_dict} .pth (stage 1 or 2)."""
    import torch

    from qformer_cli.errors import UsageError

    if to == "transformers":
        from qformer_cli.export.transformers_blip2 import export_to_transformers
        from qformer_cli.pretrained import load_stage2

        pipeline = load_stage2(model, torch.device("cpu"))
        export_to_transformers(pipeline, out)
        source = pipeline.directory
    elif to == "lavis":
        from qformer_cli.models.convert import save_lavis
        from qformer_cli.pretrained import load_trainable

        trainable, source = load_trainable(model)
        save_lavis(trainable, out)
    else:
        raise UsageError(f"--to {to!r}: choose transformers or lavis")
    result = {"model": str(source), "out": str(out), "format": to}
    if as_json:
        print_json(result)
    else:
        output_console(as_json).print(f"wrote {out} ({to})", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------
# qformer eval-retrieval


@app.command("eval-retrieval")
@handles_errors
def eval_retrieval(
    model: Annotated[Path, typer.Option("--model", help="Stage-1 run or checkpoint directory.")],
    split: Annotated[
        str, typer.Option("--split", help="sample_data split when no --annotations.")
    ] = "val",
    annotations: Annotated[
        Path | None,
        typer.Option("--annotations", help="Karpathy val/test JSON or COCO captions JSON."),
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Image root (default: beside the JSON).")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Candidates re-ranked with ITM.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    out: OutOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Image-text retrieval with a stage-1 checkpoint: ITC for all pairs, ITM re-rank of top k."""
    from qformer_cli.data import sample_split_files
    from qformer_cli.eval.retrieval import evaluate_retrieval, load_retrieval_set
    from qformer_cli.pretrained import load_stage1_pipeline
    from qformer_cli.runtime import init_distributed, make_out_dir

    _, torch_device = init_distributed(device)
    loaded = load_stage1_pipeline(model, torch_device)
    annotations = annotations or sample_split_files(split).karpathy
    data = load_retrieval_set(
        annotations,
        images,
        loaded.vision,
        loaded.image_processor_source,
        loaded.tokenizer,
        torch_device,
        batch_size,
    )
    metrics = evaluate_retrieval(loaded.model, data, k=k, batch_size=batch_size)
    result = {
        "checkpoint": str(loaded.directory),
        "annotations": str(annotations),
        "num_images": int(data.image_embeds.shape[0]),
        "num_texts": int(data.input_ids.shape[0]),
        "k": k,
        **metrics,
    }
    out_dir = make_out_dir(out, "eval-retrieval")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    if as_json:
        print_json(result)
        return
    table = Table(title=f"Retrieval on {annotations} ({result['num_images']} images)")
    table.add_column("direction")
    for name in ("R@1", "R@5", "R@10"):
        table.add_column(name, justify="right")
    for direction in (
        "image_to_text",
        "text_to_image",
        "image_to_text_itc_only",
        "text_to_image_itc_only",
    ):
        table.add_row(direction, *(f"{v:.2f}" for v in metrics[direction].values()))
    output_console(as_json).print(table)


# --------------------------------------------------------------------------------------------
# qformer info


def _format_count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def _info_tables(report: dict[str, Any]) -> list[Table]:
    params = Table(title="Parameters")
    for column in ("component", "parameters", "trainable", "frozen"):
        params.add_column(column, justify="left" if column == "component" else "right")
    for name, row in report["parameters"].items():
        params.add_row(
            name, f"{row['parameters']:,}", f"{row['trainable']:,}", f"{row['frozen']:,}"
        )
    for stage, row in report["totals"].items():
        params.add_row(
            f"[b]{stage} total[/b]",
            "",
            _format_count(row["trainable"]),
            _format_count(row["frozen"]),
        )

    flops = Table(title="Forward FLOPs per sample")
    flops.add_column("component")
    flops.add_column("GFLOP", justify="right")
    for name, value in report["forward_flops_per_sample"].items():
        if name != "image_tokens":
            flops.add_row(name, f"{value / 1e9:,.2f}")

    memory = Table(title="Memory: weights + grads + AdamW state (activations excluded), GiB")
    memory.add_column("precision")
    for column in ("inference", "stage1_training", "stage2_training"):
        memory.add_column(column, justify="right")
    for precision, row in report["memory_bytes"].items():
        memory.add_row(precision, *(f"{value / 2**30:,.2f}" for value in row.values()))
    return [params, flops, memory]


@app.command()
@handles_errors
def info(
    config: ConfigOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Parameters, FLOPs and memory of a configuration (built on the meta device: no weights)."""
    from qformer_cli.config import load_config
    from qformer_cli.info import describe

    report = describe(load_config(config, overrides).model)
    if as_json:
        print_json(report)
        return
    console = output_console(as_json)
    for table in _info_tables(report):
        console.print(table)


def _quiet_libraries() -> None:
    """transformers' load-progress bars and advice would drown our one-line messages."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _passive_openmp_threads() -> None:
    """OpenMP threads that busy-wait make every op wait for a descheduled sibling when anything
    else runs on the machine: measured on 2 cores with one other busy process, a tiny stage-1
    step took 15 s with the default policy and 0.6 s with PASSIVE. Set before torch loads, by
    the command only: importing the library changes no environment variable."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    _passive_openmp_threads()
    _quiet_libraries()
    app()
