"""Record one stage-1 step of LAVIS 1.0.2's ``Blip2Qformer``: the fixture of the LAVIS parity test.

Runs the unmodified ``lavis.models.blip2_models.blip2_qformer.Blip2Qformer`` at a small size
(BERT width 64, 2 layers, 4 queries) on stand-in image features, with dropout off, in float64:
one forward (ITC + ITM + LM losses) and one backward. float64 because at random init the ITC
gradient is a small difference of near-equal terms (every text feature points much the same way),
where float32 rounding alone moves it by ~1e-4 relative; in float64 a real difference stands out.

Writes ``tests/fixtures/lavis_stage1.{safetensors,json}``: LAVIS's state dict under LAVIS's
names, the inputs (image features, token ids, attention masks), the ITM negatives LAVIS drew and
the weights it drew them from, the losses and every parameter's gradient.
``tests/train/test_lavis_parity.py`` replays it on our model (no LAVIS needed there).

Needs LAVIS's own environment (``make lavis-env``); CI never runs this script. The offline
adaptations are ``bench/lavis_env.py``'s (bare ``lavis`` packages, local bert-base-uncased
lookups at the small sizes here, encoder features given as the image), with ``ln_vision`` as
torch's ``nn.LayerNorm``: LAVIS's subclass only adds a cast to float32, which float64 cannot
take. A one-process gloo group is started, as LAVIS's trainer does.

Usage:  make lavis-env && .venv-lavis/bin/python scripts/lavis_reference.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/, from the LAVIS venv

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from bench.lavis_env import import_blip2_qformer, start_process_group

SEED = 0
NUM_QUERY_TOKENS = 4
EMBED_DIM = 32  # ITC projection width
TEMPERATURE = 0.6  # the ITC temperature (LAVIS initializes it to 0.07)
MAX_TEXT_LEN = 12  # LAVIS pads every caption to this length ("max_length")
IMAGE_TOKENS, IMAGE_WIDTH = 10, 48  # the stand-in vision features (B, N, C)
BERT_SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 2,  # layer 0 with cross-attention, layer 1 without (frequency 2)
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
CROSS_ATTENTION_FREQ = 2
# Samples 1 and 4 share a caption word for word (different images), as templated data does;
# LAVIS's negative weights keep such a pair, the distinct mode drops it.
CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles",
    "a small yellow star next to a large purple circle on the left",
    "a blue square",
    "two green triangles",
    "an orange star below a red square and a green circle",
]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0, as bert-base


def vocabulary() -> list[str]:
    words = sorted({word for caption in CAPTIONS for word in caption.split()})
    return SPECIAL_TOKENS + words + [f"word{i}" for i in range(40)]  # unused rows, as real vocabs


# ------------------------------------------------------------------------------------------------
# Importing LAVIS's stage-1 model alone, offline.


def import_lavis(vocab_file: Path) -> type:
    """LAVIS's Blip2Qformer at the small sizes; ``ln_vision`` as torch's ``nn.LayerNorm`` (LAVIS's
    subclass only adds a cast to float32, which float64 cannot take)."""
    sizes = {"vocab_size": len(vocabulary()), **BERT_SIZES}
    return import_blip2_qformer(vocab_file, IMAGE_WIDTH, sizes, layer_norm=nn.LayerNorm)


# ------------------------------------------------------------------------------------------------


class MultinomialRecorder:
    """Stands in for ``torch.multinomial`` and keeps every (weights, drawn index) LAVIS used."""

    def __init__(self) -> None:
        self.real = torch.multinomial
        self.calls: list[tuple[torch.Tensor, int]] = []

    def __call__(self, weights: torch.Tensor, num_samples: int, *args, **kwargs) -> torch.Tensor:
        drawn = self.real(weights, num_samples, *args, **kwargs)
        self.calls.append((weights.detach().clone(), int(drawn.item())))
        return drawn


def record(out_dir: Path) -> None:
    torch.set_num_threads(1)
    start_process_group()
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(vocabulary()) + "\n")
        blip2_qformer = import_lavis(vocab_file)
        torch.manual_seed(SEED)
        model = blip2_qformer(
            vit_model="eva_clip_g",
            img_size=224,
            freeze_vit=True,
            num_query_token=NUM_QUERY_TOKENS,
            cross_attention_freq=CROSS_ATTENTION_FREQ,
            embed_dim=EMBED_DIM,
            max_txt_len=MAX_TEXT_LEN,
        )
    # Move every parameter off its init (ln_vision's ones and zeros, the query FFN copied from
    # the text FFN, the tied decoder) so that a mis-mapped name cannot go unnoticed, and far
    # enough that the text features differ: at init they nearly coincide and ITC's gradient,
    # a difference of near-equal terms, is too small to tell the gradient modes apart well.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        # Outside BLIP's clamp range [0.001, 0.5], which LAVIS's BLIP-2 does not apply: a model
        # that clamped would see other similarities, losses and no temperature gradient.
        model.temp.fill_(TEMPERATURE)
    model.double().train()

    batch = len(CAPTIONS)
    features = torch.randn(batch, IMAGE_TOKENS, IMAGE_WIDTH, dtype=torch.float64)
    tokens = model.tokenizer(
        CAPTIONS,
        padding="max_length",
        truncation=True,
        max_length=MAX_TEXT_LEN,
        return_tensors="pt",
    )  # what forward computes from the same captions
    recorder = MultinomialRecorder()
    torch.multinomial = recorder
    try:
        output = model({"image": features, "text_input": CAPTIONS})
    finally:
        torch.multinomial = recorder.real
    output.loss.backward()

    # forward draws a negative image for each text first, then a negative text for each image
    image_calls, text_calls = recorder.calls[:batch], recorder.calls[batch:]
    assert len(text_calls) == batch
    tensors = {f"state.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors |= {
        f"grad.{name}": p.grad.clone() for name, p in model.named_parameters() if p.requires_grad
    }
    tensors |= {
        "input.image_features": features,
        "input.input_ids": tokens.input_ids,
        "input.attention_mask": tokens.attention_mask,
        "weights.t2i": torch.stack([w for w, _ in image_calls]),
        "weights.i2t": torch.stack([w for w, _ in text_calls]),
    }
    meta = {
        "generated_by": "scripts/lavis_reference.py",
        "versions": {p: version(p) for p in ("salesforce-lavis", "torch", "transformers")},
        "captions": CAPTIONS,
        "qformer": {  # our QFormerConfig for the same model
            "hidden_size": BERT_SIZES["hidden_size"],
            "num_layers": BERT_SIZES["num_hidden_layers"],
            "num_heads": BERT_SIZES["num_attention_heads"],
            "intermediate_size": BERT_SIZES["intermediate_size"],
            "max_position_embeddings": BERT_SIZES["max_position_embeddings"],
            "num_query_tokens": NUM_QUERY_TOKENS,
            "encoder_width": IMAGE_WIDTH,
            "cross_attention_freq": CROSS_ATTENTION_FREQ,
            "vocab_size": len(model.tokenizer),
            "embed_dim": EMBED_DIM,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "pad_token_id": model.tokenizer.pad_token_id,
        },
        "dec_token_id": model.tokenizer.bos_token_id,
        "negative_image_per_text": [index for _, index in image_calls],
        "negative_text_per_image": [index for _, index in text_calls],
        "losses": {
            "itc": output.loss_itc.item(),
            "itm": output.loss_itm.item(),
            "itg": output.loss_lm.item(),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "lavis_stage1.safetensors")
    (out_dir / "lavis_stage1.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(
        json.dumps(meta["losses"]),
        "negatives:",
        meta["negative_image_per_text"],
        meta["negative_text_per_image"],
    )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "tests/fixtures")
    record(parser.parse_args().out)


if __name__ == "__main__":
    main()
