"""One method → colour mapping, used by every plot (Pareto, spectral, method grid, monitor overlay).

A method keeps its colour in every figure whichever other methods are in it, so "OFT is orange" holds across the
report. Families share a hue range (the LoRA variants blues and greens, the orthogonal ones oranges), so a glance
also groups them. Methods outside the registry get a colour from their name (stable across runs), never grey:
grey and black are reserved for references (the base model, the pretrained spectrum, the Pareto front).
"""

from __future__ import annotations

import zlib

# matplotlib's tab20 pairs, by hand so that the colour of a method never depends on what else is plotted
METHOD_COLORS: dict[str, str] = {
    "lora": "#1f77b4", "rslora": "#aec7e8", "dora": "#17becf", "pissa": "#2ca02c", "milora": "#98df8a",
    "adalora": "#9edae5", "loraplus": "#393b79", "keeplora": "#637939",
    "oft": "#ff7f0e", "boft": "#ffbb78",
    "vera": "#9467bd", "ia3": "#e377c2", "miss": "#8c564b", "full": "#d62728",
}
_SPARE = ("#bcbd22", "#dbdb8d", "#c49c94", "#f7b6d2", "#c5b0d5", "#ff9896", "#8c6d31", "#843c39")
TRAIN_MARKERS: dict[str, str] = {"sft": "o", "grpo": "^"}
REFERENCE = "black"  # base model, pretrained spectrum, Pareto front


def method_color(method: str | None) -> str:
    """The colour of ``method`` in every arena plot."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _SPARE[zlib.crc32(str(method).encode()) % len(_SPARE)]


def method_label(method: str | None, label: str | None = None) -> str:
    """``oft b32`` for a method and its configuration label (``b32``); the label alone never names a series."""
    method = method or ""
    if not label or label == method:
        return method or "?"
    if not method or label.startswith(method):  # already names the method ("oft b32")
        return label
    return f"{method} {label}"


def method_handles(methods, marker: str = "o"):
    """Legend handles, one per method (sorted, no duplicates), in the method's colour."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=method_color(m), marker=marker, linestyle="", markersize=7,
                   markeredgecolor="black", markeredgewidth=0.4, label=m) for m in sorted(set(methods))]
