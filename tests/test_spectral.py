"""Spectral profiles against a dense float64 reference, known cases, factor == dense, and whole-model analyze()."""

import json
import math

import numpy as np
import pytest
import torch

from peft_arena.spectral.profiles import BaseSVD, fluctuation, matrix_profile

F64 = torch.float64


def reference(W, W_ft, k, window=5, ki=10, eps=0.5):
    """Straightforward float64 definitions with full SVDs of W, W_ft and ΔW (the paper's tool + ours)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.T
    D = W_ft - W
    Uf, Sf, Vfh = torch.linalg.svd(W_ft, full_matrices=False)
    Vf = Vfh.T
    sv = torch.linalg.svdvals(D)
    fro2 = float((D ** 2).sum())

    def fluct(x):
        x = x.numpy()
        left, right = window // 2, window - 1 - window // 2
        ma = np.convolve(np.pad(x, (left, right), mode="reflect"), np.ones(window) / window, mode="valid")
        return float(np.abs(x - ma).mean())

    ret = (torch.diagonal(U.T @ W_ft @ V) - S).abs()
    ad = (D @ V).norm(dim=0)
    cos_l = torch.linalg.svdvals(U[:, :k].T @ Uf[:, :k])
    cos_r = torch.linalg.svdvals(V[:, :k].T @ Vf[:, :k])
    intr = (Uf[:, :ki].T @ U).abs().max(dim=1).values
    return {
        "delta_P_diag": ret, "E_delta": ad, "delta_sv": sv, "S_ft_topk": Sf[: max(k, ki)],
        "cos_angles_left": cos_l, "cos_angles_right": cos_r, "intruder_max_cos": intr,
        "sva_cosines": (V * Vf).sum(0).abs(),
        "effective_rank": fro2 / float(sv[0]) ** 2 if sv[0] > 0 else 0.0,
        "smoothness_retention": fluct(ret), "smoothness_adaptation": fluct(ad),
        "energy_topk_in": float(((D @ V[:, :k]) ** 2).sum()) / fro2 if fro2 else 0.0,
        "energy_topk_out": float(((U[:, :k].T @ D) ** 2).sum()) / fro2 if fro2 else 0.0,
        "energy_topk_both": float(((U[:, :k].T @ D @ V[:, :k]) ** 2).sum()) / fro2 if fro2 else 0.0,
        "intruders": int((intr < eps).sum()),
    }


def assert_matches(prof, ref, atol=1e-9, sva=False):
    for key in ("delta_P_diag", "E_delta", "S_ft_topk", "cos_angles_left", "cos_angles_right", "intruder_max_cos"):
        got, want = prof.profiles[key], ref[key]
        assert got.shape == want.shape, key
        assert torch.allclose(got, want, atol=atol, rtol=1e-7), (key, (got - want).abs().max())
    r = prof.profiles["delta_sv"].numel()
    # Dense path: singular values of ΔW come from its float64 Gram matrix, exact down to ~1e-8·σ_max (documented).
    sv_atol = atol if prof.path == "factors" else max(atol, 1e-7 * float(ref["delta_sv"][0]))
    assert torch.allclose(prof.profiles["delta_sv"], ref["delta_sv"][:r], atol=sv_atol, rtol=1e-7)
    assert float(ref["delta_sv"][r:].sum()) < 1e-9  # the factor path keeps only the r nonzero ones
    for key in ("effective_rank", "smoothness_retention", "smoothness_adaptation", "energy_topk_in",
                "energy_topk_out", "energy_topk_both", "intruders"):
        assert prof.summary[key] == pytest.approx(ref[key], rel=1e-7, abs=atol), key
    if sva:
        assert torch.allclose(prof.profiles["sva_cosines"], ref["sva_cosines"], atol=1e-7)


def decaying(m, n, seed, decay=0.9):
    """A random matrix with a geometrically decaying spectrum (like trained weights, well separated σ)."""
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    p = min(m, n)
    S = decay ** torch.arange(p, dtype=F64) * 10
    return Q1[:, :p] @ torch.diag(S) @ Q2[:, :p].T


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_dense_and_factor_paths_match_reference_on_random_matrices(shape):
    m, n = shape
    g = torch.Generator().manual_seed(1)
    W = torch.randn(m, n, generator=g, dtype=F64)
    B = torch.randn(m, 5, generator=g, dtype=F64) * 0.3
    A = torch.randn(5, n, generator=g, dtype=F64)
    ref = reference(W, W + B @ A, k=8)
    svd = BaseSVD.of(W)
    dense = matrix_profile(W, W + B @ A, svd=svd, top_k=8)
    fact = matrix_profile(W, delta_factors=(B, A), svd=svd, top_k=8)
    assert dense.path == "dense" and fact.path == "factors"
    assert_matches(dense, ref)
    assert_matches(fact, ref)
    assert fact.profiles["delta_sv"].numel() == 5


def test_subspace_iteration_path_matches_full_svd():
    """Large enough that W_ft's top triplets come from the iterative solver, not a full SVD."""
    W = decaying(150, 110, seed=2)
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(150, 3, generator=g, dtype=F64) * 0.5, torch.randn(3, 110, generator=g, dtype=F64)
    ref = reference(W, W + B @ A, k=6, ki=6)
    for prof in (matrix_profile(W, delta_factors=(B, A), top_k=6, intruder_k=6, oversample=8),
                 matrix_profile(W, W + B @ A, top_k=6, intruder_k=6, oversample=8)):
        assert prof.meta["subspace_sweeps"] > 0 and prof.meta["topk_full_svd"] == 0
        assert_matches(prof, {**ref, "S_ft_topk": ref["S_ft_topk"][:6]}, atol=1e-8)


def test_zero_update_gives_zero_profiles():
    W = decaying(40, 56, seed=4)
    zeros = (torch.zeros(40, 4, dtype=F64), torch.zeros(4, 56, dtype=F64))
    for prof in (matrix_profile(W, W.clone(), top_k=8), matrix_profile(W, delta_factors=zeros, top_k=8)):
        assert prof.profiles["delta_P_diag"].abs().max() < 1e-12
        assert prof.profiles["E_delta"].abs().max() < 1e-12
        assert prof.summary["effective_rank"] == 0.0
        assert prof.summary["energy_topk_in"] == 0.0
        assert prof.summary["intruders"] == 0
        assert torch.allclose(prof.profiles["cos_angles_left"], torch.ones(8, dtype=F64), atol=1e-9)
        assert torch.allclose(prof.profiles["P_diag_ft"], prof.profiles["S_pre"], atol=1e-12)


def test_rank_one_update_along_a_pretrained_triplet():
    """ΔW = c·u_j v_jᵀ changes only σ_j: retention and adaptation are c at j and 0 elsewhere; stable rank 1."""
    W = decaying(50, 70, seed=5)
    svd = BaseSVD.of(W)
    j, c = 3, 0.7
    B, A = c * svd.U[:, j : j + 1], svd.V[:, j : j + 1].T
    for prof in (matrix_profile(W, delta_factors=(B, A), svd=svd, top_k=8),
                 matrix_profile(W, W + B @ A, svd=svd, top_k=8)):
        expected = torch.zeros(50, dtype=F64)
        expected[j] = c
        assert torch.allclose(prof.profiles["delta_P_diag"], expected, atol=1e-10)
        assert torch.allclose(prof.profiles["E_delta"], expected, atol=1e-10)
        assert prof.summary["effective_rank"] == pytest.approx(1.0)
        assert prof.profiles["delta_sv"][0] == pytest.approx(c)
        assert prof.summary["energy_topk_in"] == pytest.approx(1.0)
        assert prof.summary["energy_topk_both"] == pytest.approx(1.0)
        assert prof.summary["intruders"] == 0  # same singular vectors, only σ_j moved
        assert prof.summary["overlap_left"] == pytest.approx(1.0)


def test_rank_one_spike_in_a_new_direction_is_an_intruder():
    """A strong rank-1 update along a direction far from every pretrained left singular vector is 1 intruder."""
    m, n = 64, 96
    W = decaying(m, n, seed=6)
    svd = BaseSVD.of(W)
    # Equal weight on all 64 pretrained left singular vectors: |cos| with each is 1/8 < 0.5.
    x = svd.U @ torch.ones(m, dtype=F64) / math.sqrt(m)
    y = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=F64)
    y /= y.norm()
    B, A = 30 * x[:, None], y[None, :]
    ref = reference(W, W + B @ A, k=8)
    prof = matrix_profile(W, delta_factors=(B, A), svd=svd, top_k=8)
    assert prof.summary["intruders"] == ref["intruders"] == 1
    assert prof.profiles["intruder_max_cos"][0] < 0.2
    assert prof.summary["effective_rank"] == pytest.approx(1.0)
    assert prof.profiles["delta_sv"][0] == pytest.approx(30.0)
    # E_Δ(i) = 30 |yᵀ v_i| for a rank-one ΔW = 30 x yᵀ with ‖x‖ = 1.
    assert torch.allclose(prof.profiles["E_delta"], 30 * (svd.V.T @ y).abs(), atol=1e-10)


def test_orthogonal_rotation_of_the_input_space():
    """W_ft = W R (R orthogonal): σ and left singular vectors unchanged, right ones rotated (v_i → Rᵀ v_i)."""
    m, n = 40, 60
    W = decaying(m, n, seed=8)
    R = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(9), dtype=F64)).Q
    W_ft = W @ R
    ref = reference(W, W_ft, k=8)
    prof = matrix_profile(W, W_ft, top_k=8, is_oft=True)
    assert_matches(prof, ref, sva=True)
    svd = BaseSVD.of(W)
    assert torch.allclose(prof.profiles["S_ft_topk"], svd.S[:10], atol=1e-10)
    assert prof.summary["overlap_left"] == pytest.approx(1.0)
    assert prof.summary["intruders"] == 0
    assert torch.allclose(prof.profiles["sva_cosines"], (svd.V * (R.T @ svd.V)).sum(0).abs(), atol=1e-8)
    # P_diag(i) = u_iᵀ W R v_i = σ_i v_iᵀ R v_i
    assert torch.allclose(prof.profiles["P_diag_ft"], svd.S * (svd.V * (R @ svd.V)).sum(0), atol=1e-10)
    # Identity rotation: SVA is 1 everywhere, every profile 0.
    ident = matrix_profile(W, W.clone(), top_k=8, is_oft=True)
    assert torch.allclose(ident.profiles["sva_cosines"], torch.ones(m, dtype=F64), atol=1e-8)


def test_fluctuation_reflect_padding():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    dev, score = fluctuation(x, 5)
    # reflect-padded [3,2,1,2,3,4,5,4,3] → moving averages [2.2, 2.4, 3, 3.6, 3.8]
    assert torch.allclose(dev, torch.tensor([1.2, 0.4, 0.0, 0.4, 1.2], dtype=F64))
    assert score == pytest.approx(0.64)
    with pytest.raises(ValueError):
        fluctuation(torch.ones(2, dtype=F64), 5)
