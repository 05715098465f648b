"""One image at a time: ``ask`` (questions or a free prompt, stage 2) and ``match`` (image-text
match scores, stage 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qformer_cli.cli.common import (
    ConfigOption,
    DebugOption,
    DeviceOption,
    JsonOption,
    SetOption,
    handles_errors,
    load_run_config,
    model_location,
    output_console,
    print_json,
    require_inputs,
)
from qformer_cli.cli.infer import (
    BackendOption,
    DoSampleOption,
    MaxNewOption,
    ModelOption,
    NumBeamsOption,
    TemperatureOption,
    TopPOption,
    generation_flags,
    load_generator_for,
)

ImageOption = Annotated[Path, typer.Option("--image", help="The image file.")]


@handles_errors
def ask(
    model: ModelOption,
    image: ImageOption,
    questions: Annotated[
        list[str] | None,
        typer.Argument(help="Questions about the image; none: continue --prompt freely."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            help="With questions: their template, with {} for the question, or answer / "
            "short-answer (default: the config's vqa.prompt). Without: the text to continue "
            "(default: the model's caption prompt).",
        ),
    ] = None,
    num_beams: NumBeamsOption = None,
    max_new_tokens: MaxNewOption = None,
    do_sample: DoSampleOption = False,
    top_p: TopPOption = None,
    temperature: TemperatureOption = None,
    backend: BackendOption = "torch",
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Answer questions about one image with a stage-2 model, or continue a free prompt; one
    answer per line (or --json)."""
    from qformer_cli.inference.caption import caption_prompt
    from qformer_cli.inference.vqa import ask as ask_image
    from qformer_cli.inference.vqa import vqa_template

    model = model_location(model)
    require_inputs(model=model, image=image)
    section = "vqa" if questions else "generate"
    flags = generation_flags(
        section,
        prompt=prompt,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample or None,
        top_p=top_p,
        temperature=temperature,
    )
    run_config = load_run_config("ask", config, overrides, flags)
    generator = load_generator_for(model, backend, device, run_config)
    if questions:
        settings = run_config.vqa
        template = vqa_template(settings.prompt)
        prompts = [template.format(question) for question in questions]
    else:
        settings = run_config.generate
        prompts = [caption_prompt(generator, settings, given=prompt is not None)]
    answers = ask_image(generator, image, prompts, settings)
    rows = [
        {"question": question, "prompt": text, "answer": answer}
        for question, text, answer in zip(questions or [None], prompts, answers, strict=True)
    ]
    if as_json:
        print_json({"model": str(model), "image": str(image), "answers": rows})
        return
    for row in rows:
        typer.echo(row["answer"])


@handles_errors
def match(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="Stage-1 run or checkpoint directory, or a transformers "
            "Blip2ForImageTextRetrieval directory.",
        ),
    ],
    image: ImageOption,
    texts: Annotated[
        list[str], typer.Option("--text", help="A text to score against the image (repeatable).")
    ],
    config: ConfigOption = None,
    overrides: SetOption = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """How well texts describe one image, with a stage-1 model: the ITM probability of a match
    and the ITC similarity (max over queries of the cosine)."""
    from qformer_cli.data import build_transform, load_image
    from qformer_cli.data.folder import image_file_sample
    from qformer_cli.inference.retrieve import match_scores
    from qformer_cli.pretrained import load_stage1_pipeline
    from qformer_cli.runtime import init_distributed

    model = model_location(model)
    require_inputs(model=model, image=image)
    run_config = load_run_config("match", config, overrides, {})  # the backbones of a LAVIS .pth
    _, torch_device = init_distributed(device)
    pipeline = load_stage1_pipeline(model, torch_device, run_config)
    transform = build_transform(pipeline.image_transform, False)
    pixels = transform(load_image(image_file_sample(image)))
    scores = match_scores(pipeline, pixels[None], list(texts))
    result: dict[str, Any] = {"model": str(model), "image": str(image), "matches": scores}
    if as_json:
        print_json(result)
        return
    table = Table(title=f"{image} (stage-1 model {model})")
    table.add_column("text")
    table.add_column("ITM match probability", justify="right")
    table.add_column("ITC similarity", justify="right")
    for row in scores:
        table.add_row(row["text"], f"{row['itm_probability']:.3f}", f"{row['itc_similarity']:.3f}")
    output_console(as_json).print(table)
