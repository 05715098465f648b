"""Can a soft prompt steer a frozen LM to the answers one scene implies?

For each question set below (the answers one scene of the sample world implies), 32 free
vectors are placed before "</s>Question: q Answer:" and optimized (Adam) so that the frozen LM's
first answer token is right for every question at once. If a set is reached, the LM itself can
be steered to it by some soft prompt, and a stage 2 that does not get there fails in the
Q-Former's path, not in the LM (README: "Why sizes and yes/no stayed at the prior").

Then the transfer: a prompt fitted to the lookups alone (colour, shape, size, count) is read
with the yes/no questions, which it was not fitted to; and, for comparison, the scene's text
description's own token embeddings as the prompt.

    python scripts/lm_steering.py [sample_data/backbones/opt]
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT_LENGTH = 32  # the Q-Former's queries
STEPS = 300
QUESTION_SETS: dict[str, list[tuple[str, str]]] = {  # a red circle and a blue square
    "shape yes/no": [
        ("is there a circle?", "yes"),
        ("is there a square?", "yes"),
        ("is there a triangle?", "no"),
    ],
    "colour-shape yes/no": [
        ("is there a red circle?", "yes"),
        ("is there a blue square?", "yes"),
        ("is there a red square?", "no"),
        ("is there a blue circle?", "no"),
        ("is the circle red?", "yes"),
        ("is the square red?", "no"),
    ],
    "colour lookups": [("what color is the circle?", "red"), ("what color is the square?", "blue")],
    "size lookups": [
        ("what size is the red circle?", "small"),
        ("what size is the blue square?", "large"),
    ],
}


LOOKUPS = [  # the same scene
    *QUESTION_SETS["colour lookups"],
    *QUESTION_SETS["size lookups"],
    ("what shape is the red object?", "circle"),
    ("what shape is the blue object?", "square"),
    ("how many shapes are there?", "2"),
]


DESCRIPTION = "a small red circle in the top left corner and a large blue square in the center."


class FrozenLM:
    """The LM, frozen, answering questions after a soft prompt."""

    def __init__(self, lm_dir: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        self.model = AutoModelForCausalLM.from_pretrained(lm_dir).eval().requires_grad_(False)
        self.embed = self.model.get_input_embeddings()

    def first_answer_logits(
        self, prompt: torch.Tensor, questions: list[tuple[str, str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) logits of each question's first answer token after ``prompt`` (32, D), and
        the (N,) right tokens."""
        logits = []
        for question, _ in questions:
            ids = self.tokenizer(f"Question: {question} Answer:", return_tensors="pt")["input_ids"]
            text = self.embed(ids[0])  # (T, D), BOS first
            logits.append(self.model(inputs_embeds=torch.cat([prompt, text])[None]).logits[0, -1])
        targets = [
            self.tokenizer(f" {a}", add_special_tokens=False)["input_ids"][0] for _, a in questions
        ]
        return torch.stack(logits), torch.tensor(targets)

    def fit_prompt(
        self, questions: list[tuple[str, str]], seed: int = 0
    ) -> tuple[torch.Tensor, list[tuple[int, float, float]]]:
        """A soft prompt optimized for ``questions``, and (step, loss, accuracy) every 100
        steps."""
        torch.manual_seed(seed)
        start = torch.randint(4, self.embed.num_embeddings, (PROMPT_LENGTH,))
        prompt = torch.nn.Parameter(self.embed.weight[start].clone())  # (32, D): token rows
        optimizer = torch.optim.Adam([prompt], lr=3e-2)
        trace = []
        for step in range(STEPS + 1):
            logits, targets = self.first_answer_logits(prompt, questions)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            if step % 100 == 0:
                accuracy = (logits.argmax(-1) == targets).float().mean().item()
                trace.append((step, loss.item(), accuracy))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return prompt.detach(), trace

    def yes_no_accuracy(self, prompt: torch.Tensor, questions: list[tuple[str, str]]) -> float:
        """How many yes/no answers after ``prompt`` are right ("yes" vs "no" logits)."""
        with torch.no_grad():
            logits, targets = self.first_answer_logits(prompt, questions)
        yes, no = (
            self.tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0] for w in ("yes", "no")
        )
        said = torch.where(logits[:, yes] > logits[:, no], yes, no)
        return (said == targets).float().mean().item()


def main() -> None:
    lm = FrozenLM(sys.argv[1] if len(sys.argv) > 1 else "sample_data/backbones/opt")
    for name, questions in QUESTION_SETS.items():
        for step, loss, accuracy in lm.fit_prompt(questions)[1]:
            print(f"{name}: step {step} loss {loss:.3f} accuracy {accuracy:.2f}", flush=True)
    yes_no = QUESTION_SETS["shape yes/no"] + QUESTION_SETS["colour-shape yes/no"]
    ids = lm.tokenizer(DESCRIPTION, add_special_tokens=False, return_tensors="pt")["input_ids"]
    described = lm.embed(ids[0]).detach()  # (T, D): the words themselves as the prompt
    print(
        f"the description as the prompt: yes/no right {lm.yes_no_accuracy(described, yes_no):.2f}"
    )
    for seed in range(3):
        prompt, trace = lm.fit_prompt(LOOKUPS, seed)
        print(
            f"fitted to the lookups (seed {seed}; accuracy {trace[-1][2]:.2f}): the 9 yes/no "
            f"questions right {lm.yes_no_accuracy(prompt, yes_no):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
