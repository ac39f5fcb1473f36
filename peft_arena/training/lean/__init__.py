"""Leaner training forwards for peft adapters on a bf16 base under bf16 autocast: the same math as peft's, without
the fp32 copies and the full-size temporaries that peft's generic forwards make. One file per method, as in peft.

* Every peft tuner layer casts its input to the adapter's dtype: on a bf16 base with fp32 adapters that is a T×in
  fp32 copy per adapted linear, which autocast then casts back to bf16 for the matmul.
  :func:`disable_input_casting` turns that off (autocast still runs the adapter matmuls in bf16).
* :func:`install` swaps in the per-method forwards (each file says what it changes and why it is the same math),
  and AdaLoRA's rank allocator without per-tensor loops and host-device synchronisations.
  Layers a lean forward does not cover (quantised, fan-in-fan-out, conv) keep peft's forward.

:func:`prepare` is what the trainers call after building the adapter.
"""

from __future__ import annotations

import torch

from peft_arena.training.lean import adalora, boft, dora, ia3, vera

_MODULES = (dora, vera, ia3, boft, adalora)


def disable_input_casting(model) -> int:
    """Keep adapter inputs in the activation dtype (autocast casts for the matmul); returns the layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def install() -> None:
    """Patch peft's forwards with the lean ones (idempotent: each module keeps peft's original once)."""
    for module in _MODULES:
        module.install()


def prepare(model, dtype: torch.dtype, cuda: bool) -> None:
    """After the adapter is built: lean forwards everywhere; no input casting on a bf16 base under autocast;
    BOFT's rotation blocks computed for all layers at once per forward."""
    install()
    boft.prepare(model)
    if cuda and dtype == torch.bfloat16:
        disable_input_casting(model)
