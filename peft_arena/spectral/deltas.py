"""Read base and finetuned weights straight from disk, and turn a trained artifact into per-matrix updates.

A finetuned model is one of:

* a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), optionally with the
  project's ``arena_method.json`` = {"method", "options", "base_model", "base_source", "label"};
* a full Hugging Face model folder (method ``full``, or any merged model).

Updates come back as :class:`MatrixDelta`, keyed by the base weight's name (``model.layers.3.mlp.down_proj.weight``):

* ``factors`` (exact, ΔW = B·A with every scaling folded into B):
  LoRA and everything saved as LoRA (rsLoRA, PiSSA/MiLoRA after conversion, LoRA+, KeepLoRA; ``rank_pattern`` /
  ``alpha_pattern`` honoured), AdaLoRA (B·(A⊙E)·α/(r+1e-5), ``ranknum`` = r as PEFT sets it), VeRA
  ((λ_b⊙B_s)(λ_d⊙A_s) from the saved shared projections), MiSS ``standard``/``mini`` (ΔW[:, j] = D[j mod r]ᵀ,
  i.e. Dᵀ times a 0/1 tiling matrix).
* ``dense`` (W_ft as a matrix): DoRA (the magnitude vector rescales columns, so ΔW is not low-rank), OFT, IA3,
  MiSS ``bat`` and every other PEFT type, merged by PEFT itself on a loaded base model; full/merged folders are
  read tensor by tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

PEFT_PREFIX = "base_model.model."
FACTOR_TYPES = {"LORA", "ADALORA", "VERA", "MISS"}


@dataclass
class MatrixDelta:
    name: str  # base weight name, e.g. "model.layers.0.self_attn.q_proj.weight"
    kind: str  # "factors" | "dense"
    B: torch.Tensor | None = None  # m×r (scaling folded in)
    A: torch.Tensor | None = None  # r×n
    W_ft: torch.Tensor | None = None  # m×n


@dataclass
class ArtifactInfo:
    path: Path
    kind: str  # "adapter" | "model"
    peft_type: str | None  # "LORA", "OFT", ... (None for full models)
    method: str | None  # project method name from arena_method.json (e.g. "keeplora"), else derived
    label: str
    base_model: str | None
    base_source: str | None
    options: dict
    adapter_config: dict | None

    @property
    def is_oft(self) -> bool:
        return "OFT" in (self.peft_type or "") or (self.method or "").lower().startswith(("oft", "boft"))


class WeightFolder:
    """Lazy tensor access to a Hugging Face model folder (single or sharded safetensors)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            files = [f for f in files if f.name != "adapter_model.safetensors"]
            if not files:
                raise FileNotFoundError(f"{self.folder} has no *.safetensors weights (only safetensors folders are read)")
            self.files = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.files[k] = f
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return tuple(self._handles[f].get_slice(name).get_shape())


def read_artifact(path: str | Path) -> ArtifactInfo:
    """What a trained folder is: adapter or full model, its PEFT type and the project's method record."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"finetuned model folder {path} does not exist")
    arena = json.loads((path / "arena_method.json").read_text()) if (path / "arena_method.json").exists() else {}
    if (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text())
        peft_type = str(cfg.get("peft_type", "")).upper()
        method = arena.get("method") or peft_type.lower()
        kind = "adapter"
    elif (path / "config.json").exists():
        cfg, peft_type, kind = None, None, "model"
        method = arena.get("method") or "full"
    else:
        raise FileNotFoundError(f"{path} holds neither adapter_config.json (PEFT adapter) nor config.json (HF model)")
    return ArtifactInfo(
        path=path, kind=kind, peft_type=peft_type, method=method,
        label=arena.get("label") or method or path.name, base_model=arena.get("base_model"),
        base_source=arena.get("base_source"), options=arena.get("options") or {}, adapter_config=cfg,
    )


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (same matching rule as PEFT)."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _adapter_tensors(info: ArtifactInfo) -> dict[str, torch.Tensor]:
    f = info.path / "adapter_model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing (only safetensors adapters are read)")
    from safetensors.torch import load_file

    return load_file(str(f))


def _group_by_module(sd: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path without PEFT prefix: {suffix: tensor}} for keys ending in one of ``suffixes``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        for suf in suffixes:
            if key.endswith("." + suf):
                module = key[: -len(suf) - 1]
                module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
                out.setdefault(module, {})[suf] = t
    return out


def _check_plain(cfg: dict, method: str) -> None:
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{method}: fan_in_fan_out adapters (Conv1D bases like GPT-2) are not supported here")


def factor_deltas(info: ArtifactInfo, dtype: torch.dtype = torch.float32) -> Iterator[MatrixDelta]:
    """Exact low-rank factors per matrix for LoRA-family, AdaLoRA, VeRA and MiSS (standard/mini) adapters."""
    cfg, pt = info.adapter_config, info.peft_type
    _check_plain(cfg, pt)
    sd = _adapter_tensors(info)
    if pt == "LORA":
        if cfg.get("use_dora"):
            raise ValueError("DoRA is not a low-rank update; use the dense path")
        if cfg.get("lora_bias"):
            raise ValueError("LoRA with lora_bias=True changes biases too; the factor path covers weights only")
        groups = _group_by_module(sd, ("lora_A.weight", "lora_B.weight"))
        for module, t in sorted(groups.items()):
            r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
            A, B = t["lora_A.weight"].to(dtype), t["lora_B.weight"].to(dtype)
            if A.dim() != 2:
                raise ValueError(f"{module}: LoRA on a non-linear layer (shape {tuple(A.shape)}) is not supported")
            yield MatrixDelta(module + ".weight", "factors", B=B * scaling, A=A)
    elif pt == "ADALORA":
        alpha = cfg["lora_alpha"]
        groups = _group_by_module(sd, ("lora_A", "lora_B", "lora_E"))
        for module, t in sorted(groups.items()):
            r = cfg.get("init_r") or t["lora_A"].shape[0]  # PEFT: ranknum = float(init_r), never saved
            scaling = (alpha if alpha > 0 else float(r)) / (float(r) + 1e-5)
            A = (t["lora_A"] * t["lora_E"]).to(dtype)
            yield MatrixDelta(module + ".weight", "factors", B=t["lora_B"].to(dtype) * scaling, A=A)
    elif pt == "VERA":
        shared_A = [v for k, v in sd.items() if k.endswith("vera_A") or ".vera_A." in k or k.endswith("vera_A.default")]
        shared_B = [v for k, v in sd.items() if k.endswith("vera_B") or ".vera_B." in k or k.endswith("vera_B.default")]
        if not shared_A or not shared_B:
            raise ValueError("VeRA adapter saved without its shared projections: save with save_projection=True")
        vera_A, vera_B = shared_A[0].to(dtype), shared_B[0].to(dtype)
        groups = _group_by_module(sd, ("vera_lambda_b", "vera_lambda_d"))
        for module, t in sorted(groups.items()):
            lam_b, lam_d = t["vera_lambda_b"].to(dtype), t["vera_lambda_d"].to(dtype)
            m = lam_b.numel()
            yield MatrixDelta(module + ".weight", "factors_vera", B=lam_b[:, None] * vera_B[:m], A=lam_d[:, None] * vera_A)
    elif pt == "MISS":
        mode = cfg.get("init_weights", True)
        if mode == "bat":
            raise ValueError("MiSS 'bat' updates depend on W; use the dense path")
        groups = _group_by_module(sd, ("miss_block",))
        for module, t in sorted(groups.items()):
            D = t["miss_block"].to(dtype)  # r×out (mini: r×mini_r, tiled along out)
            yield MatrixDelta(module + ".weight", "factors_miss", B=D, A=None)
    else:
        raise ValueError(f"{pt} adapters have no exact factor form; use the dense path")


def finish_factors(delta: MatrixDelta, shape: tuple[int, int]) -> MatrixDelta:
    """Complete factors whose size depends on the base matrix (VeRA slices, MiSS tiling)."""
    m, n = shape
    if delta.kind == "factors_vera":
        return MatrixDelta(delta.name, "factors", B=delta.B, A=delta.A[:, :n])
    if delta.kind == "factors_miss":
        D = delta.B
        r = D.shape[0]
        if D.shape[1] != m:  # "mini": the r×mini_r block repeats along the output dimension
            if m % D.shape[1]:
                raise ValueError(f"{delta.name}: MiSS mini block {tuple(D.shape)} does not tile {m} outputs")
            D = D.repeat(1, m // D.shape[1])
        tiling = torch.zeros(r, n, dtype=D.dtype)
        cols = torch.arange(n)
        tiling[cols % r, cols] = 1.0  # input j is summed into chunk slot j mod r (padding adds zeros)
        return MatrixDelta(delta.name, "factors", B=D.mT.contiguous(), A=tiling)
    return delta


def has_factor_form(info: ArtifactInfo) -> bool:
    cfg = info.adapter_config or {}
    if info.kind != "adapter" or info.peft_type not in FACTOR_TYPES:
        return False
    if info.peft_type == "LORA" and (cfg.get("use_dora") or cfg.get("lora_bias")):
        return False
    if info.peft_type == "MISS" and cfg.get("init_weights") == "bat":
        return False
    return True


def merged_state(base_source: str, info: ArtifactInfo, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Finetuned weights of an adapter with no exact factor form, merged by PEFT on an fp32 base on ``device``.

    The base is read straight onto the device (the GPU when the analysis runs there). The merge stays fp32, also
    on a GPU: the analysis takes W_ft − W_base, and a bf16 merge would bury a small update under the rounding of
    W (bf16 keeps ~3 significant digits of each weight). Loads and merges through the methods' own ops (BOFT
    needs its kernel installed first; a failed merge raises).
    """
    from peft_arena.methods import ops
    from peft_arena.training.precision import load_base_for_training

    device = str(device)
    base = load_base_for_training(base_source, torch.float32, device=None if device == "cpu" else device)
    merged = ops.merge(ops.load_trained(base, str(info.path), dtype="float32"))
    return {k: v.detach() for k, v in merged.state_dict().items()}


def adapted_modules(info: ArtifactInfo) -> list[str]:
    """Base weight names an adapter touches (from the adapter file's keys)."""
    sd_keys = []
    with safe_open(str(info.path / "adapter_model.safetensors"), framework="pt") as h:
        sd_keys = list(h.keys())
    names = set()
    for key in sd_keys:
        if not key.startswith(PEFT_PREFIX):
            continue
        rest = key[len(PEFT_PREFIX):]
        for marker in (".lora_", ".oft_", ".ia3_", ".vera_", ".miss_", ".boft_", ".hra_", ".loha_", ".lokr_"):
            if marker in rest:
                names.add(rest.split(marker)[0] + ".weight")
                break
    return sorted(names)
