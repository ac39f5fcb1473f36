"""The HF ``MLflowCallback`` with the arena's names: curves only, no TrainingArguments/model-config param dump.

The trainer's own ``MLflowCallback`` logs ~190 params (``hub_token``, ``trackio_*``, the model config) that bury
the effective settings the stage logs as ``cfg.*``/``method.*``, and names its curves ``loss``, ``grad_norm``,
``learning_rate`` next to an end-of-training ``train_loss``. This subclass keeps its run handling and its
per-step metric logging, logs no params, and renames the curves to ``train/<name>`` (one loss name:
``train/loss``); the end-of-training summary keys (``train_loss``, ``train_runtime``, …) are left out because the
stage logs ``train/final_loss`` and ``train/runtime_s`` itself.
"""

from __future__ import annotations

import os

from transformers.integrations import MLflowCallback

from peft_arena.tracking.tracker import metric_key, rounded

# end-of-training summaries the Trainer logs once; the stage logs its own (train/final_loss, train/runtime_s)
_SUMMARY_KEYS = {"train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}
def curve_name(key: str) -> str:
    """``loss`` → ``train/loss``, ``learning_rate`` → ``train/learning_rate`` (GRPO's names too)."""
    return "train/" + key


class ArenaMLflowCallback(MLflowCallback):
    """``MLflowCallback`` that logs curves as ``train/*`` and no params (see the module docstring)."""

    def setup(self, args, state, model):
        # MLFLOW_MAX_LOG_PARAMS=0 is the callback's own switch: it trims the param list to nothing
        before = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
        os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
        try:
            super().setup(args, state, model)
        finally:
            if before is None:
                os.environ.pop("MLFLOW_MAX_LOG_PARAMS", None)
            else:
                os.environ["MLFLOW_MAX_LOG_PARAMS"] = before

    def on_log(self, args, state, control, logs, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if not state.is_world_process_zero or not logs:
            return
        metrics = {}
        for key, value in logs.items():
            if key in _SUMMARY_KEYS:
                continue
            if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = curve_name(key)
                metrics[metric_key(name)] = rounded(name, value)
        if metrics:
            self._ml_flow.log_metrics(metrics=metrics, step=state.global_step)
