"""Train the tiny pretrained backbones under ``sample_data/backbones/`` on the synthetic world.

    python scripts/train_backbones.py all            # or: vision | opt | t5 | bert
    python scripts/train_backbones.py opt --threads 2

Each backbone is saved with ``save_pretrained`` (config + safetensors + tokenizer or image
processor) and loads offline with ``AutoModel*.from_pretrained``. A ``training_summary.json``
beside it records the recipe, final losses and the metrics of ``backbone_metrics.py``.

- ``bert/``: BertForMaskedLM (Q-Former init), WordPiece tokenizer (lowercase) + ``[DEC]``.
- ``vision/``: Blip2VisionModel (the layout transformers' BLIP-2 loads) trained CLIP-style against
  a small CLIPTextModel (discarded).
- ``opt/``: OPTForCausalLM on caption and "[scene description.] Question: ... Answer: ...\\n"
  text (no images): blind without the description, taught to read it when it is there.
- ``t5/``: T5ForConditionalGeneration on the same text, as (encoder input, target) pairs.

Only the train split (plus unrendered random scenes of the same world) is used for training.
Runs are deterministic for a given thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    Blip2VisionConfig,
    Blip2VisionModel,
    BlipImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import backbone_metrics
import make_sample_data as world

from qformer_cli.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    ImageTransformConfig,
)

SEED = 0
ROOT = Path(__file__).resolve().parent.parent
# Sizes the Q-Former "tiny" preset depends on: do not change without changing it.
BERT_SIZES = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=64,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)
LM_MAX_POSITIONS = 128  # room for 32 soft-prompt queries + prompt + answer
EXTRA_VISION_SCENES = 6000


# ---------------------------------------------------------------- corpus


@dataclass
class WorldText:
    """The training split's text, keyed by image."""

    captions: dict[int, list[str]]
    descriptions: dict[int, str]  # a complete description: every object's size, colour, place
    qa: dict[int, list[tuple[str, str]]]  # image_id -> [(question, canonical answer)]

    def all_sentences(self) -> list[str]:
        """Every caption, description and "Question: q Answer: a" text (tokenizer training)."""
        qa = [f"{qa_prompt(q)} {a}" for pairs in self.qa.values() for q, a in pairs]
        captions = [c for cs in self.captions.values() for c in cs]
        return captions + [f"{d}." for d in self.descriptions.values()] + qa


def load_world_text(data_dir: Path, split: str = "train") -> WorldText:
    read_json = backbone_metrics.read_json
    scenes = read_json(data_dir / f"scenes_{split}.json")
    captions: dict[int, list[str]] = {}
    for entry in read_json(data_dir / f"karpathy_{split}.json"):
        captions.setdefault(entry["image_id"], []).append(entry["caption"])
    questions = read_json(data_dir / f"vqa_{split}_questions.json")["questions"]
    annotations = read_json(data_dir / f"vqa_{split}_annotations.json")["annotations"]
    answer_of = {a["question_id"]: a["multiple_choice_answer"] for a in annotations}
    qa: dict[int, list[tuple[str, str]]] = {}
    for q in questions:
        qa.setdefault(q["image_id"], []).append((q["question"], answer_of[q["question_id"]]))
    return WorldText(
        captions=captions,
        descriptions={s["image_id"]: backbone_metrics.scene_description(s) for s in scenes},
        qa=qa,
    )


def qa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


# ---------------------------------------------------------------- tokenizers


def build_bert_tokenizer(sentences: list[str], vocab_size: int = 512) -> BertTokenizer:
    """WordPiece (lowercase) trained on the world's text, plus ``[DEC]`` as a special token."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size - 1, special_tokens=specials)
    wordpiece.train_from_iterator(sentences, trainer)
    tokenizer = BertTokenizer(vocab=wordpiece.get_vocab(), model_max_length=64)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[DEC]"]})
    return tokenizer


def build_byte_bpe(sentences: list[str], special_tokens: list[str], template: str) -> Tokenizer:
    """Byte-level BPE (lowercasing) like GPT-2/OPT's; "\\n" is the single byte token "Ċ".

    ``template`` is the post-processor for one sequence, e.g. "</s> $A" (OPT prepends BOS) or
    "$A </s>" (T5 appends EOS)."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # an upper bound: the world's ~60 words run out of merges well before
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
    )
    bpe.train_from_iterator([s + "\n" for s in sentences], trainer)
    used = [t for t in special_tokens if t in template]
    bpe.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, bpe.token_to_id(t)) for t in used]
    )
    return bpe


def build_opt_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    # OPT's ids: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3; "</s>" is prepended to each text.
    bpe = build_byte_bpe(sentences, ["<s>", "<pad>", "</s>", "<unk>"], "</s> $A")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=LM_MAX_POSITIONS,
    )


def build_t5_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    # T5's ids: <pad>=0 (also the decoder start), </s>=1 appended to each text, <unk>=2.
    bpe = build_byte_bpe(sentences, ["<pad>", "</s>", "<unk>"], "$A </s>")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=LM_MAX_POSITIONS,
    )


# ---------------------------------------------------------------- training loop


def cosine_with_warmup(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def run_training(
    model: torch.nn.Module,
    loss_of_step: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    name: str,
) -> list[float]:
    """AdamW (wd 0.01), linear warmup then cosine to 10% of ``lr``; returns per-step losses."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps, max(1, steps // 20))
    )
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        loss = loss_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"[{name}] step {step:4d}/{steps} loss {loss.item():.4f} ({elapsed:.0f}s)")
    model.eval()
    return losses


def tail_mean(losses: list[float], n: int = 20) -> float:
    return round(sum(losses[-n:]) / len(losses[-n:]), 4)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- BERT (Q-Former init)


def mask_tokens(
    input_ids: torch.Tensor, special: torch.Tensor, tokenizer: BertTokenizer, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 15% of non-special tokens are targets; 80% [MASK], 10% random, 10% kept."""
    chosen = (torch.rand(input_ids.shape, generator=gen) < 0.15) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=gen)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    random_ids = torch.randint(5, len(tokenizer) - 1, input_ids.shape, generator=gen)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


def train_bert(text: WorldText, data_dir: Path, out: Path, steps: int) -> dict[str, Any]:
    tokenizer = build_bert_tokenizer(text.all_sentences())
    config = BertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **BERT_SIZES
    )
    torch.manual_seed(SEED)
    model = BertForMaskedLM(config)
    sentences = [c for cs in text.captions.values() for c in cs]
    sentences += [q for pairs in text.qa.values() for q, _ in pairs]
    encoded = tokenizer(
        sentences, padding=True, return_tensors="pt", return_special_tokens_mask=True
    )
    ids, attention = encoded["input_ids"], encoded["attention_mask"]  # (N, L)
    special = encoded["special_tokens_mask"].bool()  # (N, L); padding counts as special
    gen = torch.Generator().manual_seed(SEED)
    batch_size = 128

    def loss_of_step(step: int) -> torch.Tensor:
        rows = torch.randint(0, len(ids), (batch_size,), generator=gen)
        masked, labels = mask_tokens(ids[rows], special[rows], tokenizer, gen)
        return model(input_ids=masked, attention_mask=attention[rows], labels=labels).loss

    losses = run_training(model, loss_of_step, steps, 1e-3, "bert")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "recipe": f"MLM (15%, 80/10/10) on {len(sentences)} captions and questions, "
        f"{steps} steps x batch {batch_size}, AdamW lr 1e-3, warmup + cosine",
        "vocab_size": len(tokenizer),
        "final_mlm_loss": tail_mean(losses),
        "first_mlm_loss": round(losses[0], 4),
        **backbone_metrics.mlm_accuracy(out, data_dir),
    }


# ---------------------------------------------------------------- vision (CLIP-style)

# The shipped encoder's shape; ``layer_norm_eps`` equals the tiny preset's ``ln_vision`` eps, so
# a converted transformers BLIP-2 (whose ``post_layernorm`` is our ``ln_vision``) is exact.
VISION_SIZES = dict(
    image_size=64,
    patch_size=8,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    # Blip2VisionConfig's default (1e-10, for loading EVA weights) would start every layer at
    # about zero; CLIP's 0.02 trains from a real random init.
    initializer_range=0.02,
)


class ImageTextContrastive(torch.nn.Module):
    """CLIP's two towers with BLIP-2's vision tower: a ``Blip2VisionModel`` and a small
    ``CLIPTextModel``, each projected to a shared space, with a learnable temperature.

    The image embedding is ``post_layernorm`` of the [CLS] token of the encoder output, as CLIP
    pools (``Blip2VisionModel.pooler_output`` would apply that LayerNorm twice). The encoder
    output itself, before ``post_layernorm``, is what the Q-Former reads."""

    def __init__(self, vision: Blip2VisionConfig, text: CLIPTextConfig, projection_dim: int):
        super().__init__()
        self.vision = Blip2VisionModel(vision)
        self.text = CLIPTextModel(text)
        self.visual_projection = torch.nn.Linear(vision.hidden_size, projection_dim, bias=False)
        self.text_projection = torch.nn.Linear(text.hidden_size, projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embedded = self.vision.embeddings(pixel_values)  # (B, 1 + patches, D)
        tokens = self.vision.encoder(inputs_embeds=embedded).last_hidden_state  # (B, T, D)
        pooled = self.vision.post_layernorm(tokens[:, 0])  # (B, D)
        return torch.nn.functional.normalize(self.visual_projection(pooled), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return torch.nn.functional.normalize(self.text_projection(pooled), dim=-1)

    def logits_per_image(self, pixel_values: torch.Tensor, **tokens: torch.Tensor) -> torch.Tensor:
        """(B images, N texts) scaled cosine similarities."""
        similarity = self.image_embeds(pixel_values) @ self.text_embeds(**tokens).T
        return self.logit_scale.exp() * similarity


def extra_scenes(count: int) -> tuple[torch.Tensor, list[list[str]]]:
    """``count`` more scenes of the same world from the "vision-pretrain" random streams (not
    shipped): their pixels (count, 3, 64, 64) and captions. More images, less overfitting."""
    transform = EvalTransform(ImageTransformConfig(64))
    scenes = [world.make_scene(SEED, "vision-pretrain", index)[0] for index in range(count)]
    return torch.stack([transform(s.image) for s in scenes]), [s.captions for s in scenes]


def train_vision(text: WorldText, data_dir: Path, out: Path, steps: int) -> dict[str, Any]:
    tokenizer = build_bert_tokenizer(text.all_sentences())
    scenes = backbone_metrics.read_json(data_dir / "scenes_train.json")
    more_pixels, more_captions = extra_scenes(EXTRA_VISION_SCENES)
    shipped_pixels = backbone_metrics.load_split_pixels(data_dir, scenes, None)
    pixels = torch.cat([shipped_pixels, more_pixels])  # (N, 3, 64, 64)
    captions_of = [text.captions[s["image_id"]] for s in scenes] + more_captions
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = Blip2VisionConfig(**VISION_SIZES)
    torch.manual_seed(SEED)
    model = ImageTextContrastive(vision_config, text_config, projection_dim=128)
    gen = torch.Generator().manual_seed(SEED)
    picker = random.Random(SEED)
    batch_size = 64

    def loss_of_step(step: int) -> torch.Tensor:
        rows = torch.randperm(len(pixels), generator=gen)[:batch_size].tolist()
        captions = [picker.choice(captions_of[r]) for r in rows]
        negatives = [shape_swapped(c, picker) for c in captions]
        tokens = tokenizer(captions + negatives, padding=True, return_tensors="pt")
        logits = model.logits_per_image(
            pixels[rows], input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return contrastive_loss_with_hard_negatives(logits)

    losses = run_training(model, loss_of_step, steps, 1e-3, "vision")
    model.vision.save_pretrained(out)
    image_processor().save_pretrained(out)
    return {
        "recipe": "CLIP contrastive loss between a Blip2VisionModel and a 2-layer CLIPTextModel "
        f"(discarded) on the {len(scenes)} train images and {EXTRA_VISION_SCENES} more scenes of "
        "the world (random streams 'vision-pretrain', not shipped), "
        "image vs one of its 5 captions plus one shape-swapped hard negative caption per image, "
        f"{steps} steps x batch {batch_size}, AdamW lr 1e-3, "
        "warmup + cosine, no augmentation",
        "final_clip_loss": tail_mean(losses),
        "first_clip_loss": round(losses[0], 4),
        "val_image_to_caption_r1": backbone_metrics.retrieval_r1(
            model.image_embeds, model.text_embeds, tokenizer, data_dir
        ),
        "parameters": sum(p.numel() for p in model.vision.parameters()),
        **backbone_metrics.probe_report(out, data_dir),
    }


SHAPE_WORD = re.compile(r"\b(circle|square|triangle)\b")


def shape_swapped(caption: str, rng: random.Random) -> str:
    """The caption with one shape word replaced by another: a hard negative that only an
    encoder that sees shapes can tell from the positive (colour and place stay the same)."""
    match = rng.choice(list(SHAPE_WORD.finditer(caption)))
    other = rng.choice([s for s in ("circle", "square", "triangle") if s != match.group(1)])
    return caption[: match.start()] + other + caption[match.end() :]


def contrastive_loss_with_hard_negatives(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP loss where each image also competes against B extra (hard negative) captions.

    logits_per_image: (B, 2B), columns [positives; negatives]. Image -> text picks its caption
    among all 2B; text -> image uses the B positive captions only."""
    batch = logits_per_image.shape[0]
    targets = torch.arange(batch)
    image_to_text = torch.nn.functional.cross_entropy(logits_per_image, targets)
    text_to_image = torch.nn.functional.cross_entropy(logits_per_image[:, :batch].T, targets)
    return (image_to_text + text_to_image) / 2


def image_processor() -> BlipImageProcessorPil:
    """BLIP-2's eval transform: a square bicubic resize, CLIP mean/std (what
    ``qformer_cli.data.EvalTransform`` does). Saved as a plain "BlipImageProcessor" config; the
    PIL variant needs no torchvision."""
    return BlipImageProcessorPil(
        size={"height": VISION_SIZES["image_size"], "width": VISION_SIZES["image_size"]},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,  # bicubic
        do_convert_rgb=True,
    )


# ---------------------------------------------------------------- LM text (OPT and T5)


LM_CONTEXT_SHARE = 0.5  # of LM examples: scene context + question + answer
LM_BLIND_QA_SHARE = 0.25  # blind "Question: q Answer: a" (the rest are captions)
ANSWER_WEIGHT = 3.0  # OPT loss weight of the answer tokens after "Answer:"
# The OPT's first steps see only lookups (a description, then a colour/shape/size question about
# one of its objects): mixed in with blind answers and captions from the start, it learned to
# count from a description but never to look an attribute up in it.
OPT_READING_WARMUP_STEPS = 400
# Then, until this step, half the examples ask what needs an object found by colour and shape
# together (its size; "is there a {colour} {shape}?" and the other yes/no forms): without these
# steps the OPT answered every size question "large", description or not.
OPT_BINDING_UNTIL_STEP = 1000

BOS_MARK = "</s>"  # OPT's BOS; T5 drops it from contexts
LMExample = tuple[str, str, str]  # (context, prompt, continuation); the text is their join


def context_forms(objects: list[world.SceneObject], noise_kind: str, rng: random.Random) -> str:
    """One textual scene description to put before a question: usually complete (every object's
    size, colour, shape and place, in reading or shuffled order, sometimes counted), else one of
    the seven caption templates (which may leave out sizes or places)."""
    if rng.random() < 0.25:
        return rng.choice(world.caption_templates(objects, noise_kind))
    ordered = list(objects)
    if rng.random() < 0.5:
        rng.shuffle(ordered)
    description = world.full_description(ordered)
    roll = rng.random()
    if roll < 0.25:
        count = len(objects)
        head = f"there are {world.NUMBER_WORDS[count]} shapes:"
        head = "there is one shape:" if count == 1 else head
        description = f"{head} {description}"
    elif roll < 0.4:
        background = "plain" if noise_kind == "clean" else "noisy"
        description = f"{description} on a {background} background"
    return description


def context_question(objects: list[world.SceneObject], rng: random.Random) -> tuple[str, str]:
    """A (question, answer) about the scene: yes/no, number or "other" (colour, shape, size,
    by name or by place), a third each, drawn with the dataset's own question templates."""
    kind = rng.randrange(3)
    if kind == 2:
        return lookup_question(objects, rng)
    if kind == 0:
        spec = world.yes_no_question(objects, rng.random() < 0.5, rng)
    else:
        spec = world.number_question(objects, rng)
    return spec.question, spec.answer


def lookup_question(objects: list[world.SceneObject], rng: random.Random) -> tuple[str, str]:
    """A (question, answer) that names or places one object and asks for another of its
    attributes (the dataset's "other" templates: colour, shape, size)."""
    spec = rng.choice(world.other_question_candidates(objects, rng))
    return spec.question, spec.answer


QuestionMaker = Callable[[list[world.SceneObject], random.Random], tuple[str, str]]


def described_scene_example(rng: random.Random, ask: QuestionMaker) -> LMExample:
    """A described-scene example (description, "Question: q Answer:", a) about a fresh random
    scene of the world; ``ask`` picks the question."""
    objects = world.sample_objects(rng)
    noise_kind = rng.choice(world.NOISE_KINDS)
    question, answer = ask(objects, rng)
    # Half the contexts end with OPT's BOS, as in BLIP-2: [soft prompt] </s> Question: ...
    end = f".{BOS_MARK}" if rng.random() < 0.5 else "."
    return f"{context_forms(objects, noise_kind, rng)}{end}", qa_prompt(question), answer


def lm_pairs(text: WorldText, rng: random.Random) -> Iterator[LMExample]:
    """Endless (context, prompt, continuation) examples; the LM reads context and prompt and
    predicts the continuation.

    Half are "description. Question: q Answer: a" about a fresh random scene of the world
    (``world.sample_objects``, not rendered), with varied description forms, so the LM learns
    to READ what comes before the question (the soft prompt's job later). The rest carry no
    context: blind "Question: q Answer: a" and captions from the train split, where the LM can
    only learn the answer prior (blind) and fluent text. A few captions follow their scene's
    full description (description -> caption)."""
    image_ids = sorted(text.captions)
    while True:
        roll = rng.random()
        if roll < LM_CONTEXT_SHARE:
            yield described_scene_example(rng, context_question)
            continue
        image_id = rng.choice(image_ids)
        if roll < LM_CONTEXT_SHARE + LM_BLIND_QA_SHARE:
            question, answer = rng.choice(text.qa[image_id])
            yield "", qa_prompt(question), answer
        elif rng.random() < 0.1:
            yield text.descriptions[image_id] + ".", "", rng.choice(text.captions[image_id])
        else:
            yield "", "", rng.choice(text.captions[image_id])


def binding_question(objects: list[world.SceneObject], rng: random.Random) -> tuple[str, str]:
    """A (question, answer) that needs an object found by its colour and shape together: the
    size of a named object (where the scene has a unique colour-shape pair) or a yes/no, half
    each."""
    if rng.random() < 0.5:
        sized = [
            spec
            for spec in world.other_question_candidates(objects, rng)
            if spec.question_type == "what size is the"
        ]
        if sized:
            return sized[0].question, sized[0].answer
    spec = world.yes_no_question(objects, rng.random() < 0.5, rng)
    return spec.question, spec.answer


def lookup_pairs(rng: random.Random) -> Iterator[LMExample]:
    """Endless described-scene examples whose question is a lookup (``lookup_question``)."""
    while True:
        yield described_scene_example(rng, lookup_question)


def binding_pairs(rng: random.Random) -> Iterator[LMExample]:
    """Endless described-scene examples, half asking a lookup, half a ``binding_question``."""
    while True:
        ask = binding_question if rng.random() < 0.5 else lookup_question
        yield described_scene_example(rng, ask)


# From the end of the lookup warmup, every SLOT_BATCH_EVERY-th step the OPT reads its context
# as OBJECT_SLOTS vectors, one object per vector (the mean of its phrase's token embeddings), in
# shuffled order, repeated, among noise vectors: the form a Q-Former's queries can give it.
OBJECT_SLOTS = 16  # the tiny Q-Former's queries
SLOT_BATCH_EVERY = 2
SlotExample = tuple[list[str], str, str]  # (one phrase per slot, "" = noise; prompt; continuation)


def object_slot_example(rng: random.Random) -> SlotExample:
    """A fresh random scene as slot phrases (each object at least once, some repeated, the
    background now and then, the rest noise), with a question (a third binding, else the
    dataset's mix) or, one time in four, one of its captions."""
    objects = world.sample_objects(rng)
    noise_kind = rng.choice(world.NOISE_KINDS)
    phrases = [f"{o.size} {o.color} {o.shape} {o.position}" for o in objects]
    background = "plain background" if noise_kind == "clean" else "noisy background"
    slots = phrases + [""] * (OBJECT_SLOTS - len(phrases))
    for index in range(len(phrases), OBJECT_SLOTS):
        roll = rng.random()
        if roll < 0.3:
            slots[index] = rng.choice(phrases)
        elif roll < 0.4:
            slots[index] = background
    rng.shuffle(slots)
    if rng.random() < 0.25:
        return slots, "", rng.choice(world.caption_templates(objects, noise_kind))
    ask = binding_question if rng.random() < 0.33 else context_question
    question, answer = ask(objects, rng)
    return slots, qa_prompt(question), answer


def slot_batch(
    rng: random.Random,
    model: OPTForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    batch_size: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """``inputs_embeds`` (B, S + L, D): S object-slot vectors, then the embedded "</s>prompt
    continuation\n" text; ``weights`` (B, S + L) as in ``opt_batch`` (0 on slots and prompt)."""
    examples = [object_slot_example(rng) for _ in range(batch_size)]
    embed = model.get_input_embeddings()
    scale = embed.weight.detach().std()
    slots = torch.randn(batch_size, OBJECT_SLOTS, embed.embedding_dim, generator=gen) * scale
    for row, (phrases, _, _) in enumerate(examples):
        for index, phrase in enumerate(phrases):
            if phrase:
                ids = tokenizer(phrase, add_special_tokens=False, return_tensors="pt").input_ids
                slots[row, index] = embed(ids[0]).mean(0) + 0.1 * slots[row, index]
    texts = [join_example(p, c) + "\n" for _, p, c in examples]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    ids, attention = tokens["input_ids"], tokens["attention_mask"]  # (B, L)
    weights = attention.float()
    for row, (_, prompt, _) in enumerate(examples):
        weights[row, : len(tokenizer(prompt)["input_ids"]) if prompt else 1] = 0.0
        if prompt:
            weights[row] *= ANSWER_WEIGHT
    length = OBJECT_SLOTS + ids.shape[1]
    offsets = torch.randint(0, LM_MAX_POSITIONS - length + 1, (batch_size, 1), generator=gen)
    ones = torch.ones(batch_size, OBJECT_SLOTS, dtype=attention.dtype)
    return {
        "inputs_embeds": torch.cat([slots, embed(ids)], dim=1),
        "input_ids": torch.cat([torch.full_like(ones, tokenizer.pad_token_id), ids], dim=1),
        "attention_mask": torch.cat([ones, attention], dim=1),
        "position_ids": offsets + torch.arange(length)[None, :],
        "weights": torch.cat([torch.zeros_like(ones, dtype=weights.dtype), weights], dim=1),
    }


@torch.no_grad()
def slot_reading_accuracy(
    model: OPTForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: int = 800
) -> dict[str, float]:
    """Greedy first answer token vs the answer's, per question opening, on fresh scenes given
    as object slots (a held-out random stream): how well the LM reads the form a soft prompt
    can take."""
    rng, gen = random.Random(SEED + 100), torch.Generator().manual_seed(SEED + 100)
    model.eval()
    right: dict[str, list[bool]] = {}
    for _ in range(examples):
        batch = slot_batch(rng, model, tokenizer, 1, gen)
        weights = batch["weights"][0]
        if weights.max() <= 1:  # a caption, not an answer
            continue
        first = int(weights.nonzero()[0])  # the answer's first token
        logits = model(
            inputs_embeds=batch["inputs_embeds"][:, :first],
            position_ids=batch["position_ids"][:, :first],
        ).logits[0, -1]
        prompt = tokenizer.decode(batch["input_ids"][0, OBJECT_SLOTS:first])
        opening = " ".join(prompt.lower().split("question: ")[1].split()[:2])
        answer = int(batch["input_ids"][0, first])
        right.setdefault(opening, []).append(int(logits.argmax()) == answer)
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}


def join_example(*parts: str) -> str:
    """The parts joined by spaces; none after a context that ends in BOS ``</s>``."""
    text = ""
    for part in filter(None, parts):
        text += part if not text or text.endswith(BOS_MARK) else f" {part}"
    return text


def opt_batch(
    pairs: Iterator[LMExample],
    tokenizer: PreTrainedTokenizerFast,
    batch_size: int,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Right-padded "context prompt continuation\n" texts with random position offsets, so every
    position up to ``LM_MAX_POSITIONS`` is trained (a soft prompt pushes text to later ones).

    ``weights`` (B, L) per target token: 0 on the context (the LM reads it, it is not asked to
    write it), ``ANSWER_WEIGHT`` on the continuation after a question prompt, 1 elsewhere."""
    examples = [next(pairs) for _ in range(batch_size)]
    texts = [join_example(*e) + "\n" for e in examples]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    ids, attention = tokens["input_ids"], tokens["attention_mask"]  # (B, L)
    # Byte-level BPE never merges across a space, so a prefix tokenizes as the text's first tokens.
    context_len = [len(tokenizer(c)["input_ids"]) if c else 1 for c, _, _ in examples]
    prompt_len = [
        len(tokenizer(join_example(c, p))["input_ids"]) if p else 0 for c, p, _ in examples
    ]
    weights = attention.float()
    for row, (n_context, n_prompt) in enumerate(zip(context_len, prompt_len, strict=True)):
        weights[row, :n_context] = 0.0
        if n_prompt:
            weights[row, n_prompt:] *= ANSWER_WEIGHT
    length = ids.shape[1]
    offsets = torch.randint(0, LM_MAX_POSITIONS - length + 1, (batch_size, 1), generator=gen)
    positions = offsets + torch.arange(length)[None, :]  # (B, L)
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": positions,
        "weights": weights,
    }


def weighted_lm_loss(model: OPTForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy, each target token weighted by ``batch["weights"]``."""
    # a slot batch gives its embeddings (slot vectors, then the text's); a text batch its ids
    key = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    logits = model(
        **{key: batch[key]},
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    ).logits[:, :-1]  # (B, L-1, V)
    targets, weights = batch["input_ids"][:, 1:], batch["weights"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return (per_token * weights).sum() / weights.sum()


def train_opt(text: WorldText, data_dir: Path, out: Path, steps: int) -> dict[str, Any]:
    tokenizer = build_opt_tokenizer(text.all_sentences())
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=3,
        ffn_dim=512,
        num_attention_heads=4,
        max_position_embeddings=LM_MAX_POSITIONS,
        word_embed_proj_dim=128,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Untied: with one matrix for reading and writing, the blind answers (uniform over the
        # colours) pulled the five colour embeddings together (cosine 0.99), and a colour in
        # the context became unreadable.
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = OPTForCausalLM(config)
    pairs = lm_pairs(text, random.Random(SEED))
    lookups = lookup_pairs(random.Random(SEED + 1))
    bindings = binding_pairs(random.Random(SEED + 2))
    slot_rng = random.Random(SEED + 3)
    gen = torch.Generator().manual_seed(SEED)
    batch_size = 64

    def loss_of_step(step: int) -> torch.Tensor:
        if step < OPT_READING_WARMUP_STEPS:
            source = lookups
        elif step % SLOT_BATCH_EVERY == 0:
            return weighted_lm_loss(model, slot_batch(slot_rng, model, tokenizer, batch_size, gen))
        elif step < OPT_BINDING_UNTIL_STEP:
            source = bindings
        else:
            source = pairs
        return weighted_lm_loss(model, opt_batch(source, tokenizer, batch_size, gen))

    losses = run_training(model, loss_of_step, steps, 2e-3, "opt")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "recipe": f"causal LM (no images), untied input/output embeddings: the first "
        f"{OPT_READING_WARMUP_STEPS} steps only lookups 'scene description.[</s>] Question: "
        "(colour/shape/size of a named or placed object) Answer: a\\n', then until step "
        f"{OPT_BINDING_UNTIL_STEP} half of them and half the size of a named colour-shape or a "
        "yes/no, then 50% 'scene description.[</s>] Question: q Answer: a\\n' "
        "about fresh random scenes (varied description forms; loss 0 on the description, "
        f"x{ANSWER_WEIGHT:g} on the answer), 25% blind 'Question: q Answer: a\\n' and 25% captions "
        "from the train split; random position offsets, "
        f"{steps} steps x batch {batch_size}, AdamW lr 2e-3; from step "
        f"{OPT_READING_WARMUP_STEPS} every {SLOT_BATCH_EVERY}nd step's batch reads its context as "
        f"{OBJECT_SLOTS} object slots instead (one object per vector: the mean of its phrase's "
        "token embeddings, shuffled, repeated, among noise vectors)",
        "slot_reading_accuracy": slot_reading_accuracy(model, tokenizer),
        "vocab_size": len(tokenizer),
        "newline_token_id": tokenizer("\n", add_special_tokens=False)["input_ids"][0],
        "final_lm_loss": tail_mean(losses),
        "first_lm_loss": round(losses[0], 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        **backbone_metrics.blind_lm_report(out, data_dir),
    }


def t5_pair(context: str, prompt: str, continuation: str, rng: random.Random) -> tuple[str, str]:
    """An (encoder input, target) pair; a bare caption is split at a random word (prefix LM)."""
    if context or prompt:
        return join_example(context.removesuffix(BOS_MARK), prompt), continuation
    words = continuation.split()
    cut = rng.randint(0, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def train_t5(text: WorldText, data_dir: Path, out: Path, steps: int) -> dict[str, Any]:
    tokenizer = build_t5_tokenizer(text.all_sentences())
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=128,
        d_kv=32,
        d_ff=512,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = T5ForConditionalGeneration(config)
    rng = random.Random(SEED)
    pairs = lm_pairs(text, rng)
    batch_size = 64

    def loss_of_step(step: int) -> torch.Tensor:
        inputs, targets = zip(*(t5_pair(*next(pairs), rng) for _ in range(batch_size)), strict=True)
        encoded = tokenizer(list(inputs), padding=True, return_tensors="pt")
        labels = tokenizer(list(targets), padding=True, return_tensors="pt")
        label_ids = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        return model(**encoded, labels=label_ids).loss

    losses = run_training(model, loss_of_step, steps, 2e-3, "t5")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "recipe": "seq2seq on the same examples: 'description. Question: q Answer:' -> answer "
        "(50%, fresh random scenes), blind 'Question: q Answer:' -> answer (25%), caption "
        "prefix -> suffix (random split) or description -> caption (25%); "
        f"{steps} steps x batch {batch_size}, AdamW lr 2e-3",
        "vocab_size": len(tokenizer),
        "final_loss": tail_mean(losses),
        "first_loss": round(losses[0], 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        **backbone_metrics.blind_lm_report(out, data_dir),
    }


# ---------------------------------------------------------------- main

DEFAULT_STEPS = {"bert": 300, "vision": 700, "opt": 3000, "t5": 900}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the tiny sample backbones")
    parser.add_argument("which", choices=["all", *DEFAULT_STEPS])
    parser.add_argument("--data", type=Path, default=ROOT / "sample_data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="override the default steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    text = load_world_text(args.data)
    names = list(DEFAULT_STEPS) if args.which == "all" else [args.which]
    for name in names:
        out = args.data / "backbones" / name
        out.mkdir(parents=True, exist_ok=True)
        steps = args.steps or DEFAULT_STEPS[name]
        started = time.perf_counter()
        if name == "bert":
            summary = train_bert(text, args.data, out, steps)
        elif name == "vision":
            summary = train_vision(text, args.data, out, steps)
        elif name == "opt":
            summary = train_opt(text, args.data, out, steps)
        else:
            summary = train_t5(text, args.data, out, steps)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["threads"] = args.threads
        write_summary(out, summary)
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
