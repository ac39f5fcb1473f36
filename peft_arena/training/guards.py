"""Training guards: a training whose loss, gradients or weights blow up fails instead of saving a broken adapter.

The rules (README, "Training guards"):

- **non-finite**: a logged ``loss`` or ``grad_norm`` that is NaN or ±inf fails the run at that step, and so does
  an optimizer step whose numbers overflow float (``lr=1e38``: Adam's step size). HF's
  ``logging_nan_inf_filter`` (which replaces a NaN loss by the running mean, so ``lr=1e38`` logged a loss of
  0.0) is turned off by the recipes.
- **broken weights**: a trainable tensor holding NaN or ±inf, or a value above :data:`WEIGHT_LIMIT` in magnitude
  (or 100 × the largest trainable value at the start, if that is more: full finetuning of a model with large
  weights), fails the run at the next logged step, before any checkpoint is written (checked whenever the trainer
  is about to log or save), and at the end. Trained adapter weights are far below 1e4; ``lr=1e6`` grows them
  ×10⁴ a step through AdamW's weight decay alone, even when the gradients are zero.
- **divergence** (SFT only; the GRPO loss is a signed policy-gradient surrogate, not a distance to minimise):
  the logged loss above ``factor`` × its running minimum for ``patience`` consecutive logged steps.
- **probe** (SFT and GRPO): the cross-entropy of a fixed probe batch (the first training examples; for GRPO the
  prompts with their reference answers) is measured when training begins (a resumed run: at its checkpoint) and
  after training. It must stay finite and at most
  ``factor`` × its value before training (GRPO: :data:`GRPO_PROBE_FACTOR`). This catches the last updates of a run,
  which no logged loss ever measures (``lr=1e6`` saved weights of 1.9e13 while every logged loss was finite).

A failed guard raises :class:`TrainingDiverged`; the stage's run then ends FAILED with the message in
``arena.error``, and no adapter is saved or logged.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

GRPO_PROBE_FACTOR = 10.0  # RL may move the policy away from the reference answers; only an explosion fails
_FORWARD_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
WEIGHT_LIMIT = 1e4  # largest magnitude a trained weight may reach (see the module docstring)


class TrainingDiverged(RuntimeError):
    """The training produced non-finite or exploding losses, gradients or weights."""


def _hint(lr: float) -> str:
    return f"(learning rate {lr:g}): lower the learning rate (lr=...) or check the data"


def largest_trainable(model) -> float:
    values = [p.detach().abs().max() for p in model.parameters() if p.requires_grad and p.numel()]
    return float(torch.stack(values).max()) if values else 0.0


def broken_parameters(model, limit: float) -> list[tuple[str, float]]:
    """Trainable tensors holding NaN/inf or a value above ``limit`` in magnitude (one device sync for all)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel()]
    if not named:
        return []
    peaks = torch.stack([p.detach().abs().max().float() for _, p in named]).cpu().tolist()
    return [(n, v) for (n, _), v in zip(named, peaks) if not math.isfinite(v) or v > limit]


def check_weights(model, where: str, lr: float, limit: float = WEIGHT_LIMIT) -> None:
    bad = broken_parameters(model, limit)
    if bad:
        name, peak = bad[0]
        raise TrainingDiverged(f"training diverged {where}: {len(bad)} trainable tensors hold NaN/inf or values above "
                               f"{limit:g} (first: {name}, max |w| = {peak:.3g}) {_hint(lr)}")


class DivergenceRule:
    """``loss > factor × running minimum`` for ``patience`` consecutive logged steps (plus non-finite checks)."""

    def __init__(self, factor: float | None, patience: int) -> None:
        self.factor, self.patience = factor, patience
        self.minimum = math.inf
        self.streak = 0

    def check(self, step: int, logs: dict, lr: float) -> None:
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(float(value)):
                raise TrainingDiverged(f"training diverged at step {step}: {key} is {float(value)} {_hint(lr)}")
        loss = logs.get("loss")
        if self.factor is None or loss is None:
            return
        loss = float(loss)
        if self.minimum < math.inf and loss > self.factor * self.minimum:
            self.streak += 1
            if self.streak >= self.patience:
                raise TrainingDiverged(
                    f"training diverged at step {step}: loss {loss:.4g} stayed above {self.factor:g} × its minimum "
                    f"{self.minimum:.4g} for {self.streak} logged steps {_hint(lr)}")
        else:
            self.streak = 0
        self.minimum = min(self.minimum, loss)


def guard_callback(lr: float, factor: float | None = None, patience: int = 3, probe: dict | None = None,
                   probe_factor: float | None = None):
    """A TrainerCallback applying the rules above while training (``factor=None``: no divergence rule).

    ``probe``: a labelled batch whose loss is measured when training begins (on the training device; for a
    resumed run, at its checkpoint) and again by :meth:`check_final`, which must be at most ``probe_factor`` ×
    the first (default ``factor``).
    """
    from transformers import TrainerCallback

    class TrainingGuard(TrainerCallback):
        def __init__(self) -> None:
            self.rule = DivergenceRule(factor, patience)
            self.limit = WEIGHT_LIMIT
            self.probe = probe  # may be set once the trainer exists (its first micro-batch)
            self.probe_before: float | None = None

        def check_model(self, model, where: str) -> None:
            check_weights(model, where, lr, self.limit)

        def check_final(self, model) -> None:
            """After training, before anything is saved: weights, then the probe loss."""
            self.check_model(model, "by the end of training")
            if self.probe is not None and self.probe_before is not None:
                check_probe(self.probe_before, probe_loss(model, self.probe), probe_factor or factor or 4.0, lr)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                self.limit = max(WEIGHT_LIMIT, 100 * largest_trainable(model))
                if self.probe is not None:
                    self.probe_before = probe_loss(model, self.probe)
            # a resumed run replays the checkpoint's logged losses so the running minimum is the same
            for entry in state.log_history:
                if "loss" in entry:
                    self.rule.check(entry.get("step", 0), {"loss": entry["loss"]}, lr)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and (control.should_log or control.should_save or control.should_training_stop):
                self.check_model(model, f"at step {state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.rule.check(state.global_step, logs, lr)

    return TrainingGuard()


@contextmanager
def overflow_is_divergence(lr: float) -> Iterator[None]:
    """An optimizer step whose numbers overflow float (``lr=1e38``: Adam's step size) is a divergence too."""
    try:
        yield
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise TrainingDiverged(f"training diverged: an optimizer step overflowed ({exc}) {_hint(lr)}") from exc


@torch.no_grad()
def probe_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """Mean cross-entropy of the labelled tokens of ``batch`` (eval mode: no dropout, no RNG drawn)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(**{k: v.to(device) for k, v in batch.items() if k in _FORWARD_KEYS})
        return float(out.loss)
    finally:
        model.train(was_training)


def check_probe(before: float, after: float, factor: float, lr: float) -> None:
    """The trained model's probe loss must be finite and at most ``factor`` × the loss before training."""
    if not math.isfinite(after):
        raise TrainingDiverged(f"training diverged: the trained model's probe loss is {after} {_hint(lr)}")
    if math.isfinite(before) and before > 0 and after > factor * before:
        raise TrainingDiverged(f"training diverged: the trained model's probe loss {after:.4g} is above {factor:g} × "
                               f"its value before training ({before:.4g}) {_hint(lr)}")
