"""LAVIS 1.0.2's stage-1 training step, served over a pipe to ``bench/stage1_step.py``.

Runs under the LAVIS environment's python (``make lavis-env``), in its own process, so that
``bench/stage1_step.py`` can time LAVIS's step interleaved with ours in one run. The unmodified
``Blip2Qformer`` at BLIP-2's stage-1 settings (bert-base Q-Former, 32 queries, cross-attention
every 2nd layer, ITC width 256, captions of 32 tokens) on ViT-g-shaped encoder output
(B, 257, 1408) given as the image (``bench/lavis_env.py``), fp32; one step = zero_grad +
forward (ITC + ITM + LM) + backward + AdamW (LAVIS's optimizer settings, lr 1e-4, decay 0.05).

Protocol, one JSON object per line on stdout: first ``{"ready": ..., "flops_per_step": ...,
"versions": ...}``; then for each line "step" on stdin one step and ``{"seconds": ...}``, for
"count" one step under the profiler and ``{"kernels": ...}`` (``bench/kernels.py``); "quit" or
end of input stops. Anything else LAVIS prints goes to stderr.

    .venv-lavis/bin/python bench/lavis_worker.py --batch-size 8 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

if __package__ in (None, ""):  # run as a script from the LAVIS environment
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.kernels import count_kernels
from bench.lavis_env import bert_like_vocabulary, import_blip2_qformer, start_process_group

IMAGE_TOKENS, VISION_WIDTH = 257, 1408  # EVA ViT-g/14 at 224 px, as bench/stage1_step.py
TEXT_LEN = 32
CAPTION_WORDS = 40  # more than fit: every caption is truncated to TEXT_LEN tokens, no padding
WORDS = [f"w{i}" for i in range(20_000)]


def build(batch_size: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer reads it when built
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(bert_like_vocabulary(WORDS)) + "\n")
        blip2_qformer = import_blip2_qformer(vocab_file, VISION_WIDTH)
        torch.manual_seed(seed)
        model = blip2_qformer(
            vit_model="eva_clip_g",
            img_size=224,
            freeze_vit=True,
            num_query_token=32,
            cross_attention_freq=2,
            embed_dim=256,
            max_txt_len=TEXT_LEN,
        ).train()
    generator = torch.Generator().manual_seed(seed + 1)
    features = torch.randn(batch_size, IMAGE_TOKENS, VISION_WIDTH, generator=generator)
    picks = torch.randint(len(WORDS), (batch_size, CAPTION_WORDS), generator=generator)
    captions = [" ".join(WORDS[i] for i in row) for row in picks.tolist()]
    tokens = model.tokenizer(captions, padding="max_length", truncation=True, max_length=TEXT_LEN)
    assert all(sum(mask) == TEXT_LEN for mask in tokens["attention_mask"]), "captions padded"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    return model, optimizer, {"image": features, "text_input": captions}


def forward_backward(model: torch.nn.Module, samples: dict) -> None:
    model(samples).loss.backward()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, samples: dict) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    forward_backward(model, samples)
    optimizer.step()
    return time.perf_counter() - start


def reply(message: dict) -> None:
    sys.__stdout__.write(json.dumps(message) + "\n")
    sys.__stdout__.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr):  # the pipe carries replies only
        start_process_group()
        model, optimizer, samples = build(args.batch_size, args.seed)
        with FlopCounterMode(display=False) as counter:
            forward_backward(model, samples)
        optimizer.zero_grad(set_to_none=True)
    reply(
        {
            "ready": True,
            "flops_per_step": counter.get_total_flops(),
            "threads": torch.get_num_threads(),
            "versions": {p: version(p) for p in ("salesforce-lavis", "torch", "transformers")},
        }
    )
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        with contextlib.redirect_stdout(sys.stderr):
            if command == "step":
                answer: dict = {"seconds": step(model, optimizer, samples)}
            elif command == "count":
                one_step = lambda: step(model, optimizer, samples)  # noqa: E731
                answer = {"kernels": count_kernels(one_step, torch.device("cpu"))}
            else:
                answer = {"error": f"unknown command {command!r}"}
        reply(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
