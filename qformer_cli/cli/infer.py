"""The inference commands: ``caption``, ``eval-caption``, ``eval-vqa``, ``eval-retrieval``.

Each parses its flags into the run config, loads the model once and calls one function of
:mod:`qformer_cli.inference`; what is printed is decided here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from qformer_cli.cli.common import (
    ConfigOption,
    DebugOption,
    DeviceOption,
    JsonOption,
    OutOption,
    QuietOption,
    SetOption,
    SkipBadOption,
    handles_errors,
    load_run_config,
    model_location,
    output_console,
    print_json,
    print_metrics,
    progress_report,
    require_inputs,
)
from qformer_cli.config import GenerationConfig, vqa_generation

ModelOption = Annotated[
    Path,
    typer.Option(
        "--model",
        help="Stage-2 run or checkpoint directory, a transformers BLIP-2 directory, or a LAVIS "
        ".pth (its backbones from --config/--set).",
    ),
]
ImagesOption = Annotated[
    Path | None, typer.Option("--images", help="An image file or folder (or the GT's images).")
]
AnnotationsOption = Annotated[
    Path | None,
    typer.Option(
        "--annotations",
        help="Caption ground truth: COCO captions JSON, or a JSONL / CSV table with image, "
        "caption (images beside it unless --images).",
    ),
]
SplitOption = Annotated[
    str, typer.Option("--split", help="sample_data split when no --images/--annotations.")
]
BackendOption = Annotated[
    str,
    typer.Option("--backend", help="torch | onnx (--model is then an export-onnx directory)."),
]
BatchOption = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per batch through the model.")
]


def _decoding(flag: str, key: str, what: str) -> Any:
    """A decoding option; its default is the config's, which the help names for each section."""
    caption_default, vqa_default = getattr(GenerationConfig(), key), getattr(vqa_generation(), key)
    return typer.Option(
        flag,
        help=f"{what} Default: the config's generate.{key} ({caption_default}); for questions "
        f"(eval-vqa, ask QUESTION): vqa.{key} ({vqa_default}).",
    )


NumBeamsOption = Annotated[
    int | None,
    _decoding("--num-beams", "num_beams", "Beams searched (1: greedy)."),
]
MaxNewOption = Annotated[
    int | None, _decoding("--max-new-tokens", "max_new_tokens", "Most tokens generated.")
]
MinNewOption = Annotated[
    int | None, _decoding("--min-new-tokens", "min_new_tokens", "Fewest tokens generated.")
]
LengthPenaltyOption = Annotated[
    float | None,
    _decoding(
        "--length-penalty",
        "length_penalty",
        "Exponent of the length in beam scores (negative: shorter).",
    ),
]
RepetitionPenaltyOption = Annotated[
    float | None,
    _decoding("--repetition-penalty", "repetition_penalty", "Penalty on repeats (1: none)."),
]
DoSampleOption = Annotated[
    bool,
    typer.Option(
        "--do-sample",
        help="Sample instead of searching (torch backend); --set generate.seed=N (vqa.seed with "
        "questions) draws the same samples every run.",
    ),
]
TopPOption = Annotated[
    float | None, _decoding("--top-p", "top_p", "With --do-sample: the nucleus probability mass.")
]
TemperatureOption = Annotated[
    float | None, _decoding("--temperature", "temperature", "With --do-sample: the temperature.")
]
ResumeResultsOption = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted run in --out: the rows of its results file are kept "
        "and their images or questions not run again.",
    ),
]
ShuffleOption = Annotated[
    bool,
    typer.Option(
        "--shuffle-images",
        "--blind",
        help="Grounding check: each image is shown with another input's text (a derangement); "
        "a grounded model then scores far lower.",
    ),
]


def load_generator_for(model: Path, backend: str, device: str, run_config: Any) -> Any:
    """The model behind ``--backend``: torch on ``--device``, or onnxruntime (its provider
    reported on stderr); ``run_config`` names the backbones of a LAVIS ``.pth``."""
    from qformer_cli.inference.generators import describe, load_generator
    from qformer_cli.runtime import init_distributed

    torch_device = init_distributed(device)[1] if backend == "torch" else None
    generator = load_generator(model, backend, torch_device, run_config)
    if backend == "onnx":
        Console(stderr=True).print(describe(generator), markup=False)
    return generator


def generation_flags(section: str, **flags: Any) -> dict[str, Any]:
    """Dedicated generation flags as ``section.key`` overrides."""
    return {f"{section}.{key}": value for key, value in flags.items()}


# --------------------------------------------------------------------------------------------
# qformer caption / eval-caption


def _caption(
    model: Path,
    run_config: Any,
    *,
    images: Path | None,
    annotations: Path | None,
    split: str,
    prompt_given: bool,
    batch_size: int,
    shuffle_images: bool,
    device: str,
    out_dir: Path,
    backend: str = "torch",
    quiet: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    from qformer_cli.data import BadSampleLog
    from qformer_cli.inference.caption import caption_inputs, caption_prompt, caption_to_files

    bad = BadSampleLog(skip=run_config.data.skip_bad_samples)
    samples, ground_truth = caption_inputs(images, annotations, split)  # read before the model
    generator = load_generator_for(model, backend, device, run_config)
    settings = run_config.generate
    with progress_report("caption", quiet) as progress:
        result = caption_to_files(
            generator,
            samples,
            ground_truth,
            settings,
            caption_prompt(generator, settings, prompt_given),
            out_dir,
            batch_size=batch_size,
            shuffle_images=shuffle_images,
            bad=bad,
            max_image_pixels=run_config.data.max_image_pixels,
            progress=progress.counter,
            resume=resume,
        )
    return {"model": str(model), **result}


def _print_captions(result: dict[str, Any], as_json: bool, limit: int = 10) -> None:
    if as_json:
        print_json(result)
        return
    console = output_console(as_json)
    captions = json.loads(Path(result["captions"]).read_text())
    table = Table(title=f"Captions ({len(captions)} images, first {min(limit, len(captions))})")
    table.add_column("image_id")
    table.add_column("caption")
    table.add_column("file")
    for row in captions[:limit]:
        table.add_row(str(row["image_id"]), row["caption"], row.get("file", ""))
    console.print(table)
    if "metrics" in result:
        print_metrics(console, result["metrics"], "Caption scores (COCO scale)")
    console.print(f"wrote {result['captions']}", markup=False, highlight=False)
    _print_skipped(console, result)


def _print_skipped(console: Console, result: dict[str, Any]) -> None:
    if result.get("bad_samples"):
        reasons = ", ".join(f"{n} {why}" for why, n in result["bad_sample_reasons"].items())
        line = f"skipped {result['bad_samples']} bad samples ({reasons}): {result['skipped']}"
        console.print(line, markup=False, highlight=False)


@handles_errors
def caption(
    model: ModelOption,
    images: ImagesOption = None,
    annotations: AnnotationsOption = None,
    split: SplitOption = "val",
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Text prompt (default: the model's own).")
    ] = None,
    num_beams: NumBeamsOption = None,
    max_new_tokens: MaxNewOption = None,
    min_new_tokens: MinNewOption = None,
    length_penalty: LengthPenaltyOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    do_sample: DoSampleOption = False,
    top_p: TopPOption = None,
    temperature: TemperatureOption = None,
    batch_size: BatchOption = 32,
    shuffle_images: ShuffleOption = False,
    skip_bad_samples: SkipBadOption = False,
    resume: ResumeResultsOption = False,
    backend: BackendOption = "torch",
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Caption images with a stage-2 model; scores them when the ground truth is known."""
    from qformer_cli.errors import UsageError
    from qformer_cli.runtime import make_out_dir

    model = model_location(model)
    require_inputs(model=model, images=images, annotations=annotations)
    if resume and (out is None or shuffle_images):
        raise UsageError("--resume continues the run in --out (give it), without --blind")
    flags = generation_flags(
        "generate",
        prompt=prompt,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        length_penalty=length_penalty,
        repetition_penalty=repetition_penalty,
        do_sample=do_sample or None,
        top_p=top_p,
        temperature=temperature,
    )
    flags["data.skip_bad_samples"] = skip_bad_samples or None
    run_config = load_run_config("caption", config, overrides, flags)
    result = _caption(
        model,
        run_config,
        images=images,
        annotations=annotations,
        split=split,
        prompt_given=prompt is not None,
        batch_size=batch_size,
        shuffle_images=shuffle_images,
        device=device,
        out_dir=make_out_dir(out, "caption"),
        backend=backend,
        quiet=quiet,
        resume=resume,
    )
    _print_captions(result, as_json)


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
    batch_size: BatchOption = 32,
    skip_bad_samples: SkipBadOption = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
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
    model = model_location(model)
    require_inputs(predictions=predictions, model=model, annotations=annotations, images=images)
    out_dir = make_out_dir(out, "eval-caption")
    if model is not None:
        result = _caption(
            model,
            load_run_config(
                "eval-caption",
                config,
                overrides,
                {"data.skip_bad_samples": skip_bad_samples or None},
            ),
            images=images,
            annotations=annotations,
            split=split,
            prompt_given=False,
            batch_size=batch_size,
            shuffle_images=False,
            device=device,
            out_dir=out_dir,
            quiet=quiet,
        )
        metrics = {**result["metrics"], **_skip_fields(result)}
    else:
        ground_truth = annotations or sample_split_files(split).coco_captions
        metrics = evaluate_caption_files(ground_truth, predictions).to_dict()
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if as_json:
        print_json(metrics)
        return
    print_metrics(output_console(as_json), metrics, "Caption scores (COCO scale)")


def _skip_fields(result: dict[str, Any]) -> dict[str, Any]:
    """What was skipped, when anything was (else the scores alone, as ``--predictions``)."""
    if not result.get("bad_samples"):
        return {}
    keys = ("bad_samples", "bad_sample_reasons", "skipped")
    return {key: result[key] for key in keys if key in result}


# --------------------------------------------------------------------------------------------
# qformer eval-vqa


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
        Path | None,
        typer.Option(
            "--questions",
            help="VQAv2 questions JSON, or a JSONL / CSV table with image, question[, answers] "
            "(default: --split's).",
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations",
            help="VQAv2-format annotations JSON; without it, --questions are answered, not scored.",
        ),
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Folder holding the questions' images.")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            help="Template with {} for the question, or 'answer' / 'short-answer' (LAVIS); "
            "default: the config's vqa.prompt (answer).",
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="official (GT-Vision-Lab) | lavis (BLIP-2's numbers) | exact (the normalized "
            "answer equals any reference; for data without VQAv2's 10 answers per question).",
        ),
    ] = "official",
    blind: ShuffleOption = False,
    num_beams: NumBeamsOption = None,
    max_new_tokens: MaxNewOption = None,
    min_new_tokens: MinNewOption = None,
    length_penalty: LengthPenaltyOption = None,
    batch_size: BatchOption = 32,
    skip_bad_samples: SkipBadOption = False,
    resume: ResumeResultsOption = False,
    backend: BackendOption = "torch",
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Zero-shot VQA scored with the VQAv2 accuracy (leave-one-out over 10 answers); decoding
    settings from the config's vqa section (5 beams, up to 10 tokens, length penalty -1)."""
    from qformer_cli.data import BadSampleLog, read_vqa, sample_split_files
    from qformer_cli.data.tables import is_table, vqa_table_has_answers
    from qformer_cli.errors import UsageError
    from qformer_cli.inference.vqa import answer_to_file, score_to_file, vqa_template
    from qformer_cli.runtime import make_out_dir

    if (predictions is None) == (model is None):
        raise UsageError("give exactly one of --predictions FILE or --model DIR")
    if resume and (out is None or blind or model is None):
        raise UsageError(
            "--resume continues the run in --out (give it), with --model, without --blind"
        )
    model = model_location(model)
    require_inputs(
        model=model,
        predictions=predictions,
        questions=questions,
        annotations=annotations,
        images=images,
    )
    flags = generation_flags(
        "vqa",
        prompt=prompt,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        length_penalty=length_penalty,
    )
    flags["data.skip_bad_samples"] = skip_bad_samples or None
    run_config = load_run_config("eval-vqa", config, overrides, flags)
    settings = run_config.vqa
    files = sample_split_files(split)
    if questions is None:  # the sample split's questions, with their ground truth
        questions, annotations = files.vqa_questions, annotations or files.vqa_annotations
    elif is_table(questions):  # images beside it; its answers, if it has them, are the truth
        images = images or questions.parent
        if annotations is None and vqa_table_has_answers(questions):
            annotations = questions
    if annotations is None and predictions is not None:
        raise UsageError("--predictions is scored against --annotations: give the annotations")
    out_dir = make_out_dir(out, "eval-vqa")
    bad = BadSampleLog(skip=run_config.data.skip_bad_samples)
    result: dict[str, Any] = {"results": str(predictions), "shuffled_images": blind, "blind": blind}
    if model is not None:
        template = vqa_template(settings.prompt)
        # the questions are read (and checked) before the model loads
        samples = read_vqa(questions, annotations, images or files.image_dir, bad=bad)
        generator = load_generator_for(model, backend, device, run_config)
        with progress_report("answer", quiet) as progress:
            result.update(
                answer_to_file(
                    generator,
                    samples,
                    settings,
                    template,
                    out_dir,
                    batch_size=batch_size,
                    blind=blind,
                    bad=bad,
                    max_image_pixels=run_config.data.max_image_pixels,
                    progress=progress.counter,
                    resume=resume,
                ),
                model=str(model),
            )
        predictions = Path(result["results"])
    if annotations is None:  # questions without ground truth (e.g. VQAv2 test-dev): no score
        result.update(scored=False)
        if as_json:
            print_json(result)
            return
        console = output_console(as_json)
        console.print(
            f"wrote {predictions} (no --annotations: answers only, not scored)",
            markup=False,
            highlight=False,
        )
        _print_skipped(console, result)
        return
    skipped = bad.skipped_ids("question_id")
    accuracy = score_to_file(annotations, predictions, questions, metric, out_dir, skipped)
    result.update(accuracy, scored=True)
    if as_json:
        print_json(result)
        return
    _print_vqa(output_console(as_json), accuracy)
    _print_skipped(output_console(as_json), result)


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
# qformer eval-retrieval


@handles_errors
def eval_retrieval(
    model: Annotated[Path, typer.Option("--model", help="Stage-1 run or checkpoint directory.")],
    split: Annotated[
        str, typer.Option("--split", help="sample_data split when no --annotations.")
    ] = "val",
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations",
            help="COCO captions JSON, a LAVIS Karpathy val/test list, or dataset_coco.json (test).",
        ),
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="Image root (default: beside the JSON).")
    ] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Candidates re-ranked with ITM.")] = 128,
    hard_negatives: Annotated[
        Path | None,
        typer.Option(
            "--hard-negatives",
            help="Captions with a hard negative each, SugarCrepe's JSON ({id: {filename, "
            "caption, negative_caption}}; images relative to the file's folder): how often ITM, "
            "ITC and their sum prefer the caption. Default: the split's, without --annotations.",
        ),
    ] = None,
    batch_size: BatchOption = 64,
    skip_bad_samples: SkipBadOption = False,
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Image-text retrieval with a stage-1 checkpoint: ITC for all pairs, ITM re-rank of top k."""
    from qformer_cli.data import BadSampleLog, sample_split_files
    from qformer_cli.data.hard_negatives import read_hard_negatives
    from qformer_cli.eval.retrieval import read_retrieval_samples
    from qformer_cli.inference.retrieve import retrieval_to_file
    from qformer_cli.pretrained import load_stage1_pipeline
    from qformer_cli.runtime import init_distributed, make_out_dir

    model = model_location(model)
    require_inputs(
        model=model, annotations=annotations, images=images, hard_negatives=hard_negatives
    )
    flags = {"data.skip_bad_samples": skip_bad_samples or None}
    run_config = load_run_config("eval-retrieval", config, overrides, flags)
    data_config = run_config.data
    if annotations is None:
        split_files = sample_split_files(split)
        annotations = split_files.karpathy
        hard_negatives = hard_negatives or split_files.hard_negatives
    bad = BadSampleLog(skip=data_config.skip_bad_samples)
    samples = read_retrieval_samples(annotations, images, bad)  # before the model loads
    pairs = None if hard_negatives is None else read_hard_negatives(hard_negatives, bad=bad)
    _, torch_device = init_distributed(device)
    pipeline = load_stage1_pipeline(model, torch_device, run_config)
    out_dir = make_out_dir(out, "eval-retrieval")
    with progress_report("encode", quiet) as progress:
        result = retrieval_to_file(
            pipeline,
            annotations,
            samples,
            out_dir,
            k=k,
            batch_size=batch_size,
            device=torch_device,
            bad=bad,
            max_image_pixels=data_config.max_image_pixels,
            progress=progress.counter,
            hard_negatives=pairs,
        )
    if as_json:
        print_json(result)
        return
    _print_retrieval(result, annotations)


def _print_retrieval(result: dict[str, Any], annotations: Path) -> None:
    console = output_console(False)
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
        table.add_row(direction, *(f"{v:.2f}" for v in result[direction].values()))
    console.print(table)
    pairs = result.get("hard_negatives")
    if pairs is not None:
        table = Table(title=f"Caption preferred to its hard negative, % ({pairs['pairs']} pairs)")
        scores = ("itm", "itc", "itm_plus_itc")
        for column in ("pairs", *scores):
            table.add_column(column, justify="right" if column != "pairs" else "left")
        table.add_row("all", *(f"{pairs[s]:.2f}" for s in scores))
        for kind, values in pairs.get("per_kind", {}).items():
            table.add_row(kind, *(f"{values[s]:.2f}" for s in scores))
        console.print(table)
    _print_skipped(console, result)
