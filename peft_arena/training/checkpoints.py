"""Checkpoints and resume for SFT and GRPO, on the HF Trainer's own checkpointing (``resume_from_checkpoint``).

- ``save_steps`` (config): ``-1`` = auto: no checkpoint for runs under :data:`AUTO_MIN_STEPS` steps, otherwise one
  every 5 % of the run (at least every :data:`AUTO_MIN_EVERY` steps); ``0`` = never; ``N`` = every N steps.
  Only the newest complete checkpoint is kept (``save_total_limit=1``; HF deletes the older one only after the
  new one is written). Checkpoints hold the trainable weights, optimizer, scheduler, RNG states and the
  trainer's log history.
- The checkpoint folder is local (``<output_dir>/<run_id>/trainer``); its absolute path is the run's tag
  ``arena.checkpoint_dir`` and the step of the newest checkpoint the tag ``arena.checkpoint_step``.
- ``--resume RUN_ID`` reopens that run (``tracking.runs.arena_run``) and continues from the newest complete
  checkpoint with the same data order and RNG states, so the final adapter equals an uninterrupted run's. Steps the
  dead process had logged after its last checkpoint are recomputed but not logged again (the values are the
  same); every metric keeps exactly one point per step. Without a checkpoint the run restarts from step 0 in the
  same MLflow run, under the same rule.
- After a training that finished, its checkpoints are deleted: the adapter is in MLflow, and a finished run cannot
  be resumed.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT_DIR_TAG = "arena.checkpoint_dir"
CHECKPOINT_STEP_TAG = "arena.checkpoint_step"
RESUMED_FROM_TAG = "arena.resumed_from_step"
AUTO_MIN_STEPS = 50
AUTO_MIN_EVERY = 10
_COMPLETE_MARKER = "trainer_state.json"  # HF writes it last: a checkpoint without it was cut short
_HF_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-\.\ :/]")  # HF MLflowCallback's sanitising of metric names


def resolve_save_steps(save_steps: int, total_steps: int) -> int:
    """Steps between checkpoints (0 = none) for a run of ``total_steps`` optimizer steps."""
    if save_steps >= 0:
        return save_steps
    if total_steps < AUTO_MIN_STEPS:
        return 0
    return max(AUTO_MIN_EVERY, round(total_steps / 20))


def latest_checkpoint(trainer_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder under ``trainer_dir``; incomplete ones are removed."""
    folder = Path(trainer_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        if path.is_dir() and path.name.split("-")[-1].isdigit():
            if (path / _COMPLETE_MARKER).is_file():
                found.append((int(path.name.split("-")[-1]), path))
            else:
                shutil.rmtree(path, ignore_errors=True)  # cut short by a kill; HF would otherwise try to rotate it
    return max(found)[1] if found else None


@dataclass
class Checkpointing:
    """What a recipe hands the HF Trainer: TrainingArguments fields, callbacks and where to resume from."""

    trainer_dir: Path
    every: int
    resume_from: Path | None
    callbacks: list = field(default_factory=list)

    @property
    def args(self) -> dict:
        if not self.every:
            return {"save_strategy": "no"}
        return {"save_strategy": "steps", "save_steps": self.every, "save_total_limit": 1}

    def finish(self) -> None:
        """The training finished and its adapter is logged: the checkpoints are no longer needed."""
        for path in self.trainer_dir.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)


def prepare(tracker, trainer_dir: str | Path, save_steps: int, total_steps: int, resume: bool) -> Checkpointing:
    """Record where checkpoints go, pick the checkpoint to resume from, build the callbacks."""
    trainer_dir = Path(trainer_dir).resolve()
    every = resolve_save_steps(save_steps, total_steps)
    resume_from = latest_checkpoint(trainer_dir) if resume else None
    tags = {CHECKPOINT_DIR_TAG: str(trainer_dir)}
    if resume:
        step = int(resume_from.name.split("-")[-1]) if resume_from else 0
        tags[RESUMED_FROM_TAG] = step
        where = f"checkpoint {resume_from}" if resume_from else "step 0 (the run had no checkpoint)"
        print(f"[peft-arena] resuming run {tracker.run_id} from {where}", flush=True)
    tracker.set_tags(tags)
    tracker.log_params({"save_steps_resolved": every})
    return Checkpointing(trainer_dir, every, resume_from, [_saved_callback(tracker)])


def _saved_callback(tracker):
    from transformers import TrainerCallback

    class CheckpointTag(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            tracker.set_tags({CHECKPOINT_STEP_TAG: state.global_step})

    return CheckpointTag()


def report_to(tracker) -> tuple[str, list]:
    """``report_to`` and the reporting callbacks: HF's MLflowCallback as the arena's ``ArenaMLflowCallback``
    (curves as ``train/<name>``, no TrainingArguments param dump), minus metric points already logged.

    The callback logs into the active run (the one the stage opened or resumed). On a resumed run it skips every
    (metric, step) the run already holds, so a step replayed after the last checkpoint is not logged twice.
    """
    if not getattr(tracker, "logs_to_mlflow", False):
        return "none", []
    from peft_arena.tracking.hf_callback import ArenaMLflowCallback, curve_name

    class ResumeSafeMLflowCallback(ArenaMLflowCallback):
        def on_log(self, args, state, control, logs, model=None, **kwargs):
            fresh = {k: v for k, v in (logs or {}).items()
                     if not tracker.already_logged(_HF_METRIC_NAME.sub("_", curve_name(k)), state.global_step)}
            super().on_log(args, state, control, fresh, model=model, **kwargs)

    return "none", [ResumeSafeMLflowCallback()]
