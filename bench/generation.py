"""Caption and VQA generation: this toolkit vs transformers' ``Blip2ForConditionalGeneration``.

Same weights on both sides: a tiny BLIP-2 (Blip2VisionModel, Q-Former, OPT with the shipped
sample tokenizer) built from configs and saved as a transformers directory, which this toolkit
loads as ``--model``. Batch 32, beam 5, images from sample_data val; captions (prompt "a photo
of", 30 new tokens) and VQA (left-padded questions, 10 new tokens, length penalty -1).

    python -m bench.generation [--quick] [--device cuda] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    OPTConfig,
)

from bench.common import (
    BenchOptions,
    Column,
    Machine,
    Table,
    Target,
    add_common_args,
    measure_machine,
    options_from_args,
    print_header,
    print_table,
    progress,
    throughput_rows,
    timeit_interleaved,
)
from qformer_cli.config import GenerationConfig
from qformer_cli.data import sample_backbone_dir, sample_split_files
from qformer_cli.inference.generate import generate_text, stop_token_ids
from qformer_cli.pretrained import load_stage2

NUM_QUERIES = 32
GENERATION_BATCH = 32  # issue #8: batch 32, beam 5


TINY_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, image_size=64, patch_size=8)  # fmt: skip
TINY_QFORMER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=512)  # fmt: skip


def build_tiny_blip2(
    directory: Path, vision: dict | None = None, qformer: dict | None = None
) -> None:
    """A random-weight BLIP-2 saved as a transformers directory: tiny vision encoder and
    Q-Former unless ``vision`` / ``qformer`` (Blip2VisionConfig / Blip2QFormerConfig fields)
    say otherwise; always the tiny OPT with the shipped sample tokenizer."""
    vision = vision or TINY_VISION
    qformer = {**(qformer or TINY_QFORMER), "encoder_hidden_size": vision["hidden_size"]}
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    side = vision["image_size"]
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": side, "width": side}), tokenizer, NUM_QUERIES
    )
    text = OPTConfig(
        vocab_size=len(processor.tokenizer), hidden_size=128, num_hidden_layers=3,
        num_attention_heads=4, ffn_dim=512, word_embed_proj_dim=128, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERIES,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)


def inputs(batch_size: int) -> tuple[list[Image.Image], list[str]]:
    files = sample_split_files("val")
    images = [Image.open(p).convert("RGB") for p in sorted(files.image_dir.glob("*.png"))]
    questions = json.loads(files.vqa_questions.read_text())["questions"]
    return images[:batch_size], [q["question"] for q in questions[:batch_size]]


def run(machine: Machine, options: BenchOptions, batch_size: int = 8) -> list[Table]:
    """The issue's setting: batch 32 whatever ``batch_size`` the other benchmarks use."""
    del machine, batch_size
    return [generation_table(options, GENERATION_BATCH)]


def generation_table(options: BenchOptions, batch_size: int) -> Table:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_tiny_blip2(directory)
        theirs = Blip2ForConditionalGeneration.from_pretrained(directory).to(options.device).eval()
        processor = Blip2Processor.from_pretrained(directory)
        ours = load_stage2(directory, options.device)
        images, questions = inputs(batch_size)
        tasks = {
            "caption": (
                ["a photo of"] * len(images),
                GenerationConfig(num_beams=5, max_new_tokens=30, min_new_tokens=8),
            ),
            "vqa": (
                [f"Question: {q} Answer:" for q in questions],
                GenerationConfig(
                    num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0
                ),
            ),
        }
        rows = []
        for task, (prompts, settings) in tasks.items():
            progress(f"generation: {task}")
            fns, same = _variants(
                theirs, processor, ours, images, prompts, settings, options.device
            )
            timings = timeit_interleaved(fns, options)
            rows += throughput_rows(timings, "transformers", len(images), same, f"{task}, ")
    columns = [
        Column("s / batch", "seconds", "{:.3f}"),
        Column("items/s", "items_per_s", "{:.1f}"),
        Column("× transformers", "ratio", "{:.2f}×"),
        Column("same outputs", "same", "{}"),
    ]
    notes = [
        *(
            Target(f"{row['name']} / transformers, items/s", row["ratio"], 1.0).line()
            for row in rows
            if row["name"].endswith("qformer")
        ),
        "tiny BLIP-2 (Blip2VisionModel 4x128, Q-Former 4x128, OPT 3x128), same weights on both "
        "sides; beam 5; captions 30 new tokens, VQA 10 with length penalty -1; "
        f"median of {options.repeats} interleaved runs after {options.warmup} warm-up",
    ]
    title = f"Generation vs transformers Blip2ForConditionalGeneration.generate, batch {batch_size}"
    return Table(title, columns, rows, notes=notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=GENERATION_BATCH)
    args = parser.parse_args(argv)
    options = options_from_args(args)
    machine = measure_machine(options.device, quick=options.quick)
    print_header(machine, "Generation vs transformers")
    print_table(generation_table(options, args.batch_size), options.table_format)
    return 0


def _variants(theirs, processor, ours, images, prompts, settings, device):
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(device)
    options = dict(
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        length_penalty=settings.length_penalty,
        eos_token_id=stop_token_ids(processor.tokenizer),
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    pixels = batch["pixel_values"]

    @torch.no_grad()
    def run_theirs() -> list[str]:
        output = theirs.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
        return [
            t.strip() for t in processor.tokenizer.batch_decode(output, skip_special_tokens=True)
        ]

    @torch.no_grad()
    def run_ours() -> list[str]:
        features = ours.vision(pixels)
        return generate_text(ours.bridge, ours.llm, ours.tokenizer, features, prompts, settings)

    same = "yes" if run_theirs() == run_ours() else "no"
    return {"transformers": run_theirs, "qformer": run_ours}, same


if __name__ == "__main__":
    sys.exit(main())
