"""IA3 (Liu et al. 2022) without fp32 copies of activations: the same math as peft's ``ia3.Linear.forward``.

peft scales a feed-forward layer's input as ``(x.to(fp32) * l).to(x.dtype)`` and the other layers' outputs as
``(result * l).to(result.dtype)`` with the fp32 vector l. On a bf16 base each is a T×in (T×out) fp32 copy and an fp32
product, the fp32 copy of x is kept for l's gradient, and the backward pass makes fp32 copies again; at 7B with
all-linear targets that is ~65k features per decoder layer, several full passes each way.

Here one autograd function writes ``t ⊙ l`` in t's dtype with fp32 arithmetic inside the kernel, keeps t in its own
dtype for the backward pass, and gives

    ∂t = dy ⊙ l                (fp32 arithmetic, written in t's dtype)
    ∂l = Σ_tokens dy ⊙ t       (an fp32-accumulated reduction; the products are rounded to t's dtype first)

On a bf16 t, l enters as l = 1 + δ with δ rounded to bf16 (see :class:`_Scale`), so every T×F kernel is a vectorised
bf16 one; the result differs from peft's bf16(t·l) by at most |t·δ|·2⁻⁹, well below the output's own rounding.

In fp32 it computes what peft computes (tests compare losses and gradients). Merged or disabled adapters, and
vector dtypes narrower than the activations, keep peft's forward; several active adapters multiply their vectors as
peft does.
"""

from __future__ import annotations

import torch

from peft_arena.training.lean import patching

_ORIGINAL: dict = {}


class _Scale(torch.autograd.Function):
    """y = t ⊙ l over t's last dimension, written in t's dtype; l's gradient reduced in fp32.

    On a bf16 t with an fp32 l, l enters as δ = l − 1 rounded to t's dtype: ``addcmul(t, t, δ)`` is t·l in one
    vectorised kernel (fp32 arithmetic inside, one rounding), and δ in bf16 keeps l's small updates (l starts at 1);
    a mixed bf16 × fp32 elementwise op would run PyTorch's slow non-vectorised casting kernel on the GPU instead.
    """

    @staticmethod
    def forward(ctx, t, scale):
        if scale.dtype == t.dtype:
            factor, out = scale, t * scale
        else:
            factor = (scale - 1).to(t.dtype)
            out = torch.addcmul(t, t, factor)
        need_t, need_scale = ctx.needs_input_grad
        ctx.save_for_backward(t if need_scale else None, factor if need_t else None)
        ctx.scale_dtype, ctx.shifted = scale.dtype, scale.dtype != t.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        t, factor = ctx.saved_tensors
        d_t = d_scale = None
        if ctx.needs_input_grad[0]:
            d_t = torch.addcmul(dy, dy, factor) if ctx.shifted else dy * factor
        if ctx.needs_input_grad[1]:
            d_scale = torch.mul(dy, t).sum(dim=tuple(range(dy.ndim - 1)), dtype=torch.float32).to(ctx.scale_dtype)
        return d_t, d_scale


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``ia3.Linear.forward`` with the scaling through :class:`_Scale`."""
    if self.disable_adapters or self.merged:
        return _ORIGINAL["forward"](self, x, *args, **kwargs)
    ia3_scaling, dtype = None, None
    for name in self.active_adapters:
        if name in self.ia3_l.keys():
            dtype = self.ia3_l[name].dtype
            vector = self.ia3_l[name].flatten()
            ia3_scaling = vector if ia3_scaling is None else ia3_scaling * vector
    if ia3_scaling is None:
        return _ORIGINAL["forward"](self, x, *args, **kwargs)
    if self.is_feedforward:
        # peft multiplies x.to(dtype) by the vectors: the same product only where that cast is exact
        if ia3_scaling.dtype != dtype or torch.promote_types(x.dtype, dtype) != dtype:
            return _ORIGINAL["forward"](self, x, *args, **kwargs)
        return self.base_layer(_Scale.apply(x, ia3_scaling), *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    return _Scale.apply(result, ia3_scaling)


def _replacements() -> dict:
    from peft.tuners.ia3.layer import Linear

    return {"forward": (Linear, "forward", _lean_forward)}


def install() -> None:
    """Patch peft's IA3 linear forward (``_ORIGINAL`` keeps peft's)."""
    patching.patch(_ORIGINAL, _replacements())


def uninstall() -> None:
    """peft's forward back (tests)."""
    patching.restore(_replacements())
