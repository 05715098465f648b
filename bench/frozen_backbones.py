"""Training steps with the frozen backbones in the loop: what caching and bf16 buy at scale.

Two tables:

1. Stage-1 step (ITC+ITM+ITG, forward + backward + AdamW, ``qformer_preset("blip2")``) with the
   frozen vision encoder run online under ``no_grad`` (random-weight ``Blip2VisionModel``,
   ViT-g-shaped on CUDA, ViT-L-shaped on CPU: issue #8 items 3 and 5) next to the same step on
   cached features (what ``pretrain-stage1 --features`` does; the features are already in
   memory here, so disk reads are not counted).
2. Stage-2 step (LM loss through a frozen random-weight OPT, OPT-2.7B-shaped on CUDA,
   OPT-125M-shaped on CPU) with the LLM in bf16 and the bridge under bf16 autocast.

FLOPs include the frozen parts' forward passes; MFU is against the bf16 matmul rate timed in the
same rounds on CUDA (fp32 on CPU for table 1, whose targets are fp32 there).

    python -m bench.frozen_backbones [--quick] [--device cuda] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/frozen_backbones.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers

from bench.common import (
    FLOP_NOTE,
    BenchOptions,
    Column,
    Machine,
    Table,
    add_common_args,
    count_flops,
    measure_machine,
    measured_row,
    options_from_args,
    peak_memory_gib,
    print_header,
    print_table,
    progress,
    rates_note,
    result_columns,
    timeit_with_rates,
)
from qformer_cli.config import TrainConfig
from qformer_cli.models.backbones import LanguageModel, VisionEncoder
from qformer_cli.models.blip2 import Stage1Model, Stage2Model
from qformer_cli.models.config import qformer_preset
from qformer_cli.runtime import autocast
from qformer_cli.train.loop import build_optimizer
from qformer_cli.train.sharding import checkpoint_activations
from qformer_cli.train.stage1 import Stage1Batch, Stage1Objective
from qformer_cli.train.stage2 import Stage2Batch, Stage2Objective

SAMPLE_LLM_TOKENIZER = Path(__file__).resolve().parent.parent / "sample_data/backbones/opt"
IMAGE_SIZE, PATCH = 224, 14  # 16 x 16 patches + [CLS] = 257 tokens
TEXT_LEN, CLS_ID, DEC_ID, FIRST_PLAIN_TOKEN = 32, 101, 30522, 1000

# Blip2VisionConfig fields: EVA ViT-g/14 (BLIP-2's encoder) and CLIP ViT-L/14's shape.
ENCODERS = {
    "vit-g": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
              "num_attention_heads": 16},
    "vit-l": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16},
}  # fmt: skip
# OPTConfig fields: facebook/opt-2.7b and facebook/opt-125m shapes (vocabulary 50272).
LLMS = {
    "opt-2.7b": {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "word_embed_proj_dim": 2560},
    "opt-125m": {"hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "word_embed_proj_dim": 768},
}  # fmt: skip
CAPTION_WORDS = [
    "a",
    "red",
    "cube",
    "small",
    "blue",
    "sphere",
    "left",
    "of",
    "the",
    "green",
    "large",
    "cylinder",
    "behind",
    "yellow",
]


def build_encoder(name: str, device: torch.device, dtype: torch.dtype) -> VisionEncoder:
    config = transformers.Blip2VisionConfig(
        **ENCODERS[name], image_size=IMAGE_SIZE, patch_size=PATCH, attn_implementation="sdpa"
    )
    with torch.device(device):
        model = transformers.Blip2VisionModel(config).to(dtype)
    return VisionEncoder(model)


def build_llm(name: str, device: torch.device) -> LanguageModel:
    config = transformers.OPTConfig(**LLMS[name], vocab_size=50272, attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.OPTForCausalLM(config).to(torch.bfloat16)
    return LanguageModel(model.eval().requires_grad_(False), "decoder-only")


def text_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(
        FIRST_PLAIN_TOKEN, DEC_ID, (batch_size, TEXT_LEN), generator=generator
    )
    input_ids[:, 0] = CLS_ID
    return input_ids.to(device), torch.ones_like(input_ids).to(device)


def captions(batch_size: int) -> list[str]:
    generator = torch.Generator().manual_seed(2)
    picks = torch.randint(0, len(CAPTION_WORDS), (batch_size, 12), generator=generator)
    return [" ".join(CAPTION_WORDS[i] for i in row) for row in picks.tolist()]


# --------------------------------------------------------------------------------------------
# Table 1: stage 1, encoder online vs cached features


def stage1_steps(
    encoder: VisionEncoder, batch_size: int, device: torch.device, precision: str
) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """(timed steps, the same as forward + backward only for FLOP counting), per variant."""
    torch.manual_seed(0)
    model = Stage1Model(qformer_preset("blip2", encoder_width=encoder.hidden_size)).to(device)
    optimizer = build_optimizer(model.train(), TrainConfig())
    objective = Stage1Objective(model, DEC_ID, mining="hardest")
    pixels = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    input_ids, text_mask = text_batch(batch_size, device)
    image_ids = torch.arange(batch_size, device=device)
    with torch.no_grad(), autocast(device, precision):
        cached = encoder(pixels).float()  # (B, 257, C): what a feature cache would hold

    def forward_backward(online: bool) -> None:
        with autocast(device, precision):
            if online:
                with torch.no_grad():
                    image_embeds = encoder(pixels)  # (B, 257, C), frozen
            else:
                image_embeds = cached
            losses = objective(Stage1Batch(image_embeds, input_ids, text_mask, image_ids))
        losses.total.backward()

    def step(online: bool) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            forward_backward(online)
            optimizer.step()

        return run

    names = {"cached features": False, "encoder online": True}
    steps = {name: step(online) for name, online in names.items()}
    flop_fns = {
        name: (lambda online=online: forward_backward(online)) for name, online in names.items()
    }
    return steps, flop_fns


def encoder_table(
    machine: Machine, options: BenchOptions, batch_size: int, encoder_name: str
) -> Table:
    device = options.device
    precision = "bf16" if device.type == "cuda" else "fp32"
    progress(f"frozen encoder: building a random {encoder_name} and the blip2 Q-Former on {device}")
    encoder = build_encoder(
        encoder_name, device, torch.bfloat16 if precision == "bf16" else torch.float32
    )
    steps, flop_fns = stage1_steps(encoder, batch_size, device, precision)
    flops = {name: count_flops(fn) for name, fn in flop_fns.items()}
    memory = {name: peak_memory_gib(fn, device) for name, fn in steps.items()}
    timings, during = timeit_with_rates(steps, options, machine)
    rows = [
        measured_row(name, precision, timings[name], flops[name], batch_size, during, memory[name])
        for name in steps
    ]
    overhead = timings["encoder online"].median / timings["cached features"].median
    notes = [
        f"the online step takes {overhead:.2f}× the cached one: the frozen encoder's forward is "
        f"{(flops['encoder online'] - flops['cached features']) / batch_size / 1e9:.1f} "
        "GFLOP/image that a feature cache pays once per data set instead of once per epoch",
        f"{encoder_name}: {ENCODERS[encoder_name]} , {IMAGE_SIZE} px, patch {PATCH}; "
        f"{'bf16 weights and ' if precision == 'bf16' else ''}{precision} compute, no_grad",
        rates_note(machine, during),
        FLOP_NOTE,
    ]
    title = (
        f"Stage-1 step, BLIP-2 Q-Former, frozen {encoder_name} online vs cached features, "
        f"B={batch_size} ({device.type})"
    )
    columns = result_columns(device, "ms / step")
    return Table(title, columns, rows, "cached features", "images_per_s", notes)


# --------------------------------------------------------------------------------------------
# Table 2: stage 2 through a frozen LLM


def saved_activation_mib(forward: Callable[[], torch.Tensor], model: torch.nn.Module) -> float:
    """MiB of tensors autograd keeps from ``forward()`` for backward (each storage once, the
    model's own weights excluded): the activation memory checkpointing trades for recompute."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(seen.values()) / 2**20


def stage2_table(machine: Machine, options: BenchOptions, batch_size: int, llm_name: str) -> Table:
    """The step as is, then with the LLM's block activations checkpointed (timed one after the
    other: checkpointing rewraps the LLM in place)."""
    device = options.device
    progress(f"stage 2: building a random {llm_name} (bf16) and the blip2 bridge on {device}")
    llm = build_llm(llm_name, device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(SAMPLE_LLM_TOKENIZER)
    torch.manual_seed(0)
    bridge = Stage2Model(qformer_preset("blip2"), llm.embedding_dim).to(device)
    optimizer = build_optimizer(bridge.train(), TrainConfig())
    objective = Stage2Objective(bridge, llm, tokenizer, max_text_len=TEXT_LEN).train()
    image_embeds = torch.randn(batch_size, 257, 1408, device=device)  # cached ViT-g features
    batch = Stage2Batch.captions(image_embeds, captions(batch_size), "a photo of")

    def loss() -> torch.Tensor:
        with autocast(device, "bf16"):
            return objective(batch).total

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    rows = []
    for name in ("stage-2 step", "stage-2 step, activation checkpointing"):
        if name.endswith("checkpointing"):
            checkpoint_activations(llm.model)
        flops = count_flops(lambda: loss().backward())
        saved = saved_activation_mib(loss, objective)
        memory = peak_memory_gib(step, device)
        timings, during = timeit_with_rates({name: step}, options, machine)
        row = measured_row(name, "bf16", timings[name], flops, batch_size, during, memory)
        rows.append({**row, "saved_mib": saved})
    text_tokens = len(tokenizer(batch.prompts[0] + " " + batch.targets[0]).input_ids)
    plain, checkpointed = rows
    notes = [
        f"activation checkpointing keeps {checkpointed['saved_mib']:,.0f} MiB of activations for "
        f"backward instead of {plain['saved_mib']:,.0f} MiB, for "
        f"{checkpointed['ms'] / plain['ms']:.2f}x the step time (it reruns the LLM's forward)",
        f"{llm_name}: {LLMS[llm_name]}, vocabulary 50272, bf16 weights, frozen (eval, no grads "
        f"for its weights; gradients flow through it to the soft prompt)",
        f"trainable: Q-Former (blip2, no text parts) + Linear(768 -> {llm.embedding_dim}), fp32 "
        f"master weights, bf16 autocast; 32 query tokens + ~{text_tokens} text tokens per sample",
        "saved MiB: tensors autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks)",
        rates_note(machine, during),
        FLOP_NOTE,
    ]
    title = f"Stage-2 step, frozen {llm_name}-shaped LLM, B={batch_size} ({device.type})"
    columns = [*result_columns(device, "ms / step"), Column("saved MiB", "saved_mib", "{:,.0f}")]
    return Table(title, columns, rows, "stage-2 step", "images_per_s", notes)


def run(
    machine: Machine,
    options: BenchOptions,
    batch_size: int = 8,
    encoder_name: str = "",
    llm_name: str = "",
    tables: tuple[str, ...] = ("encoder", "stage2"),
) -> list[Table]:
    on_gpu = options.device.type == "cuda"
    encoder_name = encoder_name or ("vit-g" if on_gpu else "vit-l")
    llm_name = llm_name or ("opt-2.7b" if on_gpu else "opt-125m")
    results = []
    if "encoder" in tables:
        results.append(encoder_table(machine, options, batch_size, encoder_name))
    if on_gpu:
        torch.cuda.empty_cache()
    if "stage2" in tables:
        results.append(stage2_table(machine, options, batch_size, llm_name))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="",
                        help="default: vit-g on CUDA, vit-l on CPU")  # fmt: skip
    parser.add_argument("--llm", choices=sorted(LLMS), default="",
                        help="default: opt-2.7b on CUDA, opt-125m on CPU")  # fmt: skip
    parser.add_argument("--tables", default="encoder,stage2", help="encoder, stage2 or both")
    args = parser.parse_args(argv)
    options = options_from_args(args)
    machine = measure_machine(options.device, options.quick)
    print_header(machine, "Frozen-backbone training steps")
    tables = tuple(args.tables.split(","))
    for table in run(machine, options, args.batch_size, args.encoder, args.llm, tables):
        print_table(table, options.table_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
