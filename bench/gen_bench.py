"""Generation speed: plain ``model.generate`` (the peer) against the arena's transformers backend, same run.

A Qwen2.5-7B-shaped model with random bf16 weights is built from the shipped config directly on the GPU
(the same seed in every process, so every variant decodes the same weights); the prompts are the bundled
math questions (cycled to ``--prompts``) in SmolLM2's chat template, tokenised with SmolLM2's tokenizer
(its ids are valid inputs for the 152k vocabulary). Every completion runs the full ``--max-new-tokens``
(EOS suppressed in both), so tokens/s counts the same work.

* ``peer``: ``model.generate`` on all prompts as one left-padded batch, default attention (SDPA, PyTorch's
  kernel choice), dynamic cache: what a user writes without tuning.
* ``ours``: ``TransformersBackend`` with its defaults (bf16, SDPA without cuDNN, token-budget batches, static
  cache + torch.compile for long decodes, the arena's decode loop). Timed twice with the same shapes: the first call includes
  compilation (``ours_first_call_tok_s``), the second is the steady state (``ours_tok_s``).
* other variants (``--variants``): the backend with one setting changed, e.g. ``ours-nocompile``,
  ``ours-hf`` (``model.generate`` with static cache + compile instead of the arena's loop), ``ours-eager``,
  ``ours-cudnn`` (cuDNN SDPA allowed), to show what each choice is worth.

Each variant runs in its own process, one after the other; the JSON gets peer_tok_s, ours_tok_s, ratio.

    python bench/gen_bench.py --out bench/results/gen-h200.json                     # on a GPU
    python bench/gen_bench.py --config tiny --prompts 8 --max-new-tokens 16 --device cpu  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "ours": {},
    "ours-hf": {"decode_loop": "hf"},
    "ours-nocompile": {"compile": "false"},
    "ours-eager": {"compile": "false", "attn_implementation": "eager"},
    "ours-cudnn": {"compile": "false", "allow_cudnn": True},
}


def build(args):
    import torch
    from transformers import AutoModelForCausalLM

    from peft_arena.models import base_config, ensure_tiny, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or str(ensure_tiny()))
    config = base_config(args.config)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.eval()
    rows = [json.loads(line)["prompt"] for line in
            (ROOT / "peft_arena/data/samples/math-sample.jsonl").read_text().splitlines() if line.strip()]
    prompts = [rows[i % len(rows)] for i in range(args.prompts)]
    return model, tokenizer, prompts


def run_peer(args) -> dict:
    import torch

    from peft_arena.evaluation.backends.common import render_prompt

    model, tokenizer, prompts = build(args)
    tokenizer.padding_side = "left"
    texts = [render_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, **kwargs)  # warm-up (CUDA context, kernels)
        sync(args)
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, **kwargs)
        sync(args)
        seconds = time.perf_counter() - start
    new_tokens = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return {"tok_s": new_tokens / seconds, "seconds": seconds, "new_tokens": new_tokens,
            "prompt_tokens_padded": int(enc["input_ids"].numel()), "peak_gib": peak(args)}


def run_ours(args, variant: str) -> dict:
    from peft_arena.evaluation.backends.transformers import TransformersBackend

    options = dict(VARIANTS[variant])
    allow_cudnn = options.pop("allow_cudnn", False)
    model, tokenizer, prompts = build(args)
    backend = TransformersBackend(model=model, tokenizer=tokenizer, progress=False, **options)
    if allow_cudnn:
        import peft_arena.evaluation.backends.transformers as tb
        import contextlib

        tb.decode_attention_kernels = lambda device_type: contextlib.nullcontext()
    calls = []
    for _ in range(2):
        sync(args)
        start = time.perf_counter()
        backend.generate(prompts, max_new_tokens=args.max_new_tokens, ignore_eos=True)
        sync(args)
        seconds = time.perf_counter() - start
        calls.append({"seconds": seconds, "new_tokens": backend.last_stats["new_tokens"],
                      "tok_s": backend.last_stats["new_tokens"] / seconds, "batches": backend.last_stats["batches"],
                      "compiled": backend.last_stats["compiled"]})
    return {"tok_s": calls[1]["tok_s"], "first_call_tok_s": calls[0]["tok_s"], "calls": calls,
            "settings": backend.describe(), "peak_gib": peak(args)}


def sync(args):
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak(args):
    if args.device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 1)


def child(args) -> None:
    result = run_peer(args) if args.role == "peer" else run_ours(args, args.role)
    Path(args.result).write_text(json.dumps(result))


def parent(args) -> None:
    import torch
    import transformers

    results, errors = {}, {}
    for variant in ["peer", *args.variants.split(",")]:
        result_file = Path(args.work) / f"{variant}.json"
        result_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--role", variant, "--result", str(result_file),
               *sys.argv[1:]]
        print(f"[gen_bench] {variant} ...", file=sys.stderr, flush=True)
        start = time.time()
        try:
            proc = subprocess.run(cmd, timeout=args.variant_timeout)
            ok = proc.returncode == 0 and result_file.exists()
            if ok:
                results[variant] = json.loads(result_file.read_text())
            else:
                errors[variant] = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            errors[variant] = f"timeout after {args.variant_timeout} s"
        print(f"[gen_bench] {variant}: {results.get(variant, {}).get('tok_s', errors.get(variant))} "
              f"({time.time() - start:.0f} s wall)", file=sys.stderr, flush=True)
    if "peer" not in results or "ours" not in results:
        print(json.dumps({"results": results, "errors": errors}, indent=1))
        sys.exit(f"gen_bench: peer or ours failed: {errors}")
    peer_tok_s, ours = results["peer"]["tok_s"], results["ours"]
    summary = {
        "peer_tok_s": round(peer_tok_s, 1),
        "ours_tok_s": round(ours["tok_s"], 1),
        "ratio": round(ours["tok_s"] / peer_tok_s, 2),
        "ours_first_call_tok_s": round(ours["first_call_tok_s"], 1),
        "ratio_first_call": round(ours["first_call_tok_s"] / peer_tok_s, 2),
        "variants_tok_s": {k: round(v["tok_s"], 1) for k, v in results.items()},
        "shape": args.config, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "details": results, "errors": errors,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "details"}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen2.5-7b", help="base whose shipped config shapes the random model")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: the tiny model's SmolLM2 tokenizer)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default="ours,ours-hf,ours-nocompile", help=f"comma list from {list(VARIANTS)}")
    p.add_argument("--variant-timeout", type=int, default=300)
    p.add_argument("--work", default=os.environ.get("TMPDIR", "/tmp") + "/gen_bench")
    p.add_argument("--out", default=str(ROOT / "bench/results/gen-h200.json"))
    p.add_argument("--role", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if "ours" not in args.variants.split(","):
        args.variants = "ours," + args.variants
    child(args) if args.role else parent(args)


if __name__ == "__main__":
    main()
