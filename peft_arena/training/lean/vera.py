"""VeRA (Kopiczko et al. 2024) without full-width fp32 temporaries: the same math as peft's ``vera.Linear.forward``.

peft adds ``λ_b ⊙ (B·(λ_d ⊙ (A·dropout(x))))`` to the base output with fp32 vectors λ_d (r) and λ_b (out). On a bf16
base under autocast, ``λ_b ⊙ u`` and the sum with the base output are T×out fp32 tensors, cast back to bf16 at the
end, and the bf16 T×out ``u = B·(λ_d ⊙ h)`` is kept for λ_b's gradient: per adapted linear, per step (VeRA runs at
r=256 on every linear, so Σ out per 7B decoder layer is ~50k features).

Here one autograd function computes, with the same casts as autocast makes in peft's expression,

    h  = A·x                      (T×r, activation dtype)
    hd = λ_d ⊙ h                  (fp32 arithmetic, written in the activation dtype: what autocast casts it to)
    y  = result + λ_b ⊙ (B·hd)    (fp32 arithmetic inside one kernel, written in the result's dtype)

and keeps only h (T×r) for the backward pass, where

    ∂λ_d = Σ_t (dy·(λ_b ⊙ B))_t ⊙ h_t            (T×r, fp32 products and sum)
    ∂λ_b = rowsum(B ⊙ (dyᵀ·hd))                   (a skinny out×T×r product: T×out is never formed)
    ∂x   = (λ_d ⊙ (dy·(λ_b ⊙ B)))·A

λ_b ⊙ B (out×r) is formed in the backward pass only (fp32 arithmetic, rounded once to the activation dtype, as peft
rounds dy ⊙ λ_b); the forward never rounds a λ before using it. In fp32 it computes what peft computes (tests compare
losses and gradients, with and without dropout). Merged or disabled adapters, several active VeRA adapters,
quantised bases and trainable projections keep peft's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ORIGINAL: dict = {}
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _compute_dtype(device_type: str, x_dtype: torch.dtype, tensors: tuple[torch.Tensor, ...]) -> torch.dtype | None:
    """The dtype of the adapter's matmuls for an input of ``x_dtype`` (after peft's input cast): autocast's where it
    is on, else the one dtype of every operand; None when the lean path does not apply (peft's forward decides)."""
    dtypes = {x_dtype, *(t.dtype for t in tensors)}
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type) if dtypes <= set(_AUTOCAST_ELIGIBLE) else None
    return x_dtype if len(dtypes) == 1 and x_dtype.is_floating_point else None


class _VeraDelta(torch.autograd.Function):
    """y = result + λ_b ⊙ (B·(λ_d ⊙ (A·x))), computed in ``cdt`` and written in the result's dtype; keeps A·x only."""

    @staticmethod
    def forward(ctx, result, x, sliced_A, sliced_B, lambda_d, lambda_b, cdt):
        with torch.autocast(x.device.type, enabled=False):
            a, b = sliced_A.to(cdt), sliced_B.to(cdt)
            h = F.linear(x.reshape(-1, x.shape[-1]).to(cdt), a)
            hd = torch.empty_like(h)
            torch.mul(h, lambda_d, out=hd)
            u = F.linear(hd, b)
            out = torch.empty(result.shape, dtype=result.dtype, device=result.device)
            torch.addcmul(result, u.view(result.shape), lambda_b, out=out)
        ctx.save_for_backward(h, sliced_A, sliced_B, lambda_d, lambda_b)
        ctx.cdt, ctx.x_shape, ctx.x_dtype = cdt, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        h, sliced_A, sliced_B, lambda_d, lambda_b = ctx.saved_tensors
        need_result, need_x, _, _, need_d, need_b, _ = ctx.needs_input_grad
        cdt = ctx.cdt
        d_x = d_lambda_d = d_lambda_b = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
            b = sliced_B.to(cdt)
            if need_b:
                hd = torch.empty_like(h)
                torch.mul(h, lambda_d, out=hd)
                g = dy2.T @ hd  # out × r
                d_lambda_b = (g.float() * b).sum(dim=1, dtype=torch.float32).to(lambda_b.dtype)
            if need_x or need_d:
                b_scaled = torch.empty_like(b)
                torch.mul(b, lambda_b.unsqueeze(1), out=b_scaled)
                dhd = dy2 @ b_scaled  # T × r: the gradient reaching λ_d ⊙ h
                if need_d:
                    d_lambda_d = (dhd.float() * h).sum(dim=0, dtype=torch.float32).to(lambda_d.dtype)
                if need_x:
                    dh = torch.empty_like(dhd)
                    torch.mul(dhd, lambda_d, out=dh)
                    d_x = (dh @ sliced_A.to(cdt)).view(ctx.x_shape).to(ctx.x_dtype)
        return (dy if need_result else None), d_x, None, None, d_lambda_d, d_lambda_b, None


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``vera.Linear.forward`` for one active adapter, through :class:`_VeraDelta`."""
    plain = not self.disable_adapters and not self.merged and self.quantization_backend is None
    active = [name for name in self.active_adapters if name in self.vera_lambda_d.keys()] if plain else []
    if len(active) != 1:
        return _ORIGINAL["forward"](self, x, *args, **kwargs)
    name = active[0]
    lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
    vera_A, vera_B = self.vera_A[name], self.vera_B[name]
    x_dtype = lambda_d.dtype if getattr(self, "cast_input_dtype_enabled", True) else x.dtype
    cdt = _compute_dtype(x.device.type, x_dtype, (vera_A, vera_B, lambda_d, lambda_b))
    if cdt is None or vera_A.requires_grad or vera_B.requires_grad:
        return _ORIGINAL["forward"](self, x, *args, **kwargs)
    previous_dtype = x.dtype
    result = self.base_layer(x, *args, **kwargs)
    sliced_A = vera_A[:, : self.in_features].to(x.device)
    sliced_B = vera_B[: self.out_features, :].to(x.device)
    x = self._cast_input_dtype(x, lambda_d.dtype)
    result = _VeraDelta.apply(result, self.vera_dropout[name](x), sliced_A, sliced_B, lambda_d, lambda_b, cdt)
    return result.to(previous_dtype)


def install() -> None:
    """Patch peft's VeRA linear forward (``_ORIGINAL`` keeps peft's, for tests)."""
    from peft.tuners.vera.layer import Linear

    if "forward" not in _ORIGINAL:
        _ORIGINAL["forward"] = Linear.forward
    Linear.forward = _lean_forward


def uninstall() -> None:
    """peft's forward back (tests)."""
    from peft.tuners.vera.layer import Linear

    if "forward" in _ORIGINAL:
        Linear.forward = _ORIGINAL["forward"]
