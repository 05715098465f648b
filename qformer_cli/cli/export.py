"""The commands that write a model in another form: ``export-onnx`` and ``convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qformer_cli.cli.common import (
    DebugOption,
    JsonOption,
    handles_errors,
    model_location,
    output_console,
    print_json,
    require_inputs,
)

# --------------------------------------------------------------------------------------------
# qformer export-onnx


@handles_errors
def export_onnx_command(
    model: Annotated[
        Path,
        typer.Option(
            "--model", help="Stage-2 (caption/VQA) or stage-1 (ITC retrieval) run or checkpoint."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the graphs and manifest.")],
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="fp32 | fp16 | int8 (int8: int8 matmul weights, activations quantized as they "
            "run; for CPUs).",
        ),
    ] = "fp32",
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
    onnxruntime and PyTorch disagree beyond 1e-4 (fp32) / 1e-2 (fp16) / 1e-1 (int8) of each
    output's scale."""
    import torch

    from qformer_cli.export.onnx_export import export_onnx
    from qformer_cli.pretrained import checkpoint_stage, load_stage1_pipeline, load_stage2
    from qformer_cli.runtime import make_out_dir

    model = model_location(model)
    require_inputs(model=model)
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
        table.add_column("/ max(1, |output|)", justify="right")
        for graph, by_batch in parity["max_abs_diff"].items():
            scales = parity["scale"][graph]
            worst = max(max(outputs.values()) for outputs in by_batch.values())
            relative = max(
                diff / scales[batch][name]
                for batch, outputs in by_batch.items()
                for name, diff in outputs.items()
            )
            table.add_row(graph, f"{worst:.2e}", f"{relative:.2e}")
        console.print(table)
    console.print(f"wrote {out}", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------
# qformer convert


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
    """Write a checkpoint in another layout: a transformers BLIP-2 directory
    (Blip2ForImageTextRetrieval for stage 1, Blip2ForConditionalGeneration for stage 2) or a
    LAVIS {"model": state_dict} .pth (stage 1 or 2)."""
    import torch

    from qformer_cli.errors import UsageError

    model = model_location(model)
    require_inputs(model=model)
    if to == "transformers":
        from qformer_cli.export import transformers_blip2 as export
        from qformer_cli.pretrained import checkpoint_stage, load_stage1_pipeline, load_stage2

        if checkpoint_stage(model) == 1:
            retrieval = load_stage1_pipeline(model, torch.device("cpu"))
            export.export_stage1_to_transformers(retrieval, out)
            source = retrieval.directory
        else:
            pipeline = load_stage2(model, torch.device("cpu"))
            export.export_to_transformers(pipeline, out)
            source = pipeline.directory
    elif to == "lavis":
        from qformer_cli.checkpoint import VISION_WEIGHTS
        from qformer_cli.models.convert import save_lavis
        from qformer_cli.pretrained import load_trainable

        trainable, source = load_trainable(model)
        if (source / VISION_WEIGHTS).is_file():  # a .pth of the Q-Former alone would lose it
            raise UsageError(
                f"{source}: its vision encoder was fine-tuned, and --to lavis writes the "
                "Q-Former alone: use --to transformers"
            )
        save_lavis(trainable, out)
    else:
        raise UsageError(f"--to {to!r}: choose transformers or lavis")
    result = {"model": str(source), "out": str(out), "format": to}
    if as_json:
        print_json(result)
    else:
        output_console(as_json).print(f"wrote {out} ({to})", markup=False, highlight=False)
