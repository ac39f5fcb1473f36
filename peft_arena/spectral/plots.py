"""Figures from spectral output folders (matplotlib, Agg, no LaTeX). Every function returns a Figure.

Normalisation is stated on each axis. Unlike the reference plots (which label an un-normalised |ΔP_diag| as
"Normalized"), every curve here is drawn as what its label says:

* retention panel: |ΔP_diag(i)| / σ_1 (divided by W's largest singular value), with σ_i / σ_1 of W as reference
* adaptation panel: E_Δ(i) / Σ_j E_Δ(j) (a distribution over i), with σ_i / Σ_j σ_j of W as reference
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from peft_arena.plotting.style import method_color, method_label  # noqa: E402

plt.rcParams["text.usetex"] = False


def _index(out_dir: str | Path) -> list[dict]:
    f = Path(out_dir) / "profiles" / "index.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: run peft_arena.spectral.analysis.analyze first")
    return json.loads(f.read_text())["matrices"]


def middle_layer_matrices(out_dirs: list[str | Path], modules: tuple[str, ...] = ("mlp.down_proj",),
                          fallback: int = 1) -> list[str]:
    """Matrices every folder analysed in the middle analysed layer, of the given module types (the paper plots
    layer 18 of 28, mlp.down_proj); else the first ``fallback`` common matrices; [] when none is common."""
    common: set[str] | None = None
    layer_of: dict[str, int | None] = {}
    for out_dir in out_dirs:
        entries = _index(out_dir)
        layer_of.update({e["name"]: e.get("layer") for e in entries})
        names = {e["name"] for e in entries}
        common = names if common is None else common & names
    if not common:
        return []
    layers = sorted({layer_of[n] for n in common if layer_of[n] is not None})
    if layers:
        middle = layers[len(layers) // 2]
        chosen = sorted(n for n in common if layer_of[n] == middle and any(m in n for m in modules))
        if chosen:
            return chosen
    return sorted(common)[:fallback]


def _profiles(out_dir: str | Path, name: str) -> dict[str, np.ndarray]:
    for entry in _index(out_dir):
        if entry["name"] == name or entry["name"] == name + ".weight":
            return load_file(str(Path(out_dir) / "profiles" / entry["file"]))
    raise KeyError(f"{name} was not analysed in {out_dir}")


def _summary(out_dir: str | Path) -> dict:
    f = Path(out_dir) / "spectral_summary.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _label(out_dir: str | Path) -> str:
    """``oft b32``: the method and its configuration label (a label alone, ``b32``, names nothing)."""
    summary = _summary(out_dir)
    if not summary.get("method") and not summary.get("label"):
        return Path(out_dir).name
    return method_label(summary.get("method"), summary.get("label"))


def _color(out_dir: str | Path) -> str:
    return method_color(_summary(out_dir).get("method"))


def _module_ticks(ax, modules: list[str], positions) -> None:
    """Module types as horizontal ticks: the last name part (``down_proj``), the parent in the axis label."""
    short = [m.rsplit(".", 1)[-1] for m in modules]
    if len(set(short)) < len(short):  # two parents with the same leaf name: keep the full names, two lines
        short = [m.replace(".", "\n") for m in modules]
    ax.set_xticks(list(positions), short, rotation=0, fontsize=8)
    parents = sorted({m.rsplit(".", 1)[0] for m in modules if "." in m})
    ax.set_xlabel("module type" + (f" (in {', '.join(parents)})" if parents else ""), fontsize=8)


def _curves(ax_ret, ax_ad, prof: dict[str, np.ndarray], label: str | None, color=None, reference: bool = True):
    S = prof["S_pre"].astype(np.float64)
    idx = np.arange(1, S.size + 1)
    ret = prof["delta_P_diag"] / S[0]
    e = prof["E_delta"].astype(np.float64)
    ad = e / e.sum() if e.sum() > 0 else e
    ax_ret.plot(idx, ret, lw=1, color=color, label=label)
    ax_ad.plot(idx, ad, lw=1, color=color, label=label)
    if reference:
        ax_ret.plot(idx, S / S[0], "k--", lw=1, label="pretrained σ_i / σ_1")
        ax_ad.plot(idx, S / S.sum(), "k--", lw=1, label="pretrained σ_i / Σσ")


def _style(ax_ret, ax_ad, log: bool):
    ax_ret.set_xlabel("singular index i of W (descending σ)")
    ax_ad.set_xlabel("singular index i of W (descending σ)")
    ax_ret.set_ylabel("retention |u_iᵀ W_ft v_i − σ_i| / σ_1")
    ax_ad.set_ylabel("adaptation ‖ΔW v_i‖ / Σ_j ‖ΔW v_j‖")
    if log:
        ax_ret.set_yscale("log")
        ax_ad.set_yscale("log")


def plot_layer_curves(out_dir: str | Path, layer_names: list[str], log: bool = True):
    """Retention and adaptation profiles of the chosen matrices against the pretrained spectrum (one row each)."""
    fig, axes = plt.subplots(len(layer_names), 2, figsize=(11, 3.6 * len(layer_names)), squeeze=False)
    for row, name in enumerate(layer_names):
        prof = _profiles(out_dir, name)
        _curves(axes[row, 0], axes[row, 1], prof, _label(out_dir), color=_color(out_dir))
        _style(axes[row, 0], axes[row, 1], log)
        axes[row, 0].set_title(f"retention profile: {name}", fontsize=9)
        axes[row, 1].set_title(f"adaptation profile: {name}", fontsize=9)
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_effective_rank(out_dir: str | Path):
    """Stable rank ‖ΔW‖_F² / ‖ΔW‖₂² against layer index, one line per module type."""
    entries = _index(out_dir)
    by_module: dict[str, list[tuple[int, float]]] = {}
    for e in entries:
        by_module.setdefault(e["module"], []).append((e["layer"], e["summary"]["effective_rank"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for module, pts in sorted(by_module.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=module)
    ax.set_xlabel("layer index")
    ax.set_ylabel("effective rank of ΔW = ‖ΔW‖_F² / ‖ΔW‖₂² (unnormalised)")
    ax.set_title(f"effective rank per layer: {_label(out_dir)}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_distributions(out_dir: str | Path):
    """Violins over all analysed matrices: |ΔP_diag|/σ_1 and E_Δ/ΣE_Δ pooled per module type, plus intruder counts."""
    entries = _index(out_dir)
    modules = sorted({e["module"] for e in entries})
    ret, ad, intr = {m: [] for m in modules}, {m: [] for m in modules}, {m: [] for m in modules}
    for e in entries:
        prof = load_file(str(Path(out_dir) / "profiles" / e["file"]))
        S = prof["S_pre"].astype(np.float64)
        ret[e["module"]].append(prof["delta_P_diag"] / S[0])
        s = prof["E_delta"].sum()
        ad[e["module"]].append(prof["E_delta"] / s if s > 0 else prof["E_delta"])
        intr[e["module"]].append(e["summary"]["intruders"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, data, ylabel in (
        (axes[0], ret, "log10 of |u_iᵀ W_ft v_i − σ_i| / σ_1"),
        (axes[1], ad, "log10 of ‖ΔW v_i‖ / Σ_j ‖ΔW v_j‖"),
    ):
        values = [np.log10(np.concatenate(data[m]) + 1e-30) for m in modules]
        parts = ax.violinplot(values, showmedians=True)
        for body in parts["bodies"]:
            body.set_facecolor(_color(out_dir))
        for key in ("cmedians", "cmins", "cmaxes", "cbars"):
            if key in parts:
                parts[key].set_color("black")
                parts[key].set_linewidth(0.8)
        _module_ticks(ax, modules, range(1, len(modules) + 1))
        ax.set_ylabel(ylabel)
    axes[0].set_title("retention, all indices and layers", fontsize=9)
    axes[1].set_title("adaptation, all indices and layers", fontsize=9)
    means = [float(np.mean(intr[m])) for m in modules]
    axes[2].bar(range(len(modules)), means, color=_color(out_dir))
    _module_ticks(axes[2], modules, range(len(modules)))
    axes[2].set_ylim(0, max(1.0, 1.15 * max(means, default=0.0)))
    if not any(means):  # an empty-looking panel would read as a plotting failure
        axes[2].text(0.5, 0.5, "no intruder dimensions in any matrix", transform=axes[2].transAxes,
                     ha="center", va="center", fontsize=9)
    axes[2].set_ylabel("intruder dimensions per matrix (mean over layers, count)")
    axes[2].set_title("intruder dimensions", fontsize=9)
    fig.suptitle(_label(out_dir), fontsize=10)
    fig.tight_layout()
    return fig


def plot_method_grid(runs: list[tuple[str, str]], layer_name: str, log: bool = True):
    """Retention and adaptation panels of one matrix for several runs side by side (runs = (label, out_dir))."""
    if not runs:
        raise ValueError("plot_method_grid needs at least one (label, profiles folder) pair")
    cols = min(len(runs), 5)
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.6 * cols, 5.6 * rows), squeeze=False)
    for i, (label, out_dir) in enumerate(runs):
        r, c = divmod(i, cols)
        ax_ret, ax_ad = axes[2 * r, c], axes[2 * r + 1, c]
        _curves(ax_ret, ax_ad, _profiles(out_dir, layer_name), label, color=_color(out_dir))
        _style(ax_ret, ax_ad, log)
        ax_ret.set_title(label, fontsize=9)
        for ax in (ax_ret, ax_ad):
            ax.xaxis.label.set_size(7)
            ax.yaxis.label.set_size(7)
    for j in range(len(runs), rows * cols):
        r, c = divmod(j, cols)
        axes[2 * r, c].axis("off")
        axes[2 * r + 1, c].axis("off")
    fig.suptitle(f"{layer_name}: retention (upper) and adaptation (lower)", fontsize=10)
    fig.tight_layout()
    return fig
