"""The ONNX backend against PyTorch eager, same weights, same machine, timed side by side.

1. ``vision_qformer.onnx`` (frozen vision encoder -> Q-Former -> projection) on onnxruntime's CPU
   provider, exported in fp32 and in int8 (``export-onnx --precision int8``: dynamic
   quantization), vs the same modules in PyTorch eager (fp32, ``no_grad``), at batch 1 and 8: a
   BLIP-2-sized Q-Former (BERT-base, 32 queries, cross-attention every 2nd layer) over a
   ViT-B/16-shaped random encoder (224 px, 197 tokens of width 768; a ViT-g would make one CPU
   run take minutes).
2. End-to-end captioning of the tiny model (batch 32, prompt "a photo of", up to 30 new
   tokens), greedy and with 5 beams: ``qformer caption --backend onnx``'s generation loop vs
   ``--backend torch``'s.

    python -m bench.onnx_backend [--quick] [--repeats N] [--captions-only]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from transformers import Blip2Processor

from bench.common import (
    FLOP_NOTE,
    BenchOptions,
    Column,
    Machine,
    Table,
    Target,
    add_common_args,
    count_flops,
    measure_machine,
    options_from_args,
    print_header,
    print_table,
    progress,
    throughput_rows,
    timeit_interleaved,
)
from bench.generation import build_tiny_blip2, inputs
from qformer_cli.config import GenerationConfig
from qformer_cli.export.onnx_export import VisionQFormer, export_onnx
from qformer_cli.export.onnx_runtime import OnnxPipeline, generate_text_onnx
from qformer_cli.inference.generate import generate_text
from qformer_cli.pretrained import Stage2Pipeline, load_stage2

VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, image_size=224, patch_size=16)  # fmt: skip
BLIP2_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, cross_attention_frequency=2)  # fmt: skip
VISION_BATCHES = (1, 8)
CAPTION_BATCH = 32
TORCH, ONNX = "PyTorch eager", "onnxruntime (CPU)"
ONNX_INT8 = "onnxruntime (CPU), int8 export"


def export(
    directory: Path, vision: dict | None, qformer: dict | None, precisions: tuple[str, ...]
) -> tuple[Stage2Pipeline, dict[str, OnnxPipeline]]:
    """Build and save one BLIP-2, load it in PyTorch and export it once per precision (each
    export runs its own parity check); the onnxruntime pipelines by precision."""
    build_tiny_blip2(directory / "blip2", vision, qformer)
    torch_pipeline = load_stage2(directory / "blip2", torch.device("cpu"))
    onnx_pipelines = {}
    for precision in precisions:
        onnx_dir = directory / f"onnx-{precision}"
        export_onnx(torch_pipeline, onnx_dir, precision=precision)
        onnx_pipelines[precision] = OnnxPipeline.load(onnx_dir, ["CPUExecutionProvider"])
    return torch_pipeline, onnx_pipelines


def vision_table(machine: Machine, options: BenchOptions) -> Table:
    with tempfile.TemporaryDirectory() as tmp:
        progress("onnx: building and exporting a BLIP-2 Q-Former over a ViT-B/16-shaped encoder")
        torch_pipeline, exported = export(Path(tmp), VIT_B16, BLIP2_QFORMER, ("fp32", "int8"))
        module = VisionQFormer(torch_pipeline).eval()
        rows = []
        for batch in VISION_BATCHES:
            pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            fns = _vision_fns(module, {ONNX: exported["fp32"], ONNX_INT8: exported["int8"]}, pixels)
            reference = fns[TORCH]()  # (B, 32, LLM width) soft prompt
            scale = max(1.0, float(np.abs(reference).max()))
            flops = count_flops(lambda: fns[TORCH]())  # noqa: B023
            progress(f"onnx: vision_qformer at batch {batch}")
            timings = timeit_interleaved(fns, options)
            for name, timing in timings.items():
                gap = float(np.abs(fns[name]() - reference).max())
                rows.append({
                    "name": f"{name}, B={batch}", "ms": timing.median * 1e3,
                    "spread": timing.spread * 100, "images_per_s": batch / timing.median,
                    "gflop_per_image": flops / batch / 1e9, "max_diff": gap,
                    "relative_diff": gap / scale, "ratio": timings[TORCH].median / timing.median,
                })  # fmt: skip
    goals = [
        Target(f"{name} / eager at B={batch}", row["ratio"], 1.0)
        for name in (ONNX, ONNX_INT8)
        for batch in VISION_BATCHES
        for row in rows
        if row["name"] == f"{name}, B={batch}"
    ]
    notes = [
        *(goal.line() for goal in goals),
        "eager and the fp32 export in fp32; the int8 export: int8 weights for every weight matmul "
        "and the patch convolution, activations quantized as it runs (onnxruntime "
        "quantize_dynamic), float32 in and out; max |onnx - torch| over the soft prompt, and "
        "divided by its scale max(1, max |torch|) (what the export's parity check bounds: "
        "1e-4 fp32, 1e-1 int8)",
        "2 intra-op threads (torch default here; onnxruntime default: cores); "
        f"median of {options.repeats} interleaved runs after {options.warmup} warm-up",
        f"machine: {machine.describe()}",
        FLOP_NOTE,
    ]
    columns = [
        Column("ms / batch", "ms", "{:,.1f}"),
        Column("spread %", "spread", "{:.0f}"),
        Column("images/s", "images_per_s", "{:.2f}"),
        Column("GFLOP/image", "gflop_per_image", "{:.1f}"),
        Column("max |onnx - torch|", "max_diff", "{:.1e}"),
        Column("/ scale", "relative_diff", "{:.1e}"),
        Column("× eager", "ratio", "{:.2f}×"),
    ]
    title = "vision_qformer.onnx vs PyTorch eager: ViT-B/16-shaped encoder + BLIP-2 Q-Former (cpu)"
    return Table(title, columns, rows, notes=notes)


def _vision_fns(
    module: VisionQFormer, onnx_pipelines: dict[str, OnnxPipeline], pixels: torch.Tensor
) -> dict[str, Callable[[], np.ndarray]]:
    array = pixels.numpy()

    @torch.no_grad()
    def eager() -> np.ndarray:
        return module(pixels).numpy()

    def onnx_run(pipeline: OnnxPipeline) -> Callable[[], np.ndarray]:
        return lambda: pipeline.soft_prompt(array)

    return {TORCH: eager, **{name: onnx_run(p) for name, p in onnx_pipelines.items()}}


SEARCHES = {
    "greedy": GenerationConfig(num_beams=1, max_new_tokens=30, min_new_tokens=8),
    "beam search, 5 beams (caption's default)": GenerationConfig(
        num_beams=5, max_new_tokens=30, min_new_tokens=8
    ),
}


def caption_table(options: BenchOptions, search: str) -> Table:
    settings = SEARCHES[search]
    with tempfile.TemporaryDirectory() as tmp:
        progress("onnx: exporting the tiny BLIP-2 for end-to-end captioning")
        torch_pipeline, exported = export(Path(tmp), None, None, ("fp32",))
        onnx_pipeline = exported["fp32"]
        processor = Blip2Processor.from_pretrained(Path(tmp) / "blip2")
        images, _ = inputs(CAPTION_BATCH)
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        prompts = ["a photo of"] * len(images)

        @torch.no_grad()
        def run_torch() -> list[str]:
            features = torch_pipeline.vision(pixels)
            return generate_text(
                torch_pipeline.bridge, torch_pipeline.llm, torch_pipeline.tokenizer,
                features, prompts, settings,
            )  # fmt: skip

        def run_onnx() -> list[str]:
            return generate_text_onnx(
                onnx_pipeline, onnx_pipeline.soft_prompt(pixels.numpy()), prompts, settings
            )

        same = "yes" if run_torch() == run_onnx() else "no"
        timings = timeit_interleaved({TORCH: run_torch, ONNX: run_onnx}, options)
    rows = throughput_rows(timings, TORCH, len(images), same)
    ratio = rows[1]["ratio"]
    columns = [
        Column("s / batch", "seconds", "{:.3f}"),
        Column("captions/s", "items_per_s", "{:.1f}"),
        Column("× torch backend", "ratio", "{:.2f}×"),
        Column("same captions", "same", "{}"),
    ]
    notes = [
        Target("onnx backend / torch backend, captions/s", ratio, 1.0).line(),
        f"{search}, KV cache on both sides (the onnx backend prefills each image once and "
        "copies its cache to the beams)",
    ]
    title = f"End-to-end captioning, {search}, tiny BLIP-2, batch {CAPTION_BATCH} (cpu)"
    return Table(title, columns, rows, notes=notes)


def run(machine: Machine, options: BenchOptions, batch_size: int = 8) -> list[Table]:
    del batch_size  # this benchmark fixes its batch sizes (1 and 8; 32 for captions)
    if options.device.type != "cpu":
        progress("onnx: skipped (it measures onnxruntime's CPU provider; run it with --device cpu)")
        return []
    return [vision_table(machine, options), *(caption_table(options, s) for s in SEARCHES)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--captions-only", action="store_true", help="only the end-to-end captioning tables"
    )
    args = parser.parse_args(argv)
    options = options_from_args(args)
    machine = measure_machine(options.device, options.quick)
    print_header(machine, "ONNX backend vs PyTorch eager")
    tables = (
        [caption_table(options, search) for search in SEARCHES]
        if args.captions_only
        else run(machine, options)
    )
    for table in tables:
        print_table(table, options.table_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
