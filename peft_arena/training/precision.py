"""How a base is put on the device for training: weight dtype, attention kernel, gradient checkpointing, kernels.

One place decides, for SFT and GRPO alike:

* ``precision``: ``auto`` = a frozen **bf16** base on a GPU (fp32 on CPU), ``bf16`` or ``fp32``. The base is loaded
  straight in that dtype onto the device (no fp32 copy on the host). peft keeps every adapter's trainable tensors in
  fp32 on a bf16 base (``autocast_adapter_dtype``), and the Trainer's bf16 autocast runs the matmuls in bf16, so
  the optimizer updates fp32 master weights of the adapter while the 7B base costs 2 bytes a parameter.
* ``attn_implementation``: ``auto`` = transformers' default (SDPA), or any name transformers accepts
  (``sdpa``, ``eager``, ``flex_attention``, ``flash_attention_2`` when installed, …).
* ``gradient_checkpointing``: ``on`` / ``off`` / ``auto``: ``auto`` turns it on when :func:`activation_estimate`
  says the micro-batch's activations without it would not fit the device (never on CPU).
* ``liger``: ``auto`` applies Liger's RMSNorm / SwiGLU / RoPE kernels when ``liger-kernel`` is installed and a GPU
  is used (the ``liger`` extra); ``on`` requires it; ``off`` never. The LM head's cross-entropy is already fused by
  TRL (the logits of a long sequence are never materialised), so Liger's fused linear cross-entropy is not used.
* ``padding_free``: ``on`` concatenates each micro-batch's examples into one row with position ids restarting per
  example (TRL's padding-free collator; transformers turns the position ids into a block-diagonal mask, or
  varlen boundaries for flash-attention), so no pad token is computed and the loss equals the padded loss;
  ``auto`` = on with a GPU and an attention kernel that skips the masked blocks (:data:`VARLEN_ATTENTION`).
* ``compile``: ``on`` compiles each decoder layer with ``torch.compile`` (one graph, reused by all layers);
  ``auto`` = off (+7 % tokens/s at 7B on the H200, but ~25 s more before the first step); never on CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

MODES = ("auto", "on", "off")
PRECISIONS = ("auto", "bf16", "fp32")


class PrecisionError(ValueError):
    """A training-precision option that cannot be honoured here."""


def _mode(name: str, value) -> str:
    text = str(value).strip().lower()
    text = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(text, text)
    if text not in MODES:
        raise PrecisionError(f"{name} must be one of {', '.join(MODES)}; got {value!r}")
    return text


def resolve_dtype(precision: str, cuda: bool) -> torch.dtype:
    """The base's weight dtype: auto = bf16 on a GPU (if it supports bf16), fp32 on CPU."""
    p = str(precision).strip().lower()
    if p not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if p == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_liger(mode: str, cuda: bool) -> bool:
    mode = _mode("liger", mode)
    if mode == "on":
        if not cuda:
            raise PrecisionError("liger=on needs a CUDA GPU (Liger's kernels are Triton); use liger=auto or off")
        if not liger_available():
            raise PrecisionError("liger=on but liger-kernel is not installed: pip install 'peft-arena[liger]'")
        return True
    return mode == "auto" and cuda and liger_available()


def resolve_compile(mode: str, cuda: bool) -> bool:
    mode = _mode("compile", mode)
    if mode == "on" and not cuda:
        raise PrecisionError("compile=on is for CUDA training; on CPU use compile=auto or off")
    return mode == "on"


# Activation bytes kept for backward per token and decoder layer, in units of the weight dtype's size, for the
# matmul inputs/outputs, norms, attention and SwiGLU of a Llama/Qwen block (measured on the H200 at 7B:
# ~0.27 MiB per token-layer in bf16 without checkpointing). DoRA also keeps one full-width bf16 tensor per adapted
# linear for backward (the LoRA branch's output), BOFT its unscaled output (for the gradient of its scale); the lean
# VeRA keeps T×r only (training/lean/vera.py).
_BLOCK_HIDDEN_UNITS = 12
_BLOCK_INTER_UNITS = 5
_METHOD_EXTRA_OUT_BYTES = {"dora": 2, "boft": 2}  # bytes per output feature of each adapted linear


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    activations_gib: float  # without checkpointing
    checkpointed_gib: float  # with checkpointing (layer inputs + one layer recomputed)
    device_gib: float

    @property
    def fits_without_checkpointing(self) -> bool:
        return self.weights_gib + self.activations_gib <= 0.85 * self.device_gib


def activation_estimate(config, tokens: int, method: str, dtype: torch.dtype, dropout: float,
                        device_gib: float) -> MemoryEstimate:
    """A conservative size of one micro-batch of ``tokens`` tokens (all sequences together) on ``config``'s shape."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    elt = torch.finfo(dtype).bits // 8
    per_layer = (_BLOCK_HIDDEN_UNITS * h + _BLOCK_INTER_UNITS * i) * elt
    if dropout > 0:  # peft keeps the dropped input of every adapted linear (q,k,v share x; o; gate, up; down)
        per_layer += (6 * h + i) * elt
    outs = h + 2 * kv * head + h + 2 * i + h
    per_layer += _METHOD_EXTRA_OUT_BYTES.get(method, 0) * outs
    params = n * (h * (h + 2 * kv * head) + h * h + 3 * h * i) + 2 * cfg.vocab_size * h
    gib = 1024 ** 3
    return MemoryEstimate(
        weights_gib=params * elt / gib,
        activations_gib=tokens * n * per_layer / gib,
        checkpointed_gib=tokens * (n * 2 * h * elt + per_layer) / gib,
        device_gib=device_gib,
    )


def resolve_checkpointing(mode: str, config, tokens: int, method: str, dtype: torch.dtype, dropout: float,
                          cuda: bool) -> tuple[bool, MemoryEstimate | None]:
    """(use gradient checkpointing, the estimate behind an ``auto`` decision)."""
    mode = _mode("gradient_checkpointing", mode)
    if mode != "auto":
        return mode == "on", None
    if not cuda:
        return False, None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024 ** 3
    est = activation_estimate(config, tokens, method, dtype, dropout, total)
    return not est.fits_without_checkpointing, est


def load_base_for_training(source: str, dtype: torch.dtype, attn_implementation: str = "auto",
                           device: str | None = None):
    """The base loaded once, in ``dtype``, straight onto ``device`` (None = where transformers puts it: CPU)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": False}
    if attn_implementation and attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if device and device != "cpu":
        kwargs["device_map"] = device
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (ImportError, ValueError) as err:
        if "attn_implementation" in kwargs and "attn" in str(err).lower():
            raise PrecisionError(f"attn_implementation={attn_implementation!r} is not usable here: {err}") from err
        raise


def apply_liger(model) -> None:
    """Liger's RoPE, RMSNorm and SwiGLU kernels on a plain transformers model (before PEFT wraps it)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def decoder_layers(model):
    """The decoder blocks of a (possibly PEFT-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix, inner)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise PrecisionError(f"{type(inner).__name__} has no decoder `layers` to compile")
    return layers


def compile_layers(model) -> int:
    """``torch.compile`` every decoder layer in place (after PEFT wrapping); returns how many were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


@dataclass(frozen=True)
class TrainSettings:
    """What was decided for one training run (logged as params, reported by the bench)."""

    dtype: torch.dtype
    device: str
    attn_implementation: str
    gradient_checkpointing: bool
    liger: bool
    compile: bool
    padding_free: bool
    estimate: MemoryEstimate | None = None

    def params(self) -> dict:
        out = {"train.dtype": str(self.dtype).removeprefix("torch."), "train.device": self.device,
               "train.attn_implementation": self.attn_implementation,
               "train.gradient_checkpointing": self.gradient_checkpointing, "train.liger": self.liger,
               "train.compile": self.compile, "train.padding_free": self.padding_free}
        if self.estimate is not None:
            out["train.activation_estimate_gib"] = round(self.estimate.activations_gib, 1)
        return out


# Attention kernels that attend within each packed example without computing the masked-out blocks. SDPA gets a
# dense block-diagonal mask instead: on the H200 at 4 x 2048 tokens that cost 31 % of LoRA's throughput.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def resolve_padding_free(mode: str, cuda: bool, attn_implementation: str = "auto") -> bool:
    """Padding-free batches (examples concatenated, position ids reset per example, no pad token computed).

    ``auto`` = on with a GPU and an attention kernel that handles packed examples natively (flash-attention,
    flex_attention, hub kernels); with SDPA (the default) examples are padded instead.
    """
    mode = _mode("padding_free", mode)
    varlen = attn_implementation in VARLEN_ATTENTION or str(attn_implementation).startswith("kernels-")
    return mode == "on" or (mode == "auto" and cuda and varlen)
