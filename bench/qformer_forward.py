"""Q-Former forward at BLIP-2 sizes: ours against transformers' ``Blip2QFormerModel`` (SDPA).

Both hold the same weights (a random transformers model copied into ours through
``convert.import_state_dict``). Input: B=8 images of 257 ViT-g tokens, width 1408; fp32, eval,
``no_grad``; plus ours under bf16 autocast. Both sides include ``ln_vision``: transformers'
Q-Former model has none, so ours is applied to its input, as in the parity tests.

    python -m bench.qformer_forward [--quick] [--device cuda] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/qformer_forward.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from bench.common import (
    FLOP_NOTE,
    BenchOptions,
    Machine,
    Table,
    Target,
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
from qformer_cli.models.config import qformer_preset
from qformer_cli.models.convert import import_state_dict
from qformer_cli.models.qformer import QFormer

IMAGE_TOKENS = 257  # ViT-g/14 at 224 px: 16 x 16 patches + [CLS]
REFERENCE = "transformers Blip2QFormerModel"
# transformers' Q-Former model holds neither the queries nor ln_vision: ours keep their init.
NOT_IN_TRANSFORMERS = {"qformer.ln_vision.bias", "qformer.ln_vision.weight", "qformer.query_tokens"}


@dataclass
class Pair:
    transformers: Blip2QFormerModel
    ours: QFormer


def build_pair(device: torch.device) -> Pair:
    """A random transformers Q-Former (SDPA) and ours holding the same weights, in eval mode."""
    torch.manual_seed(0)
    theirs = Blip2QFormerModel(Blip2QFormerConfig(attn_implementation="sdpa")).eval()
    ours = QFormer(qformer_preset("blip2"), with_text=False).eval()
    source = {f"qformer.{k}": v for k, v in theirs.state_dict().items()}
    report = import_state_dict(ours, source, "transformers", prefix="qformer.")
    if report.unexpected or set(report.missing) != NOT_IN_TRANSFORMERS:
        raise RuntimeError(f"weights did not map one to one: {report.summary()}")
    return Pair(theirs.to(device), ours.to(device))


def forward_variants(
    pair: Pair, images: torch.Tensor
) -> dict[str, tuple[str, Callable[[], torch.Tensor]]]:
    """name -> (precision, forward returning the query outputs (B, 32, 768))."""
    # detached: a view of a parameter made under no_grad still claims requires_grad, which trips
    # FlopCounterMode's module tracker
    queries = pair.ours.query_tokens.detach().expand(images.shape[0], -1, -1)  # (B, 32, 768)

    def transformers_fp32() -> torch.Tensor:
        encoder_states = pair.ours.ln_vision(images)  # (B, 257, 1408)
        return pair.transformers(
            query_embeds=queries, encoder_hidden_states=encoder_states
        ).last_hidden_state

    def ours_fp32() -> torch.Tensor:
        return pair.ours.query_features(images)

    def ours_bf16() -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return pair.ours.query_features(images)

    return {
        REFERENCE: ("fp32", transformers_fp32),
        "ours QFormer": ("fp32", ours_fp32),
        "ours QFormer, bf16 autocast": ("bf16", ours_bf16),
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _targets(rows: list[dict]) -> list[str]:
    """The issue's goals for this benchmark, each with its verdict."""
    speed = {row["name"]: row["images_per_s"] for row in rows}
    ours, bf16 = speed["ours QFormer"], speed["ours QFormer, bf16 autocast"]
    return [
        Target("ours fp32 / transformers fp32, images/s", ours / speed[REFERENCE], 1.0).line(),
        Target("ours bf16 / ours fp32, images/s", bf16 / ours, 1.8).line(),
    ]


@torch.no_grad()
def run(machine: Machine, options: BenchOptions, batch_size: int = 8) -> list[Table]:
    device = options.device
    progress(f"Q-Former forward: building both models on {device}")
    pair = build_pair(device)
    torch.manual_seed(1)
    images = torch.randn(batch_size, IMAGE_TOKENS, 1408, device=device)  # frozen ViT-g output
    variants = forward_variants(pair, images)
    fns = {name: fn for name, (_, fn) in variants.items()}

    outputs = {name: fn() for name, fn in fns.items()}  # also a first warm-up
    progress("Q-Former forward: counting FLOPs")
    flops = {name: count_flops(fn) for name, fn in fns.items()}
    memory = {name: peak_memory_gib(fn, device) for name, fn in fns.items()}
    timings, during = timeit_with_rates(fns, options, machine)

    rows = [
        measured_row(name, precision, timings[name], flops[name], batch_size, during, memory[name])
        for name, (precision, _) in variants.items()
    ]
    notes = [
        *_targets(rows),
        "same weights: max |ours - transformers| (fp32) = "
        f"{_max_diff(outputs['ours QFormer'], outputs[REFERENCE]):.1e}; max |bf16 - fp32| = "
        f"{_max_diff(outputs['ours QFormer, bf16 autocast'], outputs['ours QFormer']):.1e}",
        f"transformers attention: {pair.transformers.config._attn_implementation}; median of "
        f"{options.repeats} interleaved runs after {options.warmup} warm-up; "
        "the bf16 row's MFU is against the bf16 matmul rate",
        rates_note(machine, during),
        FLOP_NOTE,
    ]
    title = (
        f"Q-Former forward, BLIP-2 sizes, B={batch_size}, {IMAGE_TOKENS}x1408 image tokens, "
        f"eval, no_grad ({device.type})"
    )
    return [
        Table(
            title,
            result_columns(device, "ms / batch"),
            rows,
            reference=REFERENCE,
            ratio_key="images_per_s",
            notes=notes,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    options = options_from_args(args)
    machine = measure_machine(options.device, options.quick)
    print_header(machine, "Q-Former forward benchmark")
    for table in run(machine, options, args.batch_size):
        print_table(table, options.table_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
