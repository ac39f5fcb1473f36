"""Whole-model spectral analysis: base + finetuned model → per-matrix profiles, summary, norm comparison.

Output folder layout (format ``peft_arena.spectral/1``):

* ``profiles/<weight name with . → _>.safetensors``: one file per analysed matrix, float32 1-D tensors
  ``S_pre`` (σ_i of W, p), ``P_diag_ft`` (u_iᵀ W_ft v_i, p), ``delta_P_diag`` (|ΔP_diag(i)|, p),
  ``E_delta`` (‖ΔW v_i‖, p), ``delta_sv`` (singular values of ΔW, descending; r of them on the factor path, p on
  the dense path), ``dev_retention`` / ``dev_adaptation`` (|x − MA_w(x)| per index), ``S_ft_topk`` (top σ of
  W_ft), ``cos_angles_left`` / ``cos_angles_right`` (cosines of the principal angles between top-k subspaces),
  ``intruder_max_cos`` (max |cos| of each of W_ft's top intruder_k left singular vectors with W's), and for OFT
  ``sva_cosines`` (|cos(v_i, v_i^ft)|, p). Definitions: :mod:`peft_arena.spectral.profiles`.
* ``profiles/index.json``: {"format", "matrices": [{"name", "file", "layer", "module", "shape", "path",
  "summary", "meta"}]}.
* ``spectral_summary.json``: the paper's fields (base_model, finetuned_model, peft_type, smoothness_window,
  num_layers_analyzed, per_layer{effective_rank, smoothness_retention, smoothness_adaptation,
  delta_P_diag_mean/max, E_delta_mean/max, delta_sv_top5[, sva_mean, sva_min]}) plus ours in the same
  per_layer entries (overlap_*, max_angle_*, energy_topk_*, intruders, …), ``metrics`` (the
  ``spectral/<module>/<metric>`` aggregates), ``norms`` (compare_model_norms summary) and ``timings``.
* ``norm_comparison.json`` / ``norm_comparison.csv``: compare_model_norms rows (CSV sorted by delta_l2).

Base SVDs are cached per matrix under ``<cache>/svd/`` keyed by the SHA-256 of the weight's bytes, its shape
and dtype, and the compute dtype, so any model sharing a matrix reuses it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from peft_arena.spectral.deltas import (
    MatrixDelta,
    WeightFolder,
    adapted_modules,
    factor_deltas,
    finish_factors,
    has_factor_form,
    merged_state,
    read_artifact,
)
from peft_arena.spectral.profiles import INTRUDER_EPS, INTRUDER_K, BaseSVD, matrix_profile

FORMAT = "peft_arena.spectral/1"
CACHE_VERSION = "svd-v1"
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")
# Summary fields that become run metrics; effective_rank is logged as eff_rank (the project's metric name).
METRIC_FIELDS = {
    "effective_rank": "eff_rank", "smoothness_retention": "smoothness_retention",
    "smoothness_adaptation": "smoothness_adaptation", "delta_P_diag_mean": "delta_P_diag_mean",
    "E_delta_mean": "E_delta_mean", "rel_delta_fro": "rel_delta_fro", "overlap_left": "overlap_left",
    "overlap_right": "overlap_right", "energy_topk_in": "energy_topk_in", "energy_topk_out": "energy_topk_out",
    "energy_topk_both": "energy_topk_both", "intruders": "intruders", "sva_mean": "sva_mean",
}


class Timer:
    """Seconds per stage; synchronises CUDA so GPU work is charged to the stage that queued it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - t0


def weight_key(t: torch.Tensor) -> str:
    """Content hash of a tensor (bytes + shape + dtype)."""
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


class SVDCache:
    """Thin SVDs of pretrained matrices on disk, one safetensors file per matrix, keyed by content."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str, dtype: torch.dtype) -> Path:
        return self.folder / f"{key}-{str(dtype).removeprefix('torch.')}-{CACHE_VERSION}.safetensors"

    def get(self, key: str, dtype: torch.dtype, device: torch.device) -> BaseSVD | None:
        f = self._file(key, dtype)
        if not f.exists():
            return None
        t = load_file(str(f), device=str(device))
        return BaseSVD(t["U"], t["S"], t["V"])

    def put(self, key: str, dtype: torch.dtype, svd: BaseSVD) -> None:
        f = self._file(key, dtype)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        save_file({"U": svd.U.contiguous().cpu(), "S": svd.S.contiguous().cpu(), "V": svd.V.contiguous().cpu()},
                  str(tmp))
        tmp.replace(f)  # atomic: readers never see half a file


def base_svd(W: torch.Tensor) -> tuple[BaseSVD, str]:
    """Thin SVD of a pretrained weight; on CUDA the fast ``gesvda`` driver, kept only if certified.

    ``gesvda`` is about 9× faster than cuSOLVER's default on 3584-wide matrices (H200) but documented as less
    accurate for ill-conditioned inputs, so its result is accepted only when the reconstruction residual
    max_i ‖W v_i − σ_i u_i‖ / σ_1 and the orthogonality errors of U and V are all below 50·eps·√p; otherwise
    the default driver recomputes it. Returns the SVD and which route produced it.
    """
    if W.device.type == "cuda":
        tall = W.shape[0] >= W.shape[1]
        A = W if tall else W.mT  # gesvda wants tall matrices
        U, S, Vh = torch.linalg.svd(A, full_matrices=False, driver="gesvda")
        svd = BaseSVD(U, S, Vh.mT) if tall else BaseSVD(Vh.mT, S, U)
        p = S.numel()
        tol = 50 * torch.finfo(W.dtype).eps * p ** 0.5
        eye = torch.eye(p, device=W.device, dtype=W.dtype)
        residual = (W @ svd.V - svd.U * S).norm(dim=0).max() / S[0].clamp(min=torch.finfo(W.dtype).tiny)
        ortho = max((svd.U.mT @ svd.U - eye).abs().max(), (svd.V.mT @ svd.V - eye).abs().max())
        if torch.isfinite(S).all() and residual <= tol and ortho <= tol:
            return svd, "gesvda"
        return BaseSVD.of(W), "default_after_gesvda_check"
    return BaseSVD.of(W), "default"


def default_cache_dir() -> Path:
    from peft_arena.models import cache_dir

    return cache_dir() / "svd"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(device)


def _local_base_folder(base_source: str) -> Path:
    path = Path(base_source).expanduser()
    if path.is_dir():
        return path
    from peft_arena.models import resolve_base

    resolved = Path(resolve_base(base_source).source)
    if not resolved.is_dir():
        raise FileNotFoundError(
            f"base {base_source!r} resolves to {resolved}, not a local folder: download its weights first"
        )
    return resolved


def select_matrices(names, layers: list[int] | None, modules: list[str] | None) -> list[str]:
    """2-D layer weights (``...layers.N.<module>.weight``) filtered by layer index and module substring."""
    out = []
    for name in names:
        match = LAYER_RE.search(name)
        if not match:
            continue
        if layers is not None and int(match.group(1)) not in layers:
            continue
        if modules and not any(mod in match.group(2) for mod in modules):
            continue
        out.append(name)
    return sorted(out, key=lambda s: (int(LAYER_RE.search(s).group(1)), s))


def module_type(name: str) -> str:
    """``model.layers.18.mlp.down_proj.weight`` → ``mlp.down_proj``."""
    return LAYER_RE.search(name).group(2)


def _norm_row(name: str, W: torch.Tensor, W_ft: torch.Tensor) -> dict:
    W64, F64 = W.to(torch.float64), W_ft.to(torch.float64)
    D = F64 - W64
    n = W.numel()
    row = {
        "name": name, "shape": list(W.shape), "numel": n,
        "base_l1": float(W64.abs().sum()), "base_l2": float(W64.norm()),
        "ft_l1": float(F64.abs().sum()), "ft_l2": float(F64.norm()),
        "delta_l1": float(D.abs().sum()), "delta_l2": float(D.norm()),
    }
    row["rel_l1"] = row["delta_l1"] / row["base_l1"] if row["base_l1"] else 0.0
    row["rel_l2"] = row["delta_l2"] / row["base_l2"] if row["base_l2"] else 0.0
    row["mean_abs_delta"] = row["delta_l1"] / n
    row["rmse"] = (row["delta_l2"] ** 2 / n) ** 0.5
    return row


def norm_summary(rows: list[dict], top_k: int = 20) -> dict:
    """Global aggregates of compare_model_norms over all shared float parameters."""
    n = sum(r["numel"] for r in rows)
    base_l1 = sum(r["base_l1"] for r in rows)
    base_l2 = sum(r["base_l2"] ** 2 for r in rows) ** 0.5
    delta_l1 = sum(r["delta_l1"] for r in rows)
    delta_l2 = sum(r["delta_l2"] ** 2 for r in rows) ** 0.5
    ranked = sorted(rows, key=lambda r: -r["delta_l2"])
    return {
        "num_tensors": len(rows), "num_params": n,
        "num_changed_tensors": sum(1 for r in rows if r["delta_l2"] > 0),
        "base_l1": base_l1, "base_l2": base_l2,
        "ft_l1": sum(r["ft_l1"] for r in rows), "ft_l2": sum(r["ft_l2"] ** 2 for r in rows) ** 0.5,
        "delta_l1": delta_l1, "delta_l2": delta_l2,
        "rel_l1": delta_l1 / base_l1 if base_l1 else 0.0, "rel_l2": delta_l2 / base_l2 if base_l2 else 0.0,
        "mean_abs_delta": delta_l1 / n if n else 0.0, "rmse": (delta_l2 ** 2 / n) ** 0.5 if n else 0.0,
        "top_by_delta_l2": [{"name": r["name"], "delta_l2": r["delta_l2"], "rel_l2": r["rel_l2"]}
                            for r in ranked[:top_k]],
    }


def _write_norms(out: Path, rows: list[dict], summary: dict) -> None:
    (out / "norm_comparison.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    fields = ["name", "shape", "numel", "base_l1", "base_l2", "ft_l1", "ft_l2", "delta_l1", "delta_l2",
              "rel_l1", "rel_l2", "mean_abs_delta", "rmse"]
    with open(out / "norm_comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in sorted(rows, key=lambda r: -r["delta_l2"]):
            w.writerow({**r, "shape": "x".join(map(str, r["shape"]))})


# the per-module-type means a person compares across runs (every metric stays in the per-matrix table and in
# spectral/all/<metric>): 7 module types x 6 + 13 = 55 metrics for a Llama/Qwen-style model
HEADLINE_FIELDS = ("effective_rank", "smoothness_retention", "smoothness_adaptation", "rel_delta_fro", "intruders",
                   "sva_mean")


def aggregate_metrics(per_matrix: dict[str, dict]) -> dict[str, float]:
    """``spectral/all/<metric>``: means over every matrix (all metrics); ``spectral/<module type>/<metric>``: means
    over layers of the :data:`HEADLINE_FIELDS`."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, summ in per_matrix.items():
        groups[module_type(name)].append(summ)
        groups["all"].append(summ)
    metrics = {}
    for group, items in groups.items():
        for field, metric in METRIC_FIELDS.items():
            if group != "all" and field not in HEADLINE_FIELDS:
                continue
            vals = [float(s[field]) for s in items if field in s]
            if vals:
                metrics[f"spectral/{group}/{metric}"] = sum(vals) / len(vals)
    return metrics


def per_matrix_rows(per_matrix: dict[str, dict]) -> list[dict]:
    """One row per analysed matrix (layer, module, every metric): the per-matrix table artifact."""
    rows = []
    for name, summ in per_matrix.items():
        match = LAYER_RE.search(name)
        row = {"matrix": name, "layer": int(match.group(1)), "module": match.group(2)}
        row.update({metric: float(summ[field]) for field, metric in METRIC_FIELDS.items() if field in summ})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["layer"], r["module"]))


def analyze(
    base_source: str,
    finetuned_path: str,
    *,
    layers: list[int] | None = None,
    modules: list[str] | None = None,
    window: int = 5,
    top_k: int = 32,
    device: str = "auto",
    cache_dir: str | None = None,
    out_dir: str,
    progress: bool = True,
    precision: str = "auto",
    intruder_k: int = INTRUDER_K,
    intruder_eps: float = INTRUDER_EPS,
) -> dict:
    """Analyse every selected layer weight of ``finetuned_path`` against ``base_source``; see the module doc.

    ``precision`` is the compute dtype: "auto" = float32 (as the paper), or "float64".
    Returns the summary dict (also written to ``spectral_summary.json``) with ``metrics`` (aggregates),
    ``per_matrix_rows`` (the per-matrix table), ``per_layer`` and ``timings`` (seconds per stage).
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    # float32 like the paper; float64 is ~10× slower on CPU (the top-k solver iterates to a tighter tolerance).
    dtype = {"auto": torch.float32, "float32": torch.float32, "float64": torch.float64}[precision]
    timer = Timer(dev)
    out = Path(out_dir)
    (out / "profiles").mkdir(parents=True, exist_ok=True)
    cache = SVDCache(cache_dir or default_cache_dir())

    with timer("read_update"):
        info = read_artifact(finetuned_path)
        base_dir = _local_base_folder(base_source)
        base = WeightFolder(base_dir)
        names = [nm for nm in select_matrices(base.keys(), layers, modules) if len(base.shape(nm)) == 2]
        factors: dict[str, MatrixDelta] = {}
        ft_state: dict[str, torch.Tensor] | None = None
        ft_folder: WeightFolder | None = None
        if info.kind == "adapter":
            touched = set(adapted_modules(info))
            names = [nm for nm in names if nm in touched]
            if has_factor_form(info):
                factors = {d.name: d for d in factor_deltas(info, dtype=dtype)}
            else:
                ft_state = merged_state(str(base_dir), info, device=dev)
        else:
            ft_folder = WeightFolder(info.path)
            names = [nm for nm in names if nm in ft_folder]
    if not names:
        raise ValueError(f"no layer weights selected (layers={layers}, modules={modules}) in {finetuned_path}")

    def read_base(name: str):
        # Runs in a worker thread: disk read, content hash and cached-SVD read overlap with GPU work.
        t0 = time.perf_counter()
        W = base.get(name)
        t1 = time.perf_counter()
        key = weight_key(W)
        t2 = time.perf_counter()
        cached = cache.get(key, dtype, torch.device("cpu"))
        return W, key, cached, {"read_base": t1 - t0, "hash": t2 - t1, "svd_cache_read": time.perf_counter() - t2}

    per_matrix: dict[str, dict] = {}
    index = []
    norm_rows = []
    path_counts: dict[str, int] = defaultdict(int)
    svd_hits = 0
    # Reading and hashing the next matrices overlaps with compute on the current one.
    base_svd_stats: dict[str, int] = defaultdict(int)
    writes = []
    with ThreadPoolExecutor(max_workers=8) as pool, ThreadPoolExecutor(max_workers=1) as writer:
        lookahead = 4
        futures = {i: pool.submit(read_base, names[i]) for i in range(min(lookahead, len(names)))}
        for i, name in enumerate(tqdm(names, desc="spectral", unit="matrix", disable=not progress)):
            with timer("wait_io"):
                W_raw, key, svd, io_seconds = futures.pop(i).result()
            if i + lookahead < len(names):
                futures[i + lookahead] = pool.submit(read_base, names[i + lookahead])
            for stage, sec in io_seconds.items():  # worker-thread seconds (overlapped, not wall time)
                timer.seconds[stage + "_thread"] += sec
            with timer("to_device"):
                W = W_raw.to(dev, non_blocking=True).to(dtype)  # move the stored dtype, cast on the device
                if svd is not None:
                    svd = BaseSVD(svd.U.to(dev, non_blocking=True), svd.S.to(dev), svd.V.to(dev, non_blocking=True))
            if svd is None:
                with timer("base_svd"):
                    svd, how = base_svd(W)
                    base_svd_stats[how] += 1
                with timer("svd_to_host"):  # the disk write itself runs in a background thread
                    host = BaseSVD(svd.U.cpu(), svd.S.cpu(), svd.V.cpu())
                writes.append(writer.submit(cache.put, key, dtype, host))
            else:
                svd_hits += 1
            with timer("read_update"):
                if factors:
                    delta = finish_factors(factors[name], tuple(W.shape))
                    B, A = delta.B.to(dev), delta.A.to(dev)
                    W_ft = None
                else:
                    src = ft_state[name] if ft_state is not None else ft_folder.get(name)
                    W_ft = src.to(device=dev, dtype=dtype)
            with timer("profiles"):
                if W_ft is None:
                    prof = matrix_profile(W, delta_factors=(B, A), svd=svd, top_k=top_k, window=window,
                                          is_oft=info.is_oft, intruder_k=intruder_k, intruder_eps=intruder_eps)
                else:
                    prof = matrix_profile(W, W_ft, svd=svd, top_k=top_k, window=window, is_oft=info.is_oft,
                                          intruder_k=intruder_k, intruder_eps=intruder_eps)
            with timer("norms"):
                # compare_model_norms needs L1 of ΔW, which has no factor shortcut: one GEMM, then reductions.
                norm_rows.append(_norm_row(name, W, W_ft if W_ft is not None else W + B @ A))
            with timer("write"):
                fname = name.replace(".", "_") + ".safetensors"
                save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in prof.profiles.items()},
                          str(out / "profiles" / fname))
            path_counts[prof.path] += 1
            per_matrix[name] = prof.summary
            index.append({"name": name, "file": fname, "layer": int(LAYER_RE.search(name).group(1)),
                          "module": module_type(name), "shape": list(W.shape), "path": prof.path,
                          "summary": prof.summary, "meta": prof.meta})

    with timer("svd_cache_write_wait"):
        for w in writes:
            w.result()
    with timer("norms"):
        analysed = set(names)
        other_names = [nm for nm in base.keys() if nm not in analysed]
        for name in other_names:
            W = base.get(name)
            if not W.is_floating_point():
                continue
            if ft_folder is not None:
                if name not in ft_folder:
                    continue
                W_ft = ft_folder.get(name)
            elif ft_state is not None:
                if name not in ft_state:
                    continue
                W_ft = ft_state[name]
            else:
                W_ft = W  # an adapter leaves every other parameter as it was
            if W_ft.shape != W.shape:
                continue
            norm_rows.append(_norm_row(name, W, W_ft))
        norms = norm_summary(norm_rows)
        _write_norms(out, norm_rows, norms)

    metrics = aggregate_metrics(per_matrix)
    matrix_rows = per_matrix_rows(per_matrix)
    timings = dict(timer.seconds)
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "format": FORMAT,
        "base_model": str(base_source),
        "finetuned_model": str(finetuned_path),
        "method": info.method,
        "label": info.label,
        "peft_type": info.peft_type or "FULL",
        "smoothness_window": window,
        "top_k": top_k,
        "intruder_k": intruder_k,
        "intruder_eps": intruder_eps,
        "precision": str(dtype).removeprefix("torch."),
        "device": str(dev),
        "num_layers_analyzed": len({LAYER_RE.search(nm).group(1) for nm in names}),
        "num_matrices": len(names),
        "paths": dict(path_counts),
        "svd_cache_hits": svd_hits,
        "base_svd": dict(base_svd_stats),
        "per_layer": per_matrix,
        "metrics": metrics,
        "norms": norms,
        "timings": timings,
    }
    (out / "profiles" / "index.json").write_text(json.dumps({"format": FORMAT, "matrices": index}, indent=1))
    (out / "spectral_summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "per_matrix_rows": matrix_rows}
