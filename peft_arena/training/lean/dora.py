"""DoRA (Liu et al. 2024) without full-size temporaries: the same math as peft's ``DoraLinearVariant``.

peft's DoRA forward, per adapted linear and per step:

* recomputes ||W + s·B·A|| per output row by forming B·A (and, through an in×in identity, an 18944² matrix for
  ``down_proj`` at 7B) and adding it to an fp32 copy of W: several weight-sized temporaries;
* combines ``result + (g − 1)·(result − bias) + g·s·(B·A·x)`` with ``g = m / ||W + s·B·A||`` in fp32: on a bf16
  base every term is a T×out fp32 tensor, and two of them are kept for the backward pass.

Here the row norm comes from the Gram expansion, which never forms a weight-sized matrix:

    ||W_i + s·(BA)_i||² = ||W_i||² + 2s·(B ⊙ (W·Aᵀ))_i·1 + s²·(B ⊙ (B·A·Aᵀ))_i·1

(||W_i||² is cached: the base is frozen; W·Aᵀ is one skinny out×in×r product), taken in fp32 and detached, as in the
DoRA paper §4.3 and in peft. The output is ``g ⊙ (result + s·lora) + (1 − g)·bias``, the same expression
regrouped, computed by one autograd function in the activation dtype (vectorised kernels, fp32 arithmetic inside) that keeps one
T×out tensor for the backward pass. With dropout active peft needs W·dropout(x), a second base product; that case
keeps peft's expression (with the Gram norm). Quantised, fan-in-fan-out and non-2-D layers keep peft's forward.
In fp32 it computes what peft computes (tests compare losses and gradients).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peft_arena.training.lean import patching

_ORIGINAL: dict = {}


def _plain_2d_weight(module) -> torch.Tensor | None:
    """The base weight when the lean path applies to it (a plain 2-D tensor, not quantised, not fan-in-fan-out)."""
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    if (not isinstance(base, nn.Linear) or weight is None or weight.ndim != 2 or module.fan_in_fan_out
            or type(weight) not in (torch.Tensor, nn.Parameter) or not weight.dtype.is_floating_point):
        return None
    return weight


@torch.no_grad()
def weight_row_norm(owner: nn.Module, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """||W + s·B·A|| per output row, fp32, by the Gram expansion (``owner`` caches ||W_i||²)."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.device, weight.dtype)
    cached = getattr(owner, "_lean_w_sq", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.float().square().sum(dim=1))
        owner._lean_w_sq = cached
    w_sq = cached[1]
    with torch.autocast(weight.device.type, enabled=False):
        a32, b32 = lora_A.float(), lora_B.float()
        cross = (weight @ lora_A.to(weight.dtype).T).float()  # out × r: reads W once
        cross = (cross * b32).sum(dim=1)
        quad = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)
        return (w_sq + (2 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


class _DoraCombine(torch.autograd.Function):
    """y = g ⊙ (result + s·lora) + c in the activations' dtype; c = (1 − g)·bias or None.

    g = m / ||W + s·B·A|| stays near 1, so g enters as δ = g − 1: ``addcmul(z, z, δ)`` is z·g in one vectorised
    kernel of the activation dtype (fp32 arithmetic inside) and δ in bf16 keeps g's small updates; a mixed
    bf16 × fp32 elementwise op would run PyTorch's slow non-vectorised casting kernel instead (5× on an H200).
    """

    @staticmethod
    def forward(ctx, result, lora, g, c, scaling):
        z = torch.add(result, lora, alpha=scaling)
        delta = (g.detach() - 1).to(z.dtype)
        out = torch.addcmul(z, z, delta)
        if c is not None:
            out.add_(c.detach().to(z.dtype))
        ctx.save_for_backward(z, delta)
        ctx.scaling = scaling
        ctx.has_c = c is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        z, delta = ctx.saved_tensors
        rows = tuple(range(dy.ndim - 1))
        dz = torch.addcmul(dy, dy, delta)
        d_lora = dz * ctx.scaling if ctx.needs_input_grad[1] else None
        d_g = torch.mul(dy, z).sum(dim=rows, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        d_c = dy.sum(dim=rows, dtype=torch.float32) if ctx.has_c and ctx.needs_input_grad[3] else None
        return dz, d_lora, d_g, d_c, None


def _variant_forward(module, active_adapter, x, result, **kwargs):
    """peft's ``DoraLinearVariant.forward`` (result + DoRA term), regrouped into one fused combination."""
    dropout = module.lora_dropout[active_adapter]
    weight = _plain_2d_weight(module)
    if weight is None or (module.training and not isinstance(dropout, nn.Identity)):
        return _ORIGINAL["variant"](module, active_adapter=active_adapter, x=x, result=result, **kwargs)
    lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
    scaling = module.scaling[active_adapter]
    magnitude = module.lora_magnitude_vector[active_adapter]
    norm = weight_row_norm(magnitude, weight, lora_A.weight, lora_B.weight, scaling)
    g = magnitude.weight / norm
    bias = module.get_base_layer().bias
    c = None if bias is None else (1 - g) * bias
    return _DoraCombine.apply(result, lora_B(lora_A(x)), g, c, scaling)


def _dora_forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
    """peft's ``DoraLinearLayer.forward`` with the Gram row norm (the dropout path of :func:`_variant_forward`)."""
    from peft.utils.integrations import dequantize_module_weight

    weight = dequantize_module_weight(base_layer)
    if weight.ndim != 2 or self.fan_in_fan_out:
        return _ORIGINAL["dora"](self, x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                                 base_result=base_result, adapter_name=adapter_name)
    norm = weight_row_norm(self, weight, lora_A.weight, lora_B.weight, scaling)
    mag_norm_scale = (self.weight / norm).view(1, -1)
    lora_result = lora_B(lora_A(x))
    if base_result is not None:
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias
    else:
        base_result = F.linear(x, weight.to(x.dtype))
    result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
    return result_dora.to(base_result.dtype)


def _replacements() -> dict:
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    return {"dora": (DoraLinearLayer, "forward", _dora_forward),
            "variant": (DoraLinearVariant, "forward", staticmethod(_variant_forward))}


def install() -> None:
    """Patch peft's DoRA forwards (``_ORIGINAL`` keeps peft's)."""
    patching.patch(_ORIGINAL, _replacements())


def uninstall() -> None:
    """peft's forwards back (tests)."""
    patching.restore(_replacements())
