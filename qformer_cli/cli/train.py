"""The training commands: ``pretrain-stage1``, ``pretrain-stage2``, ``finetune``,
``extract-features``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from qformer_cli.cli.common import (
    BatchSizeOption,
    CompileOption,
    ConfigOption,
    DebugOption,
    DeviceOption,
    FeaturesOption,
    JsonOption,
    MaxNonfiniteOption,
    MaxStepsOption,
    OutOption,
    OverwriteOption,
    PrecisionOption,
    QuietOption,
    ResumeOption,
    SeedOption,
    SetOption,
    SkipBadOption,
    TrainDataOption,
    VisionModelOption,
    data_flags,
    embedded_default,
    finish,
    given_keys,
    handles_errors,
    load_run_config,
    model_location,
    print_json,
    require_inputs,
    training_flags,
)

if TYPE_CHECKING:
    from qformer_cli.config import RunConfig

# --------------------------------------------------------------------------------------------
# qformer pretrain-stage1


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
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Stage 1: train the Q-Former with ITC + ITM + ITG against a frozen vision encoder."""
    from qformer_cli.train.stage1 import build_stage1_recipe

    flags = {
        "model.vision.model": vision_model,
        **data_flags(data),
        "data.features": str(features) if features else None,
        "train.compile": compile_step or None,
        **training_flags(max_steps, batch_size, precision, seed, skip_bad_samples),
        "train.max_nonfinite_steps": max_nonfinite_steps,
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
        quiet=quiet,
    )


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
            help="Start from a stage-1 run/checkpoint (RUN:best: its best validated one; or a "
            "transformers/LAVIS BLIP-2 file); default: BERT init.",
        ),
    ] = None,
    llm: Annotated[
        str | None,
        typer.Option(
            "--llm",
            help="Frozen LLM: hub id or path (causal or seq2seq). "
            + embedded_default("model.llm.model"),
        ),
    ] = None,
    vision_model: VisionModelOption = None,
    data: TrainDataOption = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            help="Text before each caption, kept as the model's caption prompt. "
            + embedded_default("generate.prompt"),
        ),
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
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Stage 2: teach a frozen LLM to read the Q-Former's queries as a soft visual prompt."""
    import functools

    from qformer_cli.train.stage2 import build_stage2_recipe, inherit_init_vision

    init = model_location(init)
    require_inputs(init=init)
    flags = {
        "model.llm.model": llm,
        "model.vision.model": vision_model,
        **data_flags(data),
        "generate.prompt": prompt,
        **training_flags(max_steps, batch_size, precision, seed, skip_bad_samples),
        "train.max_nonfinite_steps": max_nonfinite_steps,
        "train.compile": compile_step or None,
        "train.fsdp": fsdp or None,
        "train.activation_checkpointing": activation_checkpointing or None,
    }
    builder = functools.partial(build_stage2_recipe, init=init)
    given = given_keys(overrides, flags)
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
        quiet=quiet,
        adjust=functools.partial(inherit_init_vision, init=init, given=given),
    )


# --------------------------------------------------------------------------------------------
# qformer finetune


@handles_errors
def finetune(
    task: Annotated[
        str, typer.Option("--task", help="caption | vqa | retrieval | instruct (see README).")
    ],
    init: Annotated[
        Path,
        typer.Option(
            "--init",
            help="The run to fine-tune (RUN:best: its best validated checkpoint): stage 1 for "
            "retrieval, stage 2 otherwise. Its model is kept.",
        ),
    ],
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    resume: ResumeOption = None,
    overwrite: OverwriteOption = False,
    data: TrainDataOption = None,
    instructions: Annotated[
        Path | None,
        typer.Option(
            "--instructions",
            help="Instruction data: a JSONL / CSV table with image, instruction, response.",
        ),
    ] = None,
    vision_lr: Annotated[
        float | None,
        typer.Option(
            "--vision-lr",
            min=0,
            help="Peak learning rate of the vision encoder, trained with the Q-Former (0: "
            "frozen). Default: the config's train.vision_lr; unset there, train.lr for caption, "
            "vqa and retrieval, frozen for instruct.",
        ),
    ] = None,
    max_steps: MaxStepsOption = None,
    batch_size: BatchSizeOption = None,
    precision: PrecisionOption = None,
    seed: SeedOption = None,
    skip_bad_samples: SkipBadOption = False,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Fine-tune a trained run for captioning, VQA, retrieval or instructions (InstructBLIP)."""
    import functools

    from qformer_cli.train.finetune import finetune_config, task_stage
    from qformer_cli.train.stage1 import build_stage1_recipe
    from qformer_cli.train.stage2 import build_stage2_recipe

    stage = task_stage(task)
    init = model_location(init)
    require_inputs(init=init, instructions=instructions)
    flags = {
        **data_flags(data),
        "data.instructions": str(instructions) if instructions else None,
        "train.vision_lr": vision_lr,
        **training_flags(max_steps, batch_size, precision, seed, skip_bad_samples),
    }
    given = given_keys(overrides, flags)
    builder = build_stage1_recipe if stage == 1 else build_stage2_recipe
    _pretrain(
        "finetune",
        stage,
        functools.partial(builder, init=init),
        config,
        overrides,
        flags,
        out,
        resume,
        device,
        as_json,
        overwrite,
        quiet=quiet,
        adjust=functools.partial(finetune_config, task=task, init=init, given=given),
        run_name=f"finetune-{task}",
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
    quiet: bool = False,
    adjust: Callable[[RunConfig], RunConfig] | None = None,
    run_name: str | None = None,
) -> None:
    """Train with ``command``'s settings of the config; the run is named ``run_name`` (default:
    the command's name)."""
    from qformer_cli.train.run import train_stage

    run_config = load_run_config(command, config, overrides, flags)
    if adjust is not None:  # settings taken from elsewhere (stage 2: the --init run's encoder)
        run_config = adjust(run_config)
    result = train_stage(
        run_name or command,
        stage,
        builder,
        run_config,
        out=out,
        resume=resume,
        device_choice=device,
        console=Console(stderr=True),
        overwrite=overwrite,
        quiet=quiet,
    )
    finish(result, as_json)


# --------------------------------------------------------------------------------------------
# qformer extract-features


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
    shard_size: Annotated[
        int, typer.Option("--shard-size", min=1, help="Images per shard file.")
    ] = 1024,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images per encoder batch.")
    ] = 64,
    skip_bad_samples: SkipBadOption = False,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Run the frozen vision encoder once over the training images and store its outputs, for
    `pretrain-stage1 --features`."""
    from qformer_cli.runtime import init_distributed, resolve_precision
    from qformer_cli.train.features import extract_features as run_extraction
    from qformer_cli.train.run import feature_out_dir

    flags = {
        "model.vision.model": vision_model,
        **data_flags(data),
        "data.skip_bad_samples": skip_bad_samples or None,
    }
    run_config = load_run_config("extract-features", config, overrides, flags)
    ranks, torch_device = init_distributed(device)
    console = Console(stderr=True)
    run_config.train.precision = resolve_precision(run_config.train.precision, torch_device)[0]
    result = run_extraction(
        run_config,
        feature_out_dir(out, overwrite=overwrite, is_main=ranks.rank == 0),
        dtype=dtype,
        shard_size=shard_size,
        batch_size=batch_size,
        device=torch_device,
        console=console,
        report=lambda message: console.print(message, markup=False, highlight=False),
        quiet=quiet,
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
