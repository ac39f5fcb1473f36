"""AdaLoRA's per-step overhead against LoRA: operator counts, host-device synchronisations and time per phase.

A step of AdaLoRA training is LoRA's forward/backward/optimizer step plus three AdaLoRA parts: the orthogonality
penalty (forward and backward, once per optimizer step), the rank allocator's ``update_and_allocate`` (every step;
it also prunes every ``deltaT`` steps and masks every step of the final phase) and a different adapter forward.
This script runs each part on a random-init model of the base's layer structure (the 7B's 28 layers × 7 adapted
linears by default, narrow widths unless ``--full-width``) with a bf16 base, fp32 adapters and bf16 autocast, as
training does, and prints per part:

* ``ops``: operators that run a kernel (the profiler's leaf aten ops, view/metadata ops left out); on a GPU also
  ``kernels``, the device kernels launched;
* ``syncs``: host-device synchronisations made outside torch itself (``.item()``, ``.tolist()``, tensor copies
  between host and device);
* ``ms``: host wall time (median over ``--repeat`` runs; on a GPU with a synchronisation at the end).

``peft`` is peft 0.21's code path as it ran before the lean one (peft's SVDLinear forward and RankAllocator, a
trainable ``ranknum`` as peft leaves it on a bf16 base, one Gram matrix per P/Q matrix); ``lean`` is ours
(``peft_arena/training/lean/adalora.py`` and ``methods/adalora.py``). Speed targets are measured by
``bench/train_bench.py`` on the GPU; this script says where an AdaLoRA step's extra work goes.

    python bench/adalora_overhead.py                      # CPU: 28 narrow layers
    python bench/adalora_overhead.py --full-width --tokens 8192   # GPU: the 7B's shapes (needs ~40 GiB)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VIEW_OPS = {"aten::view", "aten::t", "aten::transpose", "aten::as_strided", "aten::reshape", "aten::empty",
            "aten::detach", "aten::unsqueeze", "aten::expand", "aten::permute", "aten::select", "aten::slice",
            "aten::_unsafe_view", "aten::alias", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
            "aten::empty_like", "aten::empty_strided", "aten::squeeze", "aten::unbind", "aten::numpy_T",
            "aten::contiguous", "aten::_reshape_alias", "aten::detach_", "aten::result_type", "aten::split",
            "aten::chunk", "aten::narrow", "aten::mT", "aten::matrix_H", "aten::_to_copy_view", "aten::unflatten",
            "aten::flatten", "aten::view_as", "aten::expand_as", "aten::set_", "aten::is_nonzero"}


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the Python-level calls that make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("torch"):  # torch's own scalar reads (the optimizer's step count) stay on the host
            return func(*args, **kwargs)
        if name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
            self.count += 1
        elif name == "to" and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            # a host tensor sent to the model's device: on a GPU a copy from pageable memory that blocks the host
            if isinstance(target, (str, torch.device)) and args[0].device.type == "cpu":
                self.count += 1
        return func(*args, **kwargs)


def build(method: str, args, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_arena.methods import ops
    from peft_arena.methods.registry import BuildContext
    from peft_arena.models import base_config
    from peft_arena.training import lean

    cfg = base_config(args.base)
    data = cfg.to_dict()
    data["num_hidden_layers"] = args.layers or cfg.num_hidden_layers
    if data.get("layer_types"):
        data["layer_types"] = data["layer_types"][:data["num_hidden_layers"]]
    if not args.full_width:
        data.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, vocab_size=512)
    data.pop("model_type", None)
    config = AutoConfig.for_model(cfg.model_type, **data)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    overrides = {"r": 16, "alpha": 32, "dropout": 0.0}
    if method.startswith("adalora"):
        overrides.update(init_r=16, r=8)  # train_bench's init_r; pruned to an average of 8
    model, options = ops.build(model, method.split("-")[0], overrides,
                               BuildContext(total_steps=100, train="sft"))
    lean.disable_input_casting(model)
    return model, options, config


def _kernel_ops(event) -> int:
    """Operators under ``event`` that run a kernel: leaf aten ops other than view/metadata ops and scalar copies
    (a CPU artefact: a GPU passes a Python scalar as a kernel argument); a ``_foreach_``/fused op counts once (on a
    GPU it is a few multi-tensor kernels, on a CPU a loop over the tensors)."""
    name = event.name
    if name.startswith(("aten::_foreach_", "aten::_fused_")):
        return 1
    children = [c for c in event.cpu_children]
    below = sum(_kernel_ops(c) for c in children)
    if below or not name.startswith("aten::") or name in VIEW_OPS:
        return below
    if name in ("aten::copy_", "aten::fill_") and all(not s for s in (event.input_shapes or [[1]])):
        return 0  # a 0-dim scalar
    return 1


def leaf_ops(prof) -> tuple[int, int]:
    """(kernel-running aten ops, device kernels)."""
    events = prof.events()
    cuda = torch.autograd.DeviceType.CUDA
    n_kernels = sum(1 for e in events if e.device_type == cuda)
    n_ops = sum(_kernel_ops(e) for e in events if e.cpu_parent is None and e.device_type != cuda)
    return n_ops, n_kernels


def measure(fn, device: str, repeat: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # warm-up (allocations, first-call paths)
    sync()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    counter = _SyncCounter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof, counter:
        fn()
        sync()
    n_ops, n_kernels = leaf_ops(prof)
    out = {"ops": n_ops, "syncs": counter.count, "ms": round(statistics.median(times), 2)}
    if cuda:
        out["kernels"] = n_kernels
    return out


def per_matrix_penalty(model):
    """The penalty as peft (and our method before the lean one) computes it: one Gram matrix per P/Q matrix."""
    terms = []
    for name, param in model.named_parameters():
        if param.requires_grad and (".lora_A." in name or ".lora_B." in name):
            cov = param @ param.T if ".lora_A." in name else param.T @ param
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()


def run(variant: str, args, device: str) -> dict:
    from peft_arena.methods import adalora as adalora_method
    from peft_arena.training.lean import adalora as lean_adalora

    method = "lora" if variant == "lora" else "adalora"
    lean_adalora.uninstall()
    if variant == "lean":
        lean_adalora.install()
    model, options, config = build(method, args, device)
    if variant == "peft":  # as peft leaves it on a bf16 base
        for name, p in model.named_parameters():
            if "ranknum" in name:
                p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=g).to(device)
    dev_type = torch.device(device).type

    def fwd_bwd():
        # as TRL's SFTTrainer: the model gets the labels (so it returns a loss, and peft's AdaLoraModel.forward
        # computes its regulariser on it), but the loss trained on is computed from the model's token scores
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, use_cache=False)
            loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:])
        loss.backward()

    def optimizer_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = {"params": len(params), "forward_backward": measure(fwd_bwd, device, args.repeat)}
    fwd_bwd()  # gradients for the parts below
    res["optimizer_step"] = measure(lambda: opt.step(), device, args.repeat)
    if method == "lora":
        return res
    penalty = per_matrix_penalty if variant == "peft" else adalora_method.orthogonality_penalty

    def penalty_step():  # at on_step_begin, after the previous step's zero_grad: no gradient yet
        opt.zero_grad(set_to_none=True)
        (options["orth_reg_weight"] * penalty(model)).backward()

    res["penalty"] = measure(penalty_step, device, args.repeat)
    fwd_bwd()  # gradients for the allocator
    allocate = model.base_model.update_and_allocate
    peft_cfg = model.peft_config["default"]  # total 100, tinit 10, tfinal 20, deltaT 10
    res["update_ipt"] = measure(lambda: allocate(15), device, args.repeat)  # a budget step that does not prune
    res["prune"] = measure(lambda: allocate(50), device, args.repeat)  # a deltaT step: scores, threshold, masks
    final = peft_cfg.total_step - peft_cfg.tfinal + 1
    res["final_mask"] = measure(lambda: allocate(final), device, args.repeat)  # every step of the final phase
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="qwen2.5-7b", help="shipped config whose layer structure is used")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the base's)")
    p.add_argument("--full-width", action="store_true", help="the base's real widths (a GPU; default: narrow)")
    p.add_argument("--tokens", type=int, default=64, help="tokens in the batch")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--variants", default="lora,peft,lean")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for variant in args.variants.split(","):
        results[variant] = run(variant, args, device)
        gc.collect()  # the variant's model goes before the next one is built
        if device == "cuda":
            torch.cuda.empty_cache()
    parts = ["forward_backward", "optimizer_step", "penalty", "update_ipt", "prune", "final_mask"]
    keys = ["ops", "syncs", "ms"] + (["kernels"] if device == "cuda" else [])
    print(f"device={device} base={args.base} layers={args.layers or 'all'} full_width={args.full_width} "
          f"tokens={args.tokens}")
    print(f"{'part':18s}" + "".join(f"{v + ' ' + k:>16s}" for v in results for k in keys))
    for part in parts:
        row = f"{part:18s}"
        for v in results:
            fig = results[v].get(part, {})
            row += "".join(f"{fig.get(k, '-')!s:>16s}" for k in keys)
        print(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
