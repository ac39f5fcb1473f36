"""Training speed and memory on one GPU: the peer scripts against our SFT path, for every PEFT method.

One command times, each in its own process so that peaks and caches do not mix:

* ``peer-plain``: a hand-written transformers + peft loop, bf16 weights, gradient checkpointing (non-reentrant),
  batch 4;
* ``peer-tuned``: the same with Liger (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy), no checkpointing,
  batch 4 (the tuned peer of docs/…/gpu-baselines);
* ``ours``: ``peft_arena.training.sft.train_sft`` as ``peft-arena train-sft`` calls it (a local model folder, a jsonl
  data file, TRL's SFTTrainer, our precision/packing/checkpointing/kernel defaults), for every PEFT method at
  4 × 2048 tokens (timed) and at the paper's 2 × 8192 micro-batch with gradient accumulation (fits or not).

The models are random-init real architectures built from the shipped configs (``peft_arena/assets/base_configs``)
directly on the GPU in bf16; the SmolLM2 tokenizer stands in (its ids are valid for every base). The first
``ours`` call loads the saved folder through the train-sft path and gives the time from process start to the end of
the first optimizer step, with its phases (``startup``: ``training/startup.py``'s ``startup/<phase>_s``, printed
and kept in the JSON); later methods reuse that loaded base (the adapter is unloaded after each). Methods whose
initialisation needs the weights (PiSSA/MiLoRA SVDs, KeepLoRA's calibration gradient) are timed with their
shapes only here (the step is the same); ``--init-layers N`` times their real GPU init on N decoder layers.

    python bench/train_bench.py --base qwen2.5-7b --out bench/results/train-h200.json
    python bench/train_bench.py --smoke      # CPU, tiny model, two methods: checks the harness only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = float(os.environ.get("BENCH_T0", time.time()))  # the orchestrator's spawn time of this process

PEFT_METHODS = ["lora", "dora", "vera", "rslora", "loraplus", "pissa", "milora", "keeplora", "adalora", "ia3",
                "oft", "boft", "miss"]


def method_overrides(method: str) -> dict:
    """The benchmark's setting of each method: LoRA-family r16 α32, no dropout; others at their defaults."""
    from peft_arena.methods import get_method

    defaults = get_method(method).defaults
    out = {}
    if "r" in defaults and "alpha" in defaults:
        out.update({"method.r": 16, "method.alpha": 32})
    if method == "adalora":
        out.update({"method.init_r": 16, "method.r": 8})  # 16 triplets per layer, pruned to 8 on average
    for key in ("dropout",):
        if key in defaults:
            out[f"method.{key}"] = 0.0
    return out


def gib(x: float) -> float:
    return round(x / 1024 ** 3, 2)


# ----------------------------------------------------------------------------------------------------- models
def build_random(base: str, device: str, dtype):
    """A random-init model of ``base``'s shipped config, built on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    from peft_arena.models import base_config

    cfg = base_config(base)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
    return model


def tokenizer_dir() -> str:
    from peft_arena.models import _smollm2_tokenizer_dir

    return str(_smollm2_tokenizer_dir())


def cmd_prepare(args) -> dict:
    """Save the random-init base (bf16) with the stand-in tokenizer as a local model folder."""
    import torch

    from peft_arena.models import load_tokenizer

    if (Path(args.folder) / "config.json").exists():
        return {"folder": args.folder, "seconds": 0.0, "reused": True}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_random(args.base, device, torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(args.folder)
    load_tokenizer(tokenizer_dir()).save_pretrained(args.folder)
    return {"folder": args.folder, "seconds": round(time.time() - T0, 1)}


def write_data(path: Path, tokenizer, n: int, length: int, seed: int = 0) -> None:
    """``n`` question/answer records whose chat-templated tokens are ``length`` or a little fewer."""
    from peft_arena.training.sft import tokenize_example

    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower()
                   and len(w) > 3)[:3000]
    with open(path, "w") as fh:
        for i in range(n):
            question = f"Problem {i}: " + " ".join(rng.choice(words) for _ in range(24))
            answer_words = [rng.choice(words) for _ in range(length)]
            p, r = tokenize_example(tokenizer, question, " ".join(answer_words))
            while len(p) + len(r) > length:
                answer_words = answer_words[: len(answer_words) - (len(p) + len(r) - length) - 1]
                p, r = tokenize_example(tokenizer, question, " ".join(answer_words))
            fh.write(json.dumps({"question": question, "answer": " ".join(answer_words), "domain": "math"}) + "\n")


# ------------------------------------------------------------------------------------------------------ peers
def cmd_peer(args) -> dict:
    """The peer: a plain loop over transformers + peft (LoRA r16 α32 all-linear, no dropout, AdamW)."""
    import torch
    from peft import LoraConfig, get_peft_model

    tuned = args.variant == "tuned"
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_random(args.base, device, torch.bfloat16 if cuda else torch.float32)
    if tuned and cuda:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    if not tuned:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 49152)
    steps = args.warmup + args.steps
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = sum(times[args.warmup:]) / args.steps
    return {"variant": args.variant, "tok_s": round(args.batch * args.seq / step_s, 1), "step_s": round(step_s, 4),
            "peak_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None, "batch": args.batch,
            "seq": args.seq}


# ------------------------------------------------------------------------------------------------------- ours
class StepClock:
    """A TrainerCallback recording the wall time and TRL's token count at the end of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.ends.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "num_tokens" in logs:
                    clock.tokens.append(float(logs["num_tokens"]))

            def on_train_begin(self, args, state, control, **kw):
                clock.begin = time.perf_counter()

            def on_train_end(self, args, state, control, model=None, **kw):
                clock.model = model

        self.callback = _CB()
        self.ends: list[float] = []
        self.tokens: list[float] = []
        self.begin = 0.0
        self.model = None

    def rate(self, warmup: int) -> tuple[float, float]:
        """(tokens/s, seconds per step) over the steps after ``warmup``."""
        n = len(self.ends) - 1 - (warmup - 1)
        seconds = self.ends[-1] - self.ends[warmup - 1]
        tokens = self.tokens[-1] - self.tokens[warmup - 1]
        return tokens / seconds, seconds / n


def run_ours(folder: str, data: str, method: str, seq: int, batch: int, accum: int, steps: int, out_dir: str,
             base_model=None, structure_only: bool = False, extra: dict | None = None, startup=None):
    """One ``train_sft`` call as ``peft-arena train-sft`` makes it; returns (result, clock)."""
    from peft_arena.config import build_config
    from peft_arena.tracking.tracker import MemoryTracker
    from peft_arena.training.sft import train_sft

    overrides = {"base_model": folder, "data": data, "domain": "math", "adapter": method, "limit": 0,
                 "max_length": seq, "batch_size": batch, "grad_accum": accum, "max_steps": steps,
                 "logging_steps": 1, **method_overrides(method), **(extra or {})}
    cfg = build_config("train_sft", None, {k: str(v) for k, v in overrides.items()})
    clock = StepClock()
    result = train_sft(cfg, MemoryTracker(), out_dir, base_model=base_model, extra_callbacks=[clock.callback],
                       structure_only=structure_only, startup=startup)
    return result, clock


def _release(clock):
    """The plain base back from a trained PEFT model (adapter layers removed), caches emptied."""
    import torch

    model = clock.model
    clock.model = None
    base = model.unload() if hasattr(model, "unload") else model
    if getattr(base, "peft_config", None):  # something kept the adapter's config: start the next one clean
        del model, base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    for p in base.parameters():
        p.requires_grad_(False)
        p.grad = None
    if hasattr(base, "gradient_checkpointing_disable"):
        base.gradient_checkpointing_disable()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return base


def cmd_ours(args) -> dict:
    import torch

    from peft_arena.training.startup import StartupClock

    startup = StartupClock(t0=T0)  # the first call's phases, from this process's spawn
    startup.mark("python_torch")  # the interpreter, this script, import torch
    startup.prefetch(args.folder)  # as train-sft does before its imports
    import peft_arena.training.sft  # noqa: F401

    startup.mark("module_imports")

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    methods = args.methods.split(",")
    seqs = [int(s) for s in args.seqs.split(",")]
    extra = dict(kv.split("=", 1) for kv in args.set) if args.set else {}
    out = {"methods": {}, "settings": {}, "extra": extra}
    base, first = None, True
    peak = (lambda: gib(torch.cuda.max_memory_allocated())) if cuda else (lambda: None)
    for method in methods:
        row = {}
        structure_only = method in ("pissa", "milora", "keeplora")
        for seq in seqs:
            long = seq > args.short_seq
            batch, accum, steps = (args.long_batch, args.long_accum, 1) if long else (args.batch, 1,
                                                                                     args.warmup + args.steps)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                result, clock = run_ours(args.folder, args.data[str(seq)], method, seq, batch, accum, steps,
                                         str(work / f"{method}-{seq}"), base_model=base,
                                         structure_only=structure_only, extra=extra,
                                         startup=startup if first else None)
            except torch.OutOfMemoryError as err:
                row[str(seq)] = {"fits": False, "error": f"out of memory: {str(err)[:160]}"}
                print("CELL " + json.dumps({method: {str(seq): row[str(seq)]}}), flush=True)
                base = None  # the failed build may have wrapped it: reload the folder for the next call
                gc.collect()
                torch.cuda.empty_cache()
                continue
            except Exception as err:  # a method that fails is reported, and the sweep goes on
                row[str(seq)] = {"fits": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                print("CELL " + json.dumps({method: {str(seq): row[str(seq)]}}), flush=True)
                base = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                continue
            cell = {"fits": True, "peak_gib": peak(), "settings": result["settings"],
                    "call_s": round(time.perf_counter() - started, 1)}
            if first:  # the very first call loaded the folder: process start -> first optimizer step
                first = False
                cell["first_step_s"] = round(time.time() - T0 - (time.perf_counter() - clock.ends[0]), 1)
                cell["load_to_train_begin_s"] = round(clock.begin - started, 1)
                cell["startup"] = result["startup"]  # startup/<phase>_s: where the time to the first step went
                print(f"startup of the first call ({method}, {seq} tokens), seconds from process start:\n"
                      + startup.table(), file=sys.stderr, flush=True)
            if not long:
                tok_s, step_s = clock.rate(args.warmup)
                cell.update({"tok_s": round(tok_s, 1), "step_s": round(step_s, 4)})
            row[str(seq)] = cell
            base = _release(clock)
            print("CELL " + json.dumps({method: {str(seq): cell}}), flush=True)
        out["methods"][method] = row
    return out


def cmd_startup(args) -> dict:
    """One ``train-sft`` start as a user's next run makes it: a fresh process loads the saved folder and trains LoRA
    for one step; the time from process start to the end of that step, by phase."""
    from peft_arena.training.startup import StartupClock

    startup = StartupClock(t0=T0)
    import torch  # noqa: F401

    startup.mark("python_torch")
    startup.prefetch(args.folder)  # as train-sft does before its imports
    import peft_arena.training.sft  # noqa: F401

    startup.mark("module_imports")
    result, clock = run_ours(args.folder, args.data[str(args.short_seq)], "lora", args.short_seq, args.batch, 1, 1,
                             tempfile.mkdtemp(prefix="bench-startup-"), startup=startup)
    return {"first_step_s": round(result["startup"]["startup/to_first_step_s"], 1), "startup": result["startup"],
            "triton_cache": os.environ.get("TRITON_CACHE_DIR", "default")}


def cmd_init(args) -> dict:
    """Real GPU initialisations of PiSSA / MiLoRA / KeepLoRA on the first N decoder layers of the saved base."""
    import torch

    from peft_arena.methods import BuildContext, get_method
    from peft_arena.models import load_tokenizer
    from peft_arena.training import precision
    from peft_arena.training.sft import tokenised_batch

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {}
    tok = load_tokenizer(args.folder)
    records = [json.loads(line) for line in open(args.data[str(args.short_seq)])][:2]
    for method in ("pissa", "milora", "keeplora"):
        model = precision.load_base_for_training(args.folder, dtype, device="cuda:0" if cuda else None)
        layers = precision.decoder_layers(model)
        del layers[args.init_layers:]
        model.config.num_hidden_layers = args.init_layers
        spec = get_method(method)
        opts = spec.resolve({k.split(".", 1)[1]: v for k, v in method_overrides(method).items()})
        ctx = BuildContext(calibration_batch=tokenised_batch(records[:2], tok) if spec.needs_calibration else None,
                           train="sft", total_steps=10)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        spec.build(model, opts, ctx)
        if cuda:
            torch.cuda.synchronize()
        out[method] = {"layers": args.init_layers, "seconds": round(time.perf_counter() - t, 2)}
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ orchestrator
def spawn(argv: list[str], timeout: int, env: dict | None = None) -> dict:
    """Run one phase in a fresh process; its RESULT line, or (on failure/timeout) the CELL lines it printed."""
    env = {**os.environ, **(env or {}), "BENCH_T0": repr(time.time()), "PYTHONUNBUFFERED": "1"}
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
        problem = f"exit {proc.returncode}" if proc.returncode else ""
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        problem = f"stopped after the phase's {timeout} s limit"
    log.seek(0)
    err = log.read()
    for line in stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(err[-3000:])
    partial: dict = {"methods": {}, "error": f"{argv[0]}: {problem or 'no result'}: {err[-400:]}"}
    for line in stdout.splitlines():
        if line.startswith("CELL "):
            for method, cells in json.loads(line[5:]).items():
                partial["methods"].setdefault(method, {}).update(cells)
    return partial


def summarise(peers: dict, ours: dict, init: dict, args) -> dict:
    short, long = str(args.short_seq), str(max(int(s) for s in args.seqs.split(",")))
    rows = ours.get("methods", {})
    lora = rows.get("lora", {}).get(short, {})
    tuned = peers.get("tuned", {})
    summary = {
        "device": args.device_name, "base": args.base, "short_seq": int(short), "long_seq": int(long),
        "batch": args.batch, "long_micro_batch": args.long_batch, "long_grad_accum": args.long_accum,
        "peer_plain_tok_s": peers.get("plain", {}).get("tok_s"), "peer_plain_peak_gib": peers.get("plain", {}).get(
            "peak_gib"),
        "peer_tuned_tok_s": tuned.get("tok_s"), "peer_tuned_peak_gib": tuned.get("peak_gib"),
        "ours_tok_s": lora.get("tok_s"), "ours_peak_gib": lora.get("peak_gib"),
        "ratio": round(lora["tok_s"] / tuned["tok_s"], 3) if lora.get("tok_s") and tuned.get("tok_s") else None,
        "first_step_s": lora.get("first_step_s"),
        "startup": next((cell["startup"] for row in rows.values() for cell in row.values() if "startup" in cell),
                        None),
        "ours_settings": lora.get("settings"),
        "methods": {}, "paper_8192_fits": {}, "init_seconds": init, "peers": peers, "raw": rows,
    }
    for name, row in rows.items():
        cell = row.get(short, {})
        summary["methods"][name] = {
            "step_ratio_to_lora": (round(cell["step_s"] / lora["step_s"], 3)
                                   if cell.get("step_s") and lora.get("step_s") else None),
            "peak_gib": cell.get("peak_gib"), "tok_s": cell.get("tok_s"),
            "checkpointing": (cell.get("settings") or {}).get("train.gradient_checkpointing"),
            "long_peak_gib": row.get(long, {}).get("peak_gib"),
        }
        summary["paper_8192_fits"][name] = bool(row.get(long, {}).get("fits"))
    return summary


def first_step_summary(first_call_s, startups: list[dict], setting: str) -> dict:
    """The time to the first step a user sees: the median of the warm separate starts (a user's next run: packages
    byte-compiled, the folder in the page cache, Triton's kernels cached); the cold-Triton start (a machine's first
    run) and the sweep's first call (which also imported the data libraries first) next to it, labelled."""
    import statistics

    warm = [r["first_step_s"] for r in startups if r.get("kind") == "warm" and r.get("first_step_s")]
    cold = [r["first_step_s"] for r in startups if r.get("kind") == "cold" and r.get("first_step_s")]
    return {
        "first_step_s": statistics.median(warm) if warm else None,
        "first_step_basis": (f"median of {len(warm)} separate warm starts (process start to the end of the first "
                             f"optimizer step: {setting})" if warm
                             else "no warm separate start ran: see first_step_first_call_s"),
        "first_step_cold_triton_s": cold[0] if cold else None,
        "first_step_first_call_s": first_call_s,
        "startup_runs": startups,
    }


def bytecode_state() -> dict:
    """Whether this Python reads compiled bytecode for torch (a plain pip install writes it; some images do not)."""
    import torch

    cache = Path(torch.__file__).parent / "__pycache__"
    return {"PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
            "torch_pyc_files": len(list(cache.glob("*.pyc"))) if cache.is_dir() else 0}


def table(summary: dict) -> str:
    s = summary
    lines = [f"{s['base']} on {s['device']}: tokens/s at batch {s['batch']} x {s['short_seq']}",
             "", "| run | tok/s | peak GiB |", "|---|---|---|",
             f"| peer: transformers + peft, bf16, checkpointing | {s['peer_plain_tok_s']} | {s['peer_plain_peak_gib']} |",
             f"| peer tuned: + Liger (incl. FLCE), no checkpointing | {s['peer_tuned_tok_s']} | "
             f"{s['peer_tuned_peak_gib']} |",
             f"| ours: train-sft, LoRA r16 | {s['ours_tok_s']} | {s['ours_peak_gib']} |",
             "", f"ours / tuned peer: {s['ratio']}x", "",
             f"process start to the end of the first optimizer step: {s.get('first_step_s')} s "
             f"({s.get('first_step_basis')}); cold Triton cache: {s.get('first_step_cold_triton_s')} s; the sweep's "
             f"first call: {s.get('first_step_first_call_s')} s", "",
             "the sweep's first call, by phase:", *startup_lines(s.get("startup")),
             *(f"separate start, {r.get('kind')} Triton cache: {r.get('first_step_s')} s to the first step"
               + (f" ({r['skipped']})" if r.get("skipped") else "") for r in (s.get("startup_runs") or [])), "",
             f"| method | step / LoRA's | tok/s | peak GiB | checkpointing | {s['long_seq']}-token protocol "
             f"(micro {s['long_micro_batch']} x accum {s['long_grad_accum']}) | peak GiB there |",
             "|---|---|---|---|---|---|---|"]
    for name, m in s["methods"].items():
        lines.append(f"| {name} | {m['step_ratio_to_lora']} | {m['tok_s']} | {m['peak_gib']} | {m['checkpointing']} | "
                     f"{'fits' if s['paper_8192_fits'][name] else 'does not fit'} | {m['long_peak_gib']} |")
    return "\n".join(lines)


def startup_lines(startup: dict | None) -> list[str]:
    """The first call's startup phases (seconds, from process start) as table lines."""
    if not startup:
        return []
    names = [k for k in startup if k.startswith("startup/") and k != "startup/to_first_step_s"]
    return ["| startup phase | seconds |", "|---|---|",
            *(f"| {k[len('startup/'):].removesuffix('_s')} | {startup[k]} |" for k in names),
            f"| to the first step | {startup.get('startup/to_first_step_s')} |", ""]


def cmd_all(args) -> int:
    import torch

    started = time.time()
    cuda = torch.cuda.is_available()
    args.device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = str(work / f"{args.base}-random")
    common = ["--base", args.base, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    peers = {}
    if not args.skip_peers:
        for variant in ("plain", "tuned"):
            peers[variant] = spawn(["peer", "--variant", variant, "--batch", str(args.batch), "--seq",
                                    str(args.short_seq), *common], args.timeout)
            print("peer", variant, peers[variant], flush=True)
    prep = spawn(["prepare", "--folder", folder, *common], args.timeout)
    print("prepare", prep, flush=True)
    from peft_arena.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir())
    data = {}
    for seq in sorted({int(s) for s in args.seqs.split(",")}):
        path = work / f"data-{seq}.jsonl"
        n = args.long_batch * args.long_accum if seq > args.short_seq else args.batch * (args.warmup + args.steps)
        write_data(path, tok, n, seq)
        data[str(seq)] = str(path)
    left = args.budget - (time.time() - started) - 20 if args.budget else args.timeout
    ours = spawn(["ours", "--folder", folder, "--data-json", json.dumps(data), "--methods", args.methods,
                  "--seqs", args.seqs, "--short-seq", str(args.short_seq), "--batch", str(args.batch),
                  "--long-batch", str(args.long_batch), "--long-accum", str(args.long_accum),
                  *sum((["--set", kv] for kv in args.set or []), []), *common], int(min(args.timeout, left)))
    startups = []
    for kind in [k for k in (args.startup_runs or "").split(",") if k]:
        left = args.budget - (time.time() - started) - 10 if args.budget else args.timeout
        if left < 60:
            startups.append({"kind": kind, "skipped": f"only {left:.0f} s of the --budget left"})
            continue
        # cold: an empty Triton cache (the first run on a machine JIT-compiles Liger's and TRL's kernels); warm: the
        # cache the earlier phases filled (a user's next run)
        env = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cold-")} if kind == "cold" else {}
        startups.append({"kind": kind, **spawn(["startup", "--folder", folder, "--data-json", json.dumps(data),
                                                "--short-seq", str(args.short_seq), "--batch", str(args.batch),
                                                *common], int(min(args.timeout, left)), env=env)})
        print("startup", startups[-1], flush=True)
    init = {}
    left = args.budget - (time.time() - started) - 10 if args.budget else args.timeout
    if args.init_layers and left < 45:
        init = {"skipped": f"only {left:.0f} s of the --budget left"}
    elif args.init_layers:
        init = spawn(["init", "--folder", folder, "--data-json", json.dumps(data), "--init-layers",
                      str(args.init_layers), "--short-seq", str(args.short_seq), *common], int(min(args.timeout, left)))
    summary = summarise(peers, ours, init, args)
    summary.update(first_step_summary(summary["first_step_s"], startups,
                                      f"a local {args.base} folder, LoRA r16, {args.batch} x {args.short_seq}"))
    summary["python_bytecode"] = bytecode_state()
    summary["bench_seconds"] = round(time.time() - started, 1)
    summary["complete"] = "error" not in ours and len(summary["methods"]) == len(args.methods.split(","))
    if "error" in ours:
        summary["ours_error"] = ours["error"]
    summary["command"] = "python bench/train_bench.py " + " ".join(sys.argv[1:])
    print(table(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print("wrote", args.out)
    return 0 if "error" not in ours else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", nargs="?", default="all", choices=["all", "peer", "prepare", "ours", "startup", "init"])
    p.add_argument("--base", default="qwen2.5-7b")
    p.add_argument("--methods", default=",".join(PEFT_METHODS))
    p.add_argument("--seqs", default="2048,8192", help="sequence lengths; the largest is the paper protocol check")
    p.add_argument("--short-seq", type=int, default=2048, help="the timed length")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--long-batch", type=int, default=2, help="micro-batch at the long length (paper: 2)")
    p.add_argument("--long-accum", type=int, default=2, help="gradient accumulation at the long length")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variant", default="plain", choices=["plain", "tuned"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--folder", default="")
    p.add_argument("--data-json", default="{}")
    p.add_argument("--set", action="append", help="extra train-sft override for ours, e.g. compile=on")
    p.add_argument("--init-layers", type=int, default=0, help="time real PiSSA/MiLoRA/KeepLoRA inits on N layers")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--startup-runs", default="cold,warm,warm",
                   help="extra fresh-process starts timed after the sweep (first_step_s is the median of the warm ones): warm "
                   "(Triton's kernel cache as the earlier phases left it), cold (an empty one); comma-separated, "
                   "'' for none")
    p.add_argument("--work", default="", help="scratch folder (the saved random base goes here)")
    p.add_argument("--out", default="")
    p.add_argument("--timeout", type=int, default=500, help="seconds per phase")
    p.add_argument("--budget", type=int, default=0, help="seconds for the whole run: the method sweep stops in time "
                   "to write what it measured (missing methods are listed)")
    p.add_argument("--smoke", action="store_true", help="tiny model, short sequences, two methods (harness check)")
    args = p.parse_args(argv)
    args.data = json.loads(args.data_json)
    if args.smoke:
        args.base, args.seqs, args.short_seq = "tiny-config", "128,256", 128
        if args.methods == ",".join(PEFT_METHODS):
            args.methods = "lora,dora"
        args.warmup, args.steps = 1, 2
    if args.base == "tiny-config":
        _register_tiny_config()
    if args.phase == "all":
        return cmd_all(args)
    fn = {"peer": cmd_peer, "prepare": cmd_prepare, "ours": cmd_ours, "startup": cmd_startup,
          "init": cmd_init}[args.phase]
    print("RESULT " + json.dumps(fn(args)), flush=True)
    return 0


def _register_tiny_config() -> None:
    """``tiny-config``: the tiny test model's config as a shipped-config base (for --smoke on CPU)."""
    from peft_arena import models

    models.KNOWN_BASES["tiny-config"] = models.BaseSpec("tiny-config", "", "tiny", None)
    original = models.base_config

    def base_config(name):
        if name == "tiny-config":
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(str(models.ensure_tiny()), trust_remote_code=False)
        return original(name)

    models.base_config = base_config


if __name__ == "__main__":
    raise SystemExit(main())
