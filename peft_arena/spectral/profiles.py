"""Per-matrix spectral profiles of a finetuning update (the paper's §5 metrics plus subspace metrics).

Notation: the pretrained weight W (m×n, out×in) has the thin SVD W = U Σ Vᵀ with p = min(m, n) triplets
(u_i, σ_i, v_i), σ descending. The finetuned weight is W_ft = W + ΔW.

The paper's metrics (PEFT-Arena ``tools/spectral_analysis.py``):

* retention profile   |ΔP_diag(i)| = |u_iᵀ W_ft v_i − σ_i| = |u_iᵀ ΔW v_i|
* adaptation profile  E_Δ(i) = ‖ΔW v_i‖₂
* effective rank of ΔW, the *stable rank* ‖ΔW‖_F² / ‖ΔW‖₂², and the top singular values of ΔW
* fluctuation ("smoothness") score of a profile x: mean_i |x_i − MA_w(x)_i|, MA_w a width-w moving average
  over x padded by reflection (w = 5); higher means spikier
* SVA (OFT only): |cos(v_i, v_i^ft)| between the i-th right singular vectors of W and W_ft

Ours:

* principal angles between the top-k left (and right) singular subspaces of W and W_ft, reported as their
  cosines; ``overlap_*`` = mean cos² (1 = same subspace, k/p ≈ random)
* energy share of ΔW in W's top-k subspace: input side ‖ΔW V_k‖_F² / ‖ΔW‖_F², output side
  ‖U_kᵀ ΔW‖_F² / ‖ΔW‖_F², both sides ‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F²
* intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence", the
  same rule as ``peft.tuners.lora.intruders``): among the top ``intruder_k`` (= 10) left singular vectors
  u'_j of W_ft, those whose largest |cos| with every pretrained left singular vector u_i (all p of them) is
  below ``intruder_eps`` (= 0.5). ``intruders`` counts them; ``intruder_max_cos`` keeps the k cosines.

Two paths give the same numbers:

* dense: ΔW (or W_ft) as a matrix.
* factors: ΔW = B·A with B (m×r), A (r×n), any scaling folded in, r ≪ p. Nothing m×n is formed:
  u_iᵀΔW v_i = (Uᵀ B)_i · (A V)_{·i}; E_Δ(i) = ‖R_B (A v_i)‖ with B = Q_B R_B; the singular values of ΔW are
  those of the r×r core R_B R_Aᵀ (Aᵀ = Q_A R_A), exactly.

The top-k singular triplets of W_ft (principal angles, intruders) come from block subspace iteration with
Rayleigh–Ritz, applying W_ft only as products (W X + B (A X) on the factor path), warm-started from W's own
top singular vectors plus the row space of A, and stopped on a residual certificate
max_j ‖W_ft v_j − σ_j u_j‖ ≤ tol · σ_1 (tol = 64·eps·√p of the compute dtype), so the result is exact to
the precision of the dtype. If that certificate is not reached in ``max_iter`` sweeps the triplets come from a
full SVD of W_ft instead (same result, slower), counted in ``topk_full_svd``. Small matrices
(p ≤ block size) and OFT (SVA needs every right singular vector) always take the full SVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

INTRUDER_K = 10
INTRUDER_EPS = 0.5


@dataclass
class BaseSVD:
    """Thin SVD of a pretrained weight: W = U diag(S) Vᵀ, U (m×p), S (p), V (n×p)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @classmethod
    def of(cls, W: torch.Tensor) -> "BaseSVD":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return cls(U, S, Vh.mT)


@dataclass
class MatrixProfile:
    """Profiles (1-D tensors over singular index i or over k) and scalar summaries of one weight matrix."""

    profiles: dict[str, torch.Tensor]
    summary: dict[str, float | int | list[float]]
    path: str  # "dense" or "factors"
    meta: dict[str, int] = field(default_factory=dict)


def fluctuation(x: torch.Tensor, window: int = 5) -> tuple[torch.Tensor, float]:
    """Per-index deviation |x − MA_w(x)| and its mean (the paper's fluctuation score), reflect padding."""
    if window < 1:
        raise ValueError(f"moving-average window must be ≥ 1, got {window}")
    x = x.to(torch.float64)
    left, right = window // 2, window - 1 - window // 2
    if max(left, right) >= x.numel():  # reflect padding needs more points than the pad width
        raise ValueError(f"profile of length {x.numel()} is too short for a moving-average window of {window}")
    padded = F.pad(x.view(1, 1, -1), (left, right), mode="reflect")
    moving_avg = F.avg_pool1d(padded, kernel_size=window, stride=1).view(-1)
    dev = (x - moving_avg).abs()
    return dev, float(dev.mean())


def _cos_principal_angles(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(X) and span(Y) (orthonormal columns), descending."""
    return torch.linalg.svdvals(X.mT @ Y).clamp(max=1.0)


def _orth(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X).Q


def top_singular_triplets(
    apply, apply_t, V0: torch.Tensor, k: int, *, max_iter: int = 100, tol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """Top-k singular triplets of an operator M given as products ``apply(X) = M X``, ``apply_t(Y) = Mᵀ Y``.

    Block Rayleigh–Ritz in the LOBPCG style on MᵀM: each sweep searches span[V, MᵀM V, V_previous] (3l
    columns) and keeps the top l Ritz vectors. The Ritz triplets satisfy M v_j = σ_j u_j exactly; the sweep
    stops once the other residual max_j ‖Mᵀ u_j − σ_j v_j‖ ≤ tol·σ_1. Returns (U_k, S_k, V_k, sweeps), or None
    if ``max_iter`` sweeps do not reach the tolerance.
    """
    eps = torch.finfo(V0.dtype).eps
    l = V0.shape[1]
    V = _orth(V0)
    Y = apply(V)  # M V
    V_prev = None
    for sweep in range(1, max_iter + 1):
        Z = apply_t(Y)  # MᵀM V (or Mᵀ U S after the first sweep)
        parts = [V, Z] if V_prev is None else [V, Z, V_prev]
        K = _orth(torch.cat(parts, dim=1))
        Uk, Sk, Wkh = torch.linalg.svd(apply(K), full_matrices=False)  # Ritz triplets on span K
        V_prev = V
        V = K @ Wkh[:l].mT
        Y = Uk[:, :l] * Sk[:l]  # = M V
        if tol is None:
            tol = 64 * eps * max(Y.shape[0], V.shape[0]) ** 0.5
        if Sk[0] == 0:
            return Uk[:, :k], Sk[:k], V[:, :k], sweep
        # Mᵀ u_j − σ_j v_j, with Mᵀ u_j = (Mᵀ Y)_j / σ_j computed by the next sweep's product; check it now.
        Z_next = apply_t(Uk[:, :k])
        residual = (Z_next - V[:, :k] * Sk[:k]).norm(dim=0).max()
        if residual <= tol * Sk[0]:
            return Uk[:, :k], Sk[:k], V[:, :k], sweep
    return None


def _delta_core(B: torch.Tensor, A: torch.Tensor):
    """QR of the factors: B = Q_B R_B, Aᵀ = Q_A R_A, so ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ with an r×r core."""
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.mT)
    return Q_B, R_B, Q_A, R_A


def matrix_profile(
    W: torch.Tensor,
    W_ft: torch.Tensor | None = None,
    *,
    delta_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    svd: BaseSVD | None = None,
    top_k: int = 32,
    window: int = 5,
    is_oft: bool = False,
    intruder_k: int = INTRUDER_K,
    intruder_eps: float = INTRUDER_EPS,
    oversample: int | None = None,
    max_iter: int = 100,
) -> MatrixProfile:
    """All spectral metrics of one weight matrix; see the module docstring for definitions.

    Give exactly one of ``W_ft`` (dense finetuned weight) or ``delta_factors=(B, A)`` (ΔW = B @ A, scaling
    folded in). ``svd`` is W's thin SVD (computed here when None). Every tensor must share device and dtype;
    the computation runs in that dtype (float64 for references, float32 on GPU).
    """
    if (W_ft is None) == (delta_factors is None):
        raise ValueError("give exactly one of W_ft (dense) or delta_factors=(B, A)")
    m, n = W.shape
    svd = svd or BaseSVD.of(W)
    U, S, V = svd.U, svd.S, svd.V
    p = S.numel()
    k = min(top_k, p)
    ki = min(intruder_k, p)
    k_need = max(k, ki)
    block = k_need + (oversample if oversample is not None else max(k_need, 16))

    if delta_factors is not None:
        B, A = delta_factors
        if B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
            raise ValueError(f"factors {tuple(B.shape)} @ {tuple(A.shape)} do not make a {m}×{n} update")
        path = "factors"
        _, R_B, Q_A, R_A = _delta_core(B, A)
        core = R_B @ R_A.mT  # r×r, same singular values as ΔW
        delta_sv = torch.linalg.svdvals(core)
        UtB = U.mT @ B  # p×r
        AV = A @ V  # r×p
        diag_delta = (UtB * AV.mT).sum(dim=1)  # u_iᵀ ΔW v_i
        E_delta = (R_B @ AV).norm(dim=0)  # ‖ΔW v_i‖ = ‖R_B A v_i‖
        fro2 = core.square().sum()
        out_topk2 = (UtB[:k] @ R_A.mT).square().sum()  # ‖U_kᵀ B A‖_F² = ‖(U_kᵀB) R_Aᵀ‖_F²
        both_topk2 = (UtB[:k] @ AV[:, :k]).square().sum()

        def apply(X):
            return W @ X + B @ (A @ X)

        def apply_t(Y):
            return W.mT @ Y + A.mT @ (B.mT @ Y)

        # W_ft's top right singular vectors lie close to W's plus the row space of the update.
        V0 = torch.cat([V[:, :block], Q_A], dim=1)
    else:
        path = "dense"
        D = W_ft - W
        DV = D @ V  # m×p
        diag_delta = (U * DV).sum(dim=0)
        E_delta = DV.norm(dim=0)
        # Singular values of ΔW from the eigenvalues of its smaller Gram matrix in float64: much faster than an
        # SVD on GPU, exact for the top values and the stable rank (noise floor ~1e-8·σ_max).
        D64 = D.to(torch.float64)
        gram = D64 @ D64.mT if m <= n else D64.mT @ D64
        delta_sv = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt().to(W.dtype)
        fro2 = D.square().sum()
        out_topk2 = (U[:, :k].mT @ D).square().sum()
        both_topk2 = (U[:, :k].mT @ DV[:, :k]).square().sum()

        def apply(X):
            return W_ft @ X

        def apply_t(Y):
            return W_ft.mT @ Y

        V0 = V[:, :block]

    # --- top singular triplets of W_ft ------------------------------------------------------------------------
    full_svd = is_oft or V0.shape[1] >= p
    sweeps = 0
    Vft_full = None
    if not full_svd:
        found = top_singular_triplets(apply, apply_t, V0, k_need, max_iter=max_iter)
        if found is None:
            full_svd = True
        else:
            Uft, Sft, Vft, sweeps = found
    used_full_after_iteration = full_svd and not is_oft and V0.shape[1] < p
    if full_svd:
        W_dense = W_ft if W_ft is not None else W + B @ A
        Uf, Sf, Vfh = torch.linalg.svd(W_dense, full_matrices=False)
        Uft, Sft, Vft = Uf[:, :k_need], Sf[:k_need], Vfh[:k_need].mT
        Vft_full = Vfh.mT

    # --- the paper's metrics -------------------------------------------------------------------------------------
    P_diag_ft = S + diag_delta
    delta_P = diag_delta.abs()
    dev_ret, smooth_ret = fluctuation(delta_P, window)
    dev_ad, smooth_ad = fluctuation(E_delta, window)
    spec = delta_sv[0] if delta_sv.numel() else torch.zeros((), dtype=W.dtype)
    fro2_f = float(fro2)
    stable_rank = fro2_f / float(spec) ** 2 if float(spec) > 0 else 0.0

    profiles: dict[str, torch.Tensor] = {
        "S_pre": S, "P_diag_ft": P_diag_ft, "delta_P_diag": delta_P, "E_delta": E_delta, "delta_sv": delta_sv,
        "dev_retention": dev_ret.to(W.dtype), "dev_adaptation": dev_ad.to(W.dtype), "S_ft_topk": Sft,
    }
    top5 = [float(x) for x in delta_sv[:5]]
    summary: dict[str, float | int | list[float]] = {
        "effective_rank": stable_rank,
        "smoothness_retention": smooth_ret,
        "smoothness_adaptation": smooth_ad,
        "delta_P_diag_mean": float(delta_P.mean()),
        "delta_P_diag_max": float(delta_P.max()),
        "E_delta_mean": float(E_delta.mean()),
        "E_delta_max": float(E_delta.max()),
        "delta_sv_top5": top5,
        "delta_fro": fro2_f ** 0.5,
        "delta_spec": float(spec),
        "rel_delta_fro": fro2_f ** 0.5 / float(S.square().sum().sqrt()),
    }

    # --- ours: subspaces, energy, intruders ---------------------------------------------------------------------
    cos_left = _cos_principal_angles(U[:, :k], Uft[:, :k])
    cos_right = _cos_principal_angles(V[:, :k], Vft[:, :k])
    intruder_cos = (U.mT @ Uft[:, :ki]).abs().amax(dim=0)
    profiles.update({"cos_angles_left": cos_left, "cos_angles_right": cos_right, "intruder_max_cos": intruder_cos})
    in_topk2 = E_delta[:k].square().sum()
    share = (lambda x: float(x) / fro2_f) if fro2_f > 0 else (lambda x: 0.0)
    summary.update({
        "overlap_left": float(cos_left.square().mean()),
        "overlap_right": float(cos_right.square().mean()),
        "max_angle_left_deg": float(torch.rad2deg(torch.arccos(cos_left.min()))),
        "max_angle_right_deg": float(torch.rad2deg(torch.arccos(cos_right.min()))),
        "energy_topk_in": share(in_topk2),
        "energy_topk_out": share(out_topk2),
        "energy_topk_both": share(both_topk2),
        "intruders": int((intruder_cos < intruder_eps).sum()),
        "intruder_min_cos": float(intruder_cos.min()),
    })
    if is_oft:
        sva = (V * Vft_full[:, :p]).sum(dim=0).abs()
        profiles["sva_cosines"] = sva
        summary.update({"sva_mean": float(sva.mean()), "sva_min": float(sva.min())})
    meta = {"m": m, "n": n, "p": p, "top_k": k, "intruder_k": ki, "subspace_sweeps": sweeps,
            "topk_full_svd": int(used_full_after_iteration)}
    if delta_factors is not None:
        meta["rank"] = delta_factors[0].shape[1]
    return MatrixProfile(profiles=profiles, summary=summary, path=path, meta=meta)
