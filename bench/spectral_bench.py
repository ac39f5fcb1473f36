"""Time the whole-model spectral analysis and print seconds per stage.

(a) A Qwen2.5-7B-shaped random pair built from the shipped config (random bf16 base weights for every layer
    projection, no embeddings) against (1) a LoRA r8 all-linear adapter, analysed from its factors, with the
    base-SVD cache cold and then warm, and (2) a dense update (a full finetuned folder), cache warm.
(b) The embedded SmolLM2-135M against a LoRA r8 adapter, cache cold and warm.

    python bench/spectral_bench.py --part qwen --device cuda [--layers 4] [--work /tmp/bench]
    python bench/spectral_bench.py --part smollm2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_arena.spectral.analysis import WeightFolder, analyze, select_matrices  # noqa: E402

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def layer_shapes(cfg) -> dict[str, tuple[int, int]]:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}


def write_random_base(folder: Path, cfg, n_layers: int, device: torch.device, dense_delta_to: Path | None):
    """One safetensors shard per layer of N(0, 0.02²) bf16 weights (and optionally W + dense noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    if dense_delta_to:
        dense_delta_to.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)
    weight_map, shapes = {}, layer_shapes(cfg)
    for layer in range(n_layers):
        base, ft = {}, {}
        for proj, (m, n) in shapes.items():
            name = f"model.layers.{layer}.{proj}.weight"
            W = torch.randn(m, n, generator=g, device=device) * 0.02
            base[name] = W.to(torch.bfloat16).cpu()
            if dense_delta_to:
                ft[name] = (W + torch.randn(m, n, generator=g, device=device) * 0.002).to(torch.bfloat16).cpu()
            weight_map[name] = f"layer-{layer:03d}.safetensors"
        save_file(base, str(folder / f"layer-{layer:03d}.safetensors"))
        if dense_delta_to:
            save_file(ft, str(dense_delta_to / f"layer-{layer:03d}.safetensors"))
    for target in [folder] + ([dense_delta_to] if dense_delta_to else []):
        (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        cfg.to_json_file(str(target / "config.json"))


def write_lora(folder: Path, base_dir: Path, r: int = 8, alpha: int = 16, seed: int = 0):
    """A random LoRA adapter in PEFT's saved format over every layer projection of the base."""
    folder.mkdir(parents=True, exist_ok=True)
    base = WeightFolder(base_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in select_matrices(base.keys(), None, list(PROJ)):
        m, n = base.shape(name)
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n, generator=g) / n ** 0.5
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(m, r, generator=g) * 1e-3
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": [p.split(".")[-1] for p in PROJ],
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False}))
    (folder / "arena_method.json").write_text(json.dumps(
        {"method": "lora", "options": {"r": r, "lora_alpha": alpha}, "base_model": str(base_dir),
         "base_source": str(base_dir), "label": f"LoRA r{r}a{alpha} (random)"}))


def report(title: str, summary: dict):
    t = summary["timings"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in sorted(t.items(), key=lambda kv: -kv[1]) if k != "total")
    print(f"[{title}] {summary['num_matrices']} matrices, paths {summary['paths']}, "
          f"cache hits {summary['svd_cache_hits']}: total {t['total']:.2f} s  ({stages})", flush=True)


def svd_driver_probe(device: torch.device):
    """Seconds for one thin SVD of the two big 7B shapes with each CUDA driver (chooses nothing, just informs)."""
    for shape in ((3584, 3584), (3584, 18944)):
        W = torch.randn(*shape, device=device)
        for driver in (None, "gesvd", "gesvdj", "gesvda"):
            try:
                torch.linalg.svd(W, full_matrices=False, driver=driver)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.linalg.svd(W, full_matrices=False, driver=driver)
                torch.cuda.synchronize()
                print(f"  svd {shape} driver={driver}: {time.perf_counter() - t0:.3f} s", flush=True)
            except RuntimeError as err:  # gesvda needs tall matrices
                print(f"  svd {shape} driver={driver}: {str(err).splitlines()[0][:80]}", flush=True)
        G = (W @ W.mT).double()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.linalg.eigvalsh(G)
        torch.cuda.synchronize()
        print(f"  eigvalsh float64 Gram {G.shape[0]}²: {time.perf_counter() - t0:.3f} s", flush=True)


def bench_qwen(args, device: torch.device, work: Path):
    from peft_arena.models import base_config

    cfg = base_config("qwen2.5-7b")
    if args.shrink > 1:  # smoke runs on CPU: same layer structure, every width divided
        cfg.hidden_size //= args.shrink
        cfg.intermediate_size //= args.shrink
    n_layers = args.layers or cfg.num_hidden_layers
    if device.type == "cuda":
        svd_driver_probe(device)
    base_dir, full_dir, lora_dir = work / "qwen-base", work / "qwen-full", work / "qwen-lora"
    t0 = time.perf_counter()
    write_random_base(base_dir, cfg, n_layers, device, full_dir if "dense" in args.updates else None)
    write_lora(lora_dir, base_dir)
    print(f"[qwen2.5-7b shape] wrote {n_layers} random layers in {time.perf_counter() - t0:.1f} s", flush=True)
    cache = Path(args.cache or work / "svd-cache")
    shutil.rmtree(cache, ignore_errors=True)
    kw = dict(device=str(device), cache_dir=str(cache), progress=not args.quiet, top_k=32)
    if "lora" in args.updates:
        report("7B LoRA r8, cache cold", analyze(str(base_dir), str(lora_dir), out_dir=str(work / "o1"), **kw))
        report("7B LoRA r8, cache warm", analyze(str(base_dir), str(lora_dir), out_dir=str(work / "o2"), **kw))
    if "dense" in args.updates:
        s = analyze(str(base_dir), str(full_dir), out_dir=str(work / "o3"), **kw)
        report("7B dense update, cache " + ("warm" if s["svd_cache_hits"] else "cold"), s)


def bench_smollm2(args, device: torch.device, work: Path):
    from peft_arena.models import ensure_smollm2

    base_dir = ensure_smollm2()
    write_lora(work / "smol-lora", base_dir)
    cache = work / "smol-cache"
    shutil.rmtree(cache, ignore_errors=True)
    layers = list(range(args.layers)) if args.layers else None
    kw = dict(device=str(device), cache_dir=str(cache), progress=not args.quiet, layers=layers)
    report("SmolLM2 LoRA r8, cache cold", analyze(str(base_dir), str(work / "smol-lora"), out_dir=str(work / "s1"), **kw))
    report("SmolLM2 LoRA r8, cache warm", analyze(str(base_dir), str(work / "smol-lora"), out_dir=str(work / "s2"), **kw))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["qwen", "smollm2", "all"], default="all")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layers", type=int, default=None, help="analyse only the first N layers (smoke runs)")
    ap.add_argument("--shrink", type=int, default=1, help="divide the 7B widths by this (CPU smoke runs only)")
    ap.add_argument("--updates", default="lora,dense", help="comma list of lora, dense (7B part)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, deleted at the end)")
    ap.add_argument("--cache", default=None, help="base-SVD cache folder for the 7B part (default under --work)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="spectral-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    try:
        if args.part in ("qwen", "all"):
            bench_qwen(args, device, work)
        if args.part in ("smollm2", "all"):
            bench_smollm2(args, torch.device("cpu") if args.part == "all" else device, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
