"""Leaner training forwards for peft adapters on a bf16 base under bf16 autocast (the same math as peft's).

* Every peft tuner layer casts its input to the adapter's dtype: on a bf16 base with fp32 adapters that is a T×in
  fp32 copy per adapted linear, which autocast then casts back to bf16 for the matmul.
  :func:`disable_input_casting` turns that off (autocast still runs the adapter matmuls in bf16).
* DoRA recomputes ||W + s·B·A|| per row on every forward; peft builds B·A by pushing an in×in identity through
  the adapter (an 18944² matrix for down_proj at 7B) and, with input casting off, takes the norm in bf16.
  :func:`install` swaps in a forward that forms B·A directly and takes the norm in fp32 (detached, as in the DoRA
  paper §4.3 and in peft); the rest of the expression is peft's. Quantised, fan-in-fan-out and conv layers keep
  peft's forward. In fp32 without autocast it computes what peft computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_INSTALLED = False


def disable_input_casting(model) -> int:
    """Keep adapter inputs in the activation dtype (autocast casts for the matmul); returns the layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def _dora_forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(base_layer)
    if weight.ndim != 2 or self.fan_in_fan_out:
        return _ORIGINAL["dora"](self, x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                                 base_result=base_result, adapter_name=adapter_name)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        # ||W + s·B·A|| per output row, in fp32 and detached (DoRA §4.3; peft detaches it too)
        lora_weight = lora_B.weight.float() @ lora_A.weight.float()
        weight_norm = torch.linalg.norm(weight.float() + scaling * lora_weight, dim=1)
        del lora_weight
    mag_norm_scale = (self.weight / weight_norm).view(1, -1)
    lora_result = lora_B(lora_A(x))
    if base_result is not None:
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias
    else:
        base_result = F.linear(x, weight.to(x.dtype))
    result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
    return result_dora.to(base_result.dtype)


_ORIGINAL: dict = {}


def install() -> None:
    """Patch peft's DoRA forward (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from peft.tuners.lora.dora import DoraLinearLayer

    _ORIGINAL["dora"] = DoraLinearLayer.forward
    DoraLinearLayer.forward = _dora_forward
    _INSTALLED = True
