"""VeRA (Kopiczko et al. 2024) without full-width fp32 temporaries: the same math as peft's ``vera.Linear.forward``.

peft adds ``λ_b ⊙ (B·(λ_d ⊙ (A·dropout(x))))`` to the base output with fp32 vectors λ_d (r) and λ_b (out). On a
bf16 base under autocast, ``λ_b ⊙ u`` and the sum with the base output are T×out fp32 tensors, cast back to bf16 at the
end, and the bf16 T×out ``u = B·(λ_d ⊙ h)`` is kept for λ_b's gradient: per adapted linear, per step (VeRA runs at
r=256 on every linear, so Σ out per 7B decoder layer is ~50k features).

Here one autograd function computes the same expression with λ_b moved into the skinny matrix,

    h  = A·x                           (T×r, activation dtype, as autocast computes it in peft)
    hd = λ_d ⊙ h                       (fp32 arithmetic, written in the activation dtype: what autocast casts it to)
    y  = result + hd·(λ_b ⊙ B)ᵀ        (one GEMM accumulating into the base output in place: fp32 accumulator,
                                        one rounding; λ_b ⊙ B is formed in fp32 and rounded once per entry)

and keeps h and hd (T×r) for the backward pass, where

    ∂λ_b = rowsum(B ⊙ (dyᵀ·hd))        (a skinny out×T×r product: T×out is never formed)
    ∂λ_d = Σ_t (dy·(λ_b ⊙ B))_t ⊙ h_t  (T×r, fp32-accumulated)
    ∂x   = (dy·(λ_b ⊙ B))·(λ_d ⊙ A)

No elementwise kernel touches T×out, and none mixes bf16 with fp32 over more than T×r (PyTorch runs mixed-dtype
elementwise ops through a slow non-vectorised casting kernel on the GPU). peft rounds B·hd to bf16 and then
multiplies by λ_b in fp32; here each entry of λ_b ⊙ B is rounded instead, which is as precise (the tests compare
both with a float64 gradient) and, every entry rounding on its own, keeps small updates of λ_b on average. In fp32 it
computes what peft computes (tests compare losses and gradients, with and without dropout). Merged or disabled adapters,
several active VeRA adapters, quantised bases and trainable projections keep peft's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peft_arena.training.lean import patching

_ORIGINAL: dict = {}
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _compute_dtype(device_type: str, x_dtype: torch.dtype, tensors: tuple[torch.Tensor, ...]) -> torch.dtype | None:
    """The dtype of the adapter's matmuls for an input of ``x_dtype`` (after peft's input cast): autocast's where it
    is on, else the one dtype of every operand; None when the lean path does not apply (peft's forward decides)."""
    dtypes = {x_dtype, *(t.dtype for t in tensors)}
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type) if dtypes <= set(_AUTOCAST_ELIGIBLE) else None
    return x_dtype if len(dtypes) == 1 and x_dtype.is_floating_point else None


def _row_scaled(matrix: torch.Tensor, vector: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """vector ⊙ matrix (row i times vector[i]) in fp32-or-wider arithmetic, rounded once to ``dtype``; small tensors
    only (r×in, out×r). Each entry is rounded on its own, so a small change of the vector still moves the sum over
    r."""
    wide = torch.promote_types(matrix.dtype, vector.dtype)
    return (matrix.to(wide) * vector.to(wide).unsqueeze(1)).to(dtype)


class _VeraDelta(torch.autograd.Function):
    """y = result + λ_b ⊙ (B·(λ_d ⊙ (A·x))) in ``cdt``; keeps A·x and λ_d ⊙ A·x (T×r) only.

    λ_b enters the skinny matrix: y = result + hd·(λ_b ⊙ B)ᵀ is one GEMM that accumulates into the base output in
    place (fp32 accumulator, one rounding), so no T×out product exists and no elementwise kernel mixes bf16 with
    fp32 over T×out (PyTorch runs those through a slow non-vectorised casting path on the GPU).
    """

    @staticmethod
    def forward(ctx, result, x, sliced_A, sliced_B, lambda_d, lambda_b, cdt):
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(x.reshape(-1, x.shape[-1]).to(cdt), sliced_A.to(cdt))
            hd = torch.empty_like(h)
            torch.mul(h, lambda_d, out=hd)  # T×r: fp32 arithmetic, rounded as autocast rounds peft's λ_d ⊙ h
            b_scaled = _row_scaled(sliced_B, lambda_b, cdt)
            if result.dtype == cdt and result.is_contiguous():
                result.view(-1, result.shape[-1]).addmm_(hd, b_scaled.T)
                ctx.mark_dirty(result)
                out = result
            else:  # e.g. a bf16 base output with fp32 adapter matmuls outside autocast: peft's promotion
                out = torch.empty_like(result)
                torch.add(result, F.linear(hd, b_scaled).view(result.shape), out=out)
        ctx.save_for_backward(h, hd, sliced_A, sliced_B, lambda_d, lambda_b)
        ctx.cdt, ctx.x_shape, ctx.x_dtype = cdt, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        h, hd, sliced_A, sliced_B, lambda_d, lambda_b = ctx.saved_tensors
        need_result, need_x, _, _, need_d, need_b, _ = ctx.needs_input_grad
        cdt = ctx.cdt
        d_x = d_lambda_d = d_lambda_b = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
            if need_b:  # Σ_t dy ⊙ (B·hd) = rowsum(B ⊙ dyᵀ·hd): out×r, never T×out
                g = dy2.T @ hd
                wide = torch.promote_types(lambda_b.dtype, torch.float32)
                d_lambda_b = (g.to(wide) * sliced_B.to(wide)).sum(dim=1).to(lambda_b.dtype)
            if need_x or need_d:
                dhd = dy2 @ _row_scaled(sliced_B, lambda_b, cdt)  # T×r: the gradient reaching λ_d ⊙ h
                if need_d:
                    d_lambda_d = torch.mul(dhd, h).sum(dim=0, dtype=torch.float32).to(lambda_d.dtype)
                if need_x:
                    d_x = (dhd @ _row_scaled(sliced_A, lambda_d, cdt)).view(ctx.x_shape).to(ctx.x_dtype)
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


def _replacements() -> dict:
    from peft.tuners.vera.layer import Linear

    return {"forward": (Linear, "forward", _lean_forward)}


def install() -> None:
    """Patch peft's VeRA linear forward (``_ORIGINAL`` keeps peft's)."""
    patching.patch(_ORIGINAL, _replacements())


def uninstall() -> None:
    """peft's forward back (tests)."""
    patching.restore(_replacements())
