"""One decoder layer's adapted linears, forward + backward, per PEFT method: where an adapter's overhead comes from.

The seven projections of a Llama/Qwen block with the shipped config's sizes (bf16 base weights, fp32 adapters as
peft makes them, bf16 autocast, the lean forwards and no input casting, as ``train-sft`` runs them) get one
adapter each; every projection reads a random bf16 input of ``--tokens`` rows and the step is ``sum(y · g)``
backward for a fixed random g (input gradients included). Prints milliseconds per step (median of ``--reps``) and
the overhead over the frozen base alone, for each method and, for BOFT, each rotation tile width
(``--boft-widths``). A step of the full model is about 28× this for Qwen2.5-7B, plus attention, norms and the
loss; bench/train_bench.py is the end-to-end figure.

    python bench/adapter_layer_bench.py --base qwen2.5-7b --tokens 8192 --methods lora,boft,miss
    python bench/adapter_layer_bench.py --smoke     # CPU, small shapes: checks the harness only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_shapes(base: str) -> dict[str, tuple[int, int, bool]]:
    """name -> (in, out, bias) of one decoder block of ``base``'s shipped config."""
    from peft_arena.models import base_config

    cfg = base_config(base)
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    qkv_bias = bool(getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2")
    return {"q_proj": (h, h, qkv_bias), "k_proj": (h, kv, qkv_bias), "v_proj": (h, kv, qkv_bias),
            "o_proj": (h, h, False), "gate_proj": (h, i, False), "up_proj": (h, i, False), "down_proj": (i, h, False)}


def build_block(shapes, device, dtype):
    import torch

    class Block(torch.nn.Module):
        def forward(self, inputs: dict):
            return [getattr(self, name)(inputs[name]) for name in PROJECTIONS]

        def prepare_inputs_for_generation(self, *args, **kwargs):  # looked up by peft's causal-LM wrapper
            raise NotImplementedError("a benchmark block does not generate")

    block = Block()
    for name, (n_in, n_out, bias) in shapes.items():
        setattr(block, name, torch.nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype))
    block.requires_grad_(False)
    return block


def adapt(block, method: str):
    """The arena's builder on the block (its defaults, the benchmark's LoRA r16 α32 and no dropout)."""
    from peft_arena.methods import BuildContext, get_method, ops

    sys.path.insert(0, str(ROOT / "bench"))
    from train_bench import method_overrides

    overrides = {k.split(".", 1)[1]: v for k, v in method_overrides(method).items()}
    if "target_modules" in get_method(method).defaults:
        overrides["target_modules"] = ",".join(PROJECTIONS)
    model, _ = ops.build(block, method, overrides, BuildContext(total_steps=100))
    return model


def time_step(model, inputs, grads, reps: int, device) -> float:
    """Median ms of one forward + backward of ``model`` (a Block, or a PeftModel: then its Block is called, with
    the forward pre-hooks that ``lean.prepare`` puts on the model it is given)."""
    import torch

    block = model.get_base_model() if hasattr(model, "get_base_model") else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outs = block(inputs)
        sum((o.float() * g).sum() for o, g in zip(outs, grads)).backward()

    params = [p for p in model.parameters() if p.requires_grad] + list(inputs.values())
    times = []
    for _ in range(reps + 2):
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="qwen2.5-7b", help="shipped config whose block shapes are used")
    p.add_argument("--tokens", type=int, default=8192, help="rows per projection input (batch × sequence)")
    p.add_argument("--methods", default="lora,boft,miss", help="comma-separated arena methods")
    p.add_argument("--boft-widths", default="16,64,128", help="BOFT rotation tile widths to compare")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="CPU-sized run (in/out ÷ 28, 64 tokens, 2 reps)")
    args = p.parse_args(argv)

    from peft_arena.training import lean
    from peft_arena.training.lean import boft as lean_boft

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = layer_shapes(args.base)
    if args.smoke:
        shapes = {k: (max(64, i // 28 // 64 * 64), max(64, o // 28 // 64 * 64), b) for k, (i, o, b) in shapes.items()}
        args.tokens, args.reps = 64, 2
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = {k: torch.randn(args.tokens, i, device=device, dtype=dtype, generator=gen).requires_grad_()
              for k, (i, _, _) in shapes.items()}  # the input gradient flows on to the layers below, as in training
    grads = [torch.randn(args.tokens, shapes[k][1], device=device, generator=gen) for k in PROJECTIONS]

    torch.manual_seed(0)
    base_ms = time_step(build_block(shapes, device, dtype), inputs, grads, args.reps, device)
    print(f"{args.base} block, {args.tokens} tokens, {device.type}: base alone {base_ms:.2f} ms")
    lean.install()
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        widths = [int(w) for w in args.boft_widths.split(",")] if method == "boft" else [None]
        model = adapt(build_block(shapes, device, dtype), method)
        lean.prepare(model.get_base_model(), dtype, device.type == "cuda")  # the block is what gets called
        for width in widths:
            if width is not None:
                lean_boft.GROUP_WIDTH = width
            ms = time_step(model, inputs, grads, args.reps, device)
            label = method if width is None else f"{method} (tile {width})"
            print(f"  {label:18s} {ms:8.2f} ms   adapter overhead {ms - base_ms:7.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
