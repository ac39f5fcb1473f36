"""Descriptive run names for the MLflow UI: ``sft-oft-b32-math-qwen2.5-7b``, ``eval-sft-lora-r8-math-tiny``.

Names are for people scanning the runs table; scripts filter on the ``arena.*`` tags, never on names.
"""

from __future__ import annotations

import re

# arena.stage -> the word a run name starts with. Training runs start with the train type alone,
# the other stages prefix the trained model's name with their verb.
_STAGE_PREFIX = {
    "train_sft": "",
    "train_grpo": "",
    "evaluate": "eval",
    "promote": "promote",
    "spectral": "spectral",
    "report": "report",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _part(value) -> str:
    return _UNSAFE.sub("-", str(value)).strip("-") if value not in (None, "") else ""


def run_name(stage: str, train: str | None = None, method: str | None = None, label: str | None = None,
             domain: str | None = None, base: str | None = None) -> str:
    """The run name for a stage about one model, e.g. ``run_name("train_sft", "sft", "oft", "b32", "math",
    "qwen2.5-7b") == "sft-oft-b32-math-qwen2.5-7b"``.

    ``method="base"`` (or no method) names a run about the untouched base: ``eval-base-math-qwen2.5-7b``.
    Empty parts are left out, so ``run_name("report", domain="math")`` is ``report-math``.
    """
    if stage not in _STAGE_PREFIX:
        raise ValueError(f"unknown stage {stage!r}: use one of {', '.join(_STAGE_PREFIX)}")
    if stage.startswith("train_") and not train:
        train = stage[len("train_"):]
    model = [train, method, label] if method and method != "base" else (["base"] if method == "base" else [])
    parts = [_STAGE_PREFIX[stage], *model, domain, base]
    return "-".join(p for p in map(_part, parts) if p)


def policy_run_name(outcome: str, alias: str, train: str | None = None, method: str | None = None,
                    label: str | None = None, domain: str | None = None, base: str | None = None) -> str:
    """The name of a policy run says what it did: ``champion-promoted-sft-lora-r8a16-math-tiny`` when the version
    took the alias, ``champion-kept-…`` when the alias stayed where it was, ``champion-deciding-…`` before."""
    model = run_name("promote", train, method, label, domain, base).removeprefix("promote").lstrip("-")
    return "-".join(p for p in (_part(alias), _part(outcome), model) if p)
