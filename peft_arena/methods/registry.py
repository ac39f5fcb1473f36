"""The methods table. A leaf: it defines the spec, the table and the decorator, and imports no method module.

A method module (``lora.py``, ``oft.py``, …) calls :func:`register` with a :class:`MethodSpec`; the package
``__init__`` imports the modules; stages import the package and use :func:`get_method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class MethodError(ValueError):
    """Unknown method, unknown option, or an option value a method does not accept."""


class MergeError(RuntimeError):
    """Merging an adapter into its base failed; never swallowed (the paper's merge tool saved the base instead)."""


@dataclass
class BuildContext:
    """What a builder may need besides the model and its options.

    ``calibration_batch``: a tokenised training batch (``input_ids``, ``attention_mask``, ``labels``) for
    methods that initialise from gradients (KeepLoRA). ``defer_calibration``: build the adapter now and leave
    the data-dependent initialisation to the method's ``calibrate(model, options, batch)``, which the training
    recipes call with the trainer's own first micro-batch once the trainer (and its shuffled sampler) exists.
    ``train``: ``"sft"`` or ``"grpo"``.
    ``total_steps``: the planned optimizer steps (AdaLoRA's budget schedule needs it).
    ``structure_only``: build the adapter's shapes only, e.g. on the meta device for parameter counts; builders
    skip weight- and data-dependent initialisation (SVD, gradients) and need no calibration batch.
    """

    calibration_batch: dict | None = None
    defer_calibration: bool = False
    train: str = "sft"
    total_steps: int = 100
    seed: int = 0
    structure_only: bool = False


@dataclass
class MethodSpec:
    name: str  # registry name, the value of the ``arena.method`` tag
    family: str  # e.g. "lora", "oft", "full"
    summary: str  # one line for ``peft-arena methods``
    defaults: dict[str, Any]  # every option the method takes, with its paper default
    option_help: dict[str, str]  # one line per option
    sft_lr: float  # default SFT learning rate
    grpo_lr: float  # default GRPO learning rate
    build: Callable[..., Any]  # build(model, options, ctx) -> trainable model (PeftModel or the model itself)
    label: Callable[[dict], str]  # short setting label for run names, e.g. "r8", "b32"
    mergeable: bool = True
    needs_calibration: bool = False
    # calibrate(model, options, batch): the data-dependent initialisation of a needs_calibration method, run on the
    # built model when the build was told to defer it (BuildContext.defer_calibration).
    calibrate: Callable[..., None] | None = None
    choices: dict[str, list] = field(default_factory=dict)  # allowed values for enumerated options
    # make_optimizer(model, options, lr, weight_decay, betas) -> torch optimizer, for methods whose optimizer
    # is part of the method (LoRA+: B gets a larger learning rate); None means the trainer's default AdamW.
    make_optimizer: Callable[..., Any] | None = None
    # callbacks(model, options, ctx) -> list of transformers TrainerCallback the method needs during training
    # (AdaLoRA's orthogonality regulariser and rank reallocation); None means none.
    callbacks: Callable[..., list] | None = None
    # the build rewrites base weights (PiSSA, MiLoRA: W_res = W − s·B₀·A₀); the saved adapter is then converted
    # to one that loads on the original base, and saving without the initial adapter copy is an error.
    rewrites_base: bool = False
    # save_adapter(model, options, out_dir) writes the adapter folder itself, for a method whose in-memory adapter
    # needs its own exact conversion to apply to the original base (KeepLoRA with offset: (B − B₀, A₀));
    # None means peft's save_pretrained (or the rewrites_base conversion above).
    save_adapter: Callable[..., None] | None = None

    def resolve(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated by overrides, with types coerced to the default's type; unknown keys raise."""
        options = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise MethodError(f"method {self.name!r} takes no option {key!r} (its options: {known})")
            options[key] = _coerce(self.name, key, value, self.defaults[key])
            if key in self.choices and options[key] not in self.choices[key]:
                raise MethodError(
                    f"method {self.name!r}: {key}={options[key]!r} is not one of {self.choices[key]}"
                )
        return options


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise MethodError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(METHODS))} (see `peft-arena methods`)"
        ) from None


def describe_methods() -> list[dict[str, Any]]:
    """One row per method for ``peft-arena methods``: name, family, summary, defaults, help, learning rates."""
    return [
        {"name": s.name, "family": s.family, "summary": s.summary, "defaults": dict(s.defaults),
         "option_help": dict(s.option_help), "choices": dict(s.choices), "sft_lr": s.sft_lr, "grpo_lr": s.grpo_lr,
         "mergeable": s.mergeable, "needs_calibration": s.needs_calibration,
         "custom_optimizer": s.make_optimizer is not None, "has_callbacks": s.callbacks is not None}
        for s in sorted(METHODS.values(), key=lambda spec: spec.name)
    ]


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    if default is None or (type(value) is type(default)):
        return value
    if isinstance(default, str) and isinstance(value, (list, tuple)):  # a YAML list for a comma-list option
        return ",".join(str(v).strip() for v in value)
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
                return value.lower() in {"true", "1", "yes"}
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise MethodError(
            f"method {method!r}: option {key}={value!r} is not a valid {type(default).__name__}"
        ) from None
