"""``qformer finetune --task T --init RUN``: the paper's fine-tuning recipes over a trained run.

Every task keeps the model of the run it starts from (its backbones, Q-Former sizes and image
size) and trains the stage that task needs:

- ``caption``: stage 2 on the captions alone, the LLM frozen, the vision encoder trained (BLIP-2
  fine-tunes the ViT with the Q-Former for captioning; LAVIS ``caption_coco_ft.yaml``);
- ``vqa``: stage 2 on the VQA questions alone, the question given to the Q-Former too
  (instruction-aware) and answered by open-ended generation, the vision encoder trained;
- ``retrieval``: stage 1 (ITC + ITM + ITG) from a stage-1 run, the vision encoder trained
  (LAVIS ``retrieval_coco_ft.yaml``);
- ``instruct``: stage 2 with an instruction-aware Q-Former (InstructBLIP) on instruction data
  (``data.instructions``) and the captions and questions, as templated instructions unless the
  config says otherwise (``data.instruction_templates``), the vision encoder frozen as in
  InstructBLIP.

The vision encoder trains at ``train.vision_lr`` (``--vision-lr``, or the config's; 0 keeps it
frozen); left unset, the Q-Former's ``train.lr`` where the task trains it, as LAVIS's
fine-tuning configs use one learning rate.
"""

from __future__ import annotations

from pathlib import Path

from qformer_cli import checkpoint
from qformer_cli.config import RunConfig, from_dict
from qformer_cli.errors import CheckpointError, UsageError

FINETUNE_TASKS = ("caption", "vqa", "retrieval", "instruct")
TRAINS_VISION = {"caption": True, "vqa": True, "retrieval": True, "instruct": False}
# The Q-Former's dropout is a training setting a fine-tuning run may change (the rest of the
# model section is the --init run's)
DROPOUT_NAMES = ("hidden_dropout", "attention_dropout")
DROPOUT = {f"model.qformer.{name}" for name in DROPOUT_NAMES}


def task_stage(task: str) -> int:
    if task not in FINETUNE_TASKS:
        raise UsageError(f"--task {task!r}: one of {', '.join(FINETUNE_TASKS)}")
    return 1 if task == "retrieval" else 2


def _own_run(init: Path) -> Path:
    """The checkpoint of ``--init``, which must be a run or checkpoint of this toolkit: the
    model section comes from its run config, which transformers / LAVIS weights do not have."""
    try:
        return checkpoint.resolve_checkpoint(init)
    except CheckpointError:
        external = Path(init).is_file() or (Path(init) / "config.json").is_file()
        if not external:
            raise
        raise UsageError(
            f"--init {init}: finetune starts from a run of this toolkit; train one from these "
            "weights first (pretrain-stage2 --init, with their backbones) and fine-tune that"
        ) from None


def finetune_config(config: RunConfig, task: str, init: Path, given: set[str]) -> RunConfig:
    """``config`` (the command's --config, --set and flags) made the run config of fine-tuning
    ``init`` for ``task``: the model section and image size of ``init``'s run, the task's data
    and settings where the command line (``given`` keys) leaves them open."""
    stage = task_stage(task)
    directory = _own_run(init)
    saved = checkpoint.load_meta(directory)
    if saved.stage != stage:
        needed = "a stage-1 run (pretrain-stage1)" if stage == 1 else "a stage-2 run"
        raise UsageError(
            f"--init {init}: a stage-{saved.stage} run; --task {task} starts from {needed}"
        )
    changed = sorted(
        key for key in given if (key == "model" or key.startswith("model.")) and key not in DROPOUT
    )
    if changed:
        raise UsageError(
            f"{changed[0]}: finetune keeps the model of --init {init}; drop the option"
        )
    trained = from_dict(RunConfig, saved.run)
    dropout = {
        name: config.model.qformer[name]
        for name in DROPOUT_NAMES
        if f"model.qformer.{name}" in given
    }
    config.model = trained.model
    config.model.qformer = {**config.model.qformer, **dropout}
    config.data.image_size = trained.data.image_size

    def default(key: str, value: object) -> None:
        if key not in given:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)

    if task == "caption":
        default("data.vqa_questions", "")
    elif task == "vqa":
        config.model.instruction_aware = True
        default("data.captions", False)
        if not config.data.vqa_questions:
            raise UsageError("--task vqa trains on data.vqa_questions: give them (--set)")
    elif task == "instruct":
        config.model.instruction_aware = True
        if config.data.instruction_templates is None:  # set by neither command line nor config
            config.data.instruction_templates = True
    if config.train.vision_lr is None:  # set by neither the command line nor the config
        config.train.vision_lr = config.train.lr if TRAINS_VISION[task] else 0.0
    return config
