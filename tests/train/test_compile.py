"""`--compile`: training steps under torch.compile compute what the eager steps compute.

Step 1 runs eagerly (FLOP counting cannot go through dynamo), so the run is 4 steps long: steps
2-4 go through the compiled model, forward and backward, and their losses, the gradients they
produce and the AdamW updates built on them all show up in the logged losses of the next steps
and in the final weights, which must equal the eager run's to what fused kernels' rounding allows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._inductor.compile_fx import compile_fx

from tests.tiny_runs import final_weights, metrics_rows, train_stage1

STEPS = 4
RUN = [
    "--max-steps", str(STEPS),
    "--set", "model.qformer.attention_dropout=0.0",
]  # fmt: skip
LOSS_KEYS = ("itc", "itm", "itg")
# Measured (this test): the largest relative loss difference over the 4 steps was 2.2e-7 and the
# largest absolute weight difference 1.2e-7 (lr 1e-3 moves weights by ~1e-3 a step); the bounds
# are a few times above. Key biases: see below (measured up to 3.8e-4).
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 1e-6
ZERO_GRAD_SUFFIX = "attention.key.bias"
KEY_BIAS_ATOL = 2 * STEPS * 1e-3  # at most ~lr (1e-3 in tests.tiny_runs.FAST) per AdamW step


def _losses(run: Path) -> list[dict[str, float]]:
    return [{key: row[key] for key in LOSS_KEYS} for row in metrics_rows(run)]


def _counting_inductor(run_dir: Path, steps_run: Counter) -> Callable[..., Any]:
    """Inductor (torch.compile's default backend) that counts compiled-graph runs per training
    step (the step being computed is one more than the rows already in ``metrics.jsonl``)."""

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        compiled = compile_fx(graph, example_inputs)

        def run(*args: Any) -> Any:
            metrics = run_dir / "metrics.jsonl"
            steps_run[len(metrics_rows(run_dir)) + 1 if metrics.exists() else 1] += 1
            return compiled(*args)

        return run

    return backend


@pytest.mark.slow
def test_compiled_stage1_steps_match_eager_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = train_stage1(tmp_path / "eager", *RUN)
    assert eager.exit_code == 0, eager.output

    compiled_runs_per_step: Counter = Counter()
    real_compile = torch.compile

    def counting_compile(model: torch.nn.Module, **options: Any) -> Any:
        assert not options  # the trainer asks for torch.compile's defaults
        return real_compile(
            model, backend=_counting_inductor(tmp_path / "compiled", compiled_runs_per_step)
        )

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    try:
        compiled = train_stage1(tmp_path / "compiled", *RUN, "--compile")
    finally:
        torch._dynamo.reset()
    assert compiled.exit_code == 0, compiled.output
    # Steps 2..4 ran through compiled graphs (step 1 is eager; graph breaks make several graphs)
    assert sorted(compiled_runs_per_step) == list(range(2, STEPS + 1)), compiled_runs_per_step

    eager_losses, compiled_losses = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager_losses) == len(compiled_losses) == STEPS
    for step, (expected, got) in enumerate(
        zip(eager_losses, compiled_losses, strict=True), start=1
    ):
        for key in LOSS_KEYS:
            assert got[key] == pytest.approx(expected[key], rel=LOSS_RTOL), (step, key)

    eager_weights, compiled_weights = final_weights(eager), final_weights(compiled)
    assert eager_weights.keys() == compiled_weights.keys()
    for key, expected in eager_weights.items():
        # A key bias's gradient is exactly zero in exact arithmetic (softmax ignores a shift
        # shared by all keys), so both runs update it from rounding noise, which AdamW scales
        # up to about lr a step: it agrees only to that bound.
        atol = KEY_BIAS_ATOL if key.endswith(ZERO_GRAD_SUFFIX) else WEIGHT_ATOL
        torch.testing.assert_close(compiled_weights[key], expected, rtol=0, atol=atol, msg=key)
