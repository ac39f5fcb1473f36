"""Supervised finetuning recipe: one method, one domain, TRL's SFTTrainer (paper §3.1, sized by the config).

Paper protocol kept (reference §3.1): the prompt is one user turn rendered with the tokenizer's chat template
(generation prompt added, no system message), the target is ``answer + eos_token`` – so a base model such as
Qwen2.5-7B learns to stop with its EOS (``<|endoftext|>``), not with the chat template's end-of-turn token, and an
instruct model with its own EOS (which is its end-of-turn token) – tokenised without special tokens; loss on the
response tokens only, over-long examples dropped rather than truncated, AdamW (0.9, 0.95), weight decay 0.01,
gradient clipping 1.0, cosine schedule with 10 % linear warmup to 0. The examples reach TRL already tokenised
(``input_ids`` + ``labels``, -100 on the prompt), so TRL's own chat rendering never changes the target.

KeepLoRA's calibration batch is the trainer's own first micro-batch (its shuffled sampler's first draw), taken
after the trainer is built and before it trains; see :func:`first_micro_batch`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from peft_arena.config import SFTConfig
from peft_arena.data import load_records
from peft_arena.methods import BuildContext, get_method
from peft_arena.methods import ops
from peft_arena.models import load_tokenizer, resolve_base
from peft_arena.training import checkpoints, distributed, guards
from peft_arena.training.monitor import attach_monitor
from peft_arena.training import lean, precision
from peft_arena.training.startup import Background, StartupClock, frozen_gc, warm_cuda


def log_training_data(tracker, records: list[dict], source: str) -> None:
    """The examples the trainer sees, as the run's dataset input (named after the data source, with a digest)."""
    import pandas as pd

    name = Path(source).stem if ("/" in source or "." in Path(source).name) else source
    tracker.log_dataset(pd.DataFrame(records), name=name, source=source, context="training")


def default_data(domain: str) -> str:
    return {"math": "math-sample", "med": "med-sample"}.get(domain, "")


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; the paper's SFT renders every question with one "
                         "(Qwen2.5-7B base ships one): use a tokenizer that has a chat template")
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no EOS token; the paper's SFT target is answer + EOS")


def tokenize_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template, generation prompt) and response ids (answer + EOS), as the paper builds them."""
    return tokenize_examples(tokenizer, [(question, answer)])[0]


def tokenize_examples(tokenizer, pairs: list[tuple[str, str]], chunk: int = 1024) -> list[tuple[list[int], list[int]]]:
    """:func:`tokenize_example` of every (question, answer), in batches (the same ids, one tokenizer call per batch)."""
    if not pairs:
        return []
    _check_tokenizer(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    for i in range(0, len(pairs), chunk):
        part = pairs[i: i + chunk]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q, _ in part]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer([a + tokenizer.eos_token for _, a in part], add_special_tokens=False)["input_ids"]
        out.extend(zip(prompt_ids, response_ids))
    return out


def drop_overlong(records: list[dict], tokenizer, max_length: int, tokens: dict | None = None) -> list[dict]:
    """Paper: examples longer than max_length are filtered out beforehand, never truncated. ``tokens``: a dict that
    receives each kept record's (prompt ids, response ids) under ``id(record)``, for :func:`sft_token_dataset`."""
    kept = []
    for rec, (p, r) in zip(records, tokenize_examples(tokenizer, [(r["question"], r["answer"]) for r in records])):
        if len(p) + len(r) <= max_length:
            kept.append(rec)
            if tokens is not None:
                tokens[id(rec)] = (p, r)
    return kept


def sft_token_dataset(records: list[dict], tokenizer, tokens: dict | None = None):
    """The training examples, tokenised as the paper does (:func:`tokenize_example`): ``input_ids`` and ``labels``
    (the answer + EOS tokens; -100 on the prompt) — what TRL's completion-only preparation makes from a
    ``completion_mask``, built here in the same pass instead of by a second per-example ``Dataset.map``.
    ``tokens``: ids already made by :func:`drop_overlong` (by ``id(record)``); the others are tokenised here."""
    from datasets import Dataset

    for rec in records:
        if not rec["answer"]:
            raise ValueError(f"record without an answer cannot be used for SFT: {rec['question'][:80]!r}")
    tokens = tokens or {}
    missing = [rec for rec in records if id(rec) not in tokens]
    made = dict(zip(map(id, missing), tokenize_examples(tokenizer, [(r["question"], r["answer"]) for r in missing])))
    rows = []
    for rec in records:
        prompt_ids, response_ids = tokens.get(id(rec)) or made[id(rec)]
        rows.append({"input_ids": prompt_ids + response_ids, "labels": [-100] * len(prompt_ids) + response_ids})
    if not rows:
        raise ValueError("no records to build an SFT dataset from")
    return Dataset.from_list(rows)


def tokenised_batch(records: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """``records`` as one right-padded batch with answer-only labels (:func:`tokenize_example`), for timing a
    gradient initialisation outside a trainer (bench/train_bench.py); training calibrates on
    :func:`first_micro_batch`."""
    rows = tokenize_examples(tokenizer, [(r["question"], r["answer"]) for r in records])
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def first_micro_batch(trainer) -> dict[str, torch.Tensor]:
    """The first micro-batch the trainer will train on: the first draw of a fresh train dataloader (its sampler is
    seeded with ``data_seed``, so training's first epoch draws the same order), with the collator's labels."""
    return next(iter(trainer.get_train_dataloader()))


def resolve_settings(cfg: SFTConfig, method: str, options: dict, model_config) -> precision.TrainSettings:
    """Dtype, device, attention, checkpointing, kernels and padding-free for this run (see training/precision.py)."""
    cuda = torch.cuda.is_available()
    sharded = distributed.is_worker() and distributed.distributed_type(cfg.distributed) in ("FSDP", "DEEPSPEED")
    # FSDP / DeepSpeed shard the weights and bring their own mixed precision: there the base stays as before
    # (fp32, loaded on the host, placed by the engine) unless precision says otherwise.
    dtype = precision.resolve_dtype(cfg.precision, cuda and not sharded)
    padding_free = precision.resolve_padding_free(cfg.padding_free, cuda, cfg.attn_implementation)
    # one micro-batch: batch_size sequences of up to max_length tokens (padded or concatenated)
    checkpointing, estimate = precision.resolve_checkpointing(
        cfg.gradient_checkpointing, model_config, cfg.batch_size * cfg.max_length, method, dtype,
        float(options.get("dropout", 0.0) or 0.0), cuda)
    local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device() if cuda else 0))
    return precision.TrainSettings(
        dtype=dtype, device="cpu" if not cuda or sharded else f"cuda:{local}",
        attn_implementation=cfg.attn_implementation, gradient_checkpointing=checkpointing,
        liger=precision.resolve_liger(cfg.liger, cuda), compile=precision.resolve_compile(cfg.compile, cuda),
        padding_free=padding_free, estimate=estimate)


def train_sft(cfg: SFTConfig, tracker, output_dir: str | Path, *, base_model=None, extra_callbacks=(),
              structure_only: bool = False, resume: bool = False, startup: StartupClock | None = None) -> dict:
    """Train ``cfg.adapter`` on ``cfg.domain`` data; save the trained artifact; return its facts.

    ``base_model``: an already loaded plain base (in the run's dtype, on the run's device) instead of loading
    ``cfg.base_model``; the speed benchmark reuses one 7B base across methods this way. ``structure_only`` builds
    data-dependent initialisations (SVD, calibration gradients) with their shapes only, for timing steps alone;
    nothing is saved then. ``resume``: continue the run's last checkpoint (``training/checkpoints.py``). Training
    guards (``training/guards.py``) fail the run on non-finite or diverging losses, gradients or weights.
    ``startup``: the clock timing the phases up to the end of the first optimizer step (``training/startup.py``;
    default: from this process's start); logged as ``startup/<phase>_s`` metrics, returned under ``"startup"``.
    """
    clock = startup if startup is not None else StartupClock()
    clock.mark("before_call")
    if base_model is None:
        clock.prefetch(cfg.base_model)  # a cold disk is read while the rest starts (training/startup.py)
    from trl import SFTTrainer  # noqa: F401  (TRL, datasets, pandas: the imports still left, timed on their own)

    clock.mark("imports")
    with frozen_gc():  # the ~500k objects imported so far stay out of the collector's scans while training
        return _train_sft(cfg, tracker, output_dir, base_model, extra_callbacks, structure_only, resume, clock)


def _train_sft(cfg: SFTConfig, tracker, output_dir, base_model, extra_callbacks, structure_only: bool, resume: bool,
               clock: StartupClock) -> dict:
    from transformers import AutoConfig
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    spec = get_method(cfg.adapter)
    options = spec.resolve(cfg.method_options)
    lr = cfg.lr or spec.sft_lr
    base = resolve_base(cfg.base_model)
    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    model_config = (base_model.config if base_model is not None
                    else AutoConfig.from_pretrained(base.source, trust_remote_code=False))
    settings = resolve_settings(cfg, spec.name, options, model_config)  # initialises CUDA
    clock.mark("config")
    def load():  # in the background while the data is read and tokenised (nothing there makes torch tensors)
        warm_cuda(settings.device, settings.dtype)  # cuBLAS / attention libraries loaded while the weights stream in
        return precision.load_base_for_training(base.source, settings.dtype, cfg.attn_implementation,
                                                device=None if settings.device == "cpu" else settings.device)

    loading = None if base_model is not None else Background("weights", load, clock)

    try:
        tokenizer = load_tokenizer(base.source)
        tokenizer.padding_side = "right"
        clock.mark("tokenizer")
        tokens: dict = {}  # each kept record's ids, tokenised once
        records = load_records(cfg.data or default_data(cfg.domain), cfg.domain, limit=cfg.limit or None,
                               seed=cfg.seed)
        records = drop_overlong(records, tokenizer, cfg.max_length, tokens)
        if not records:
            raise ValueError(f"no training example fits max_length={cfg.max_length}; raise max_length")
        records, monitor = attach_monitor(cfg, records, tracker, output_dir, train="sft", domain=cfg.domain,
                                          source=cfg.data or default_data(cfg.domain), seed=cfg.seed)
        log_training_data(tracker, records, cfg.data or default_data(cfg.domain))
        train_dataset = sft_token_dataset(records, tokenizer, tokens)
        steps_per_epoch = math.ceil(len(records) / (cfg.batch_size * cfg.grad_accum))
        total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs))
        clock.mark("data")
    except BaseException:
        if loading is not None:
            loading.discard()  # the base still loading is dropped when it arrives, not kept by the traceback
        raise

    model = base_model if loading is None else loading.result()
    clock.mark("weights")  # what the main thread still waited for (the load's own time: startup/weights_bg_s)
    if settings.liger:
        precision.apply_liger(model)
    clock.mark("kernels")
    # KeepLoRA's gradient init waits for the trainer: its first shuffled micro-batch is the calibration batch
    ctx = BuildContext(defer_calibration=spec.needs_calibration and not structure_only, train="sft",
                       total_steps=total_steps, seed=cfg.seed, structure_only=structure_only)
    model = spec.build(model, options, ctx)  # on the GPU when there is one: SVD inits and calibration run there
    lean.prepare(model, settings.dtype, cuda)  # peft's adapter math without fp32 copies and full-size temporaries
    if settings.compile:
        precision.compile_layers(model)
    clock.mark("adapter")
    trainable, total = ops.count_parameters(model)
    tracker.log_metrics({"arena/trainable_params": trainable, "arena/total_params": total,
                         "arena/train_examples": len(records)})
    tracker.log_params({"total_steps": total_steps, "method_label": spec.label(options),
                        **{f"method.{k}": v for k, v in options.items()}, **settings.params()})

    out = Path(output_dir)
    ckpt = checkpoints.prepare(tracker, out / "trainer", cfg.save_steps, total_steps, resume)
    report_to, report_callbacks = checkpoints.report_to(tracker)
    args = TRLSFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=total_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        adam_beta1=0.9,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the guards, not be replaced by the running mean
        **ckpt.args,
        report_to=report_to,
        run_name=cfg.run_name or None,
        # over-long examples were dropped above and every example has answer tokens (at least EOS): TRL's
        # truncation map and fully-masked filter would change nothing, so they are not run
        max_length=None,
        padding_free=settings.padding_free,
        completion_only_loss=True,
        use_cpu=not cuda,
        bf16=cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
    )
    optimizer = (spec.make_optimizer(model, options, lr, cfg.weight_decay, (0.9, cfg.adam_beta2))
                 if getattr(spec, "make_optimizer", None) else None)
    callbacks = [*(spec.callbacks(model, options, ctx) if getattr(spec, "callbacks", None) else []), *monitor]
    guard = guards.guard_callback(lr, cfg.divergence_factor, cfg.divergence_patience)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=[*callbacks, *extra_callbacks, guard, *ckpt.callbacks, *report_callbacks, clock.callback()],
    )
    tracker.set_tags(distributed.describe(trainer))  # also refuses an engine other than the one asked for
    if not structure_only:  # the guards' probe batch: the first micro-batch (the global RNG left as it was)
        rng = torch.random.get_rng_state()
        guard.probe = first_micro_batch(trainer)
        torch.random.set_rng_state(rng)
    if spec.needs_calibration and not structure_only:  # KeepLoRA: the trainer's own first (shuffled) micro-batch
        batch = first_micro_batch(trainer)
        spec.calibrate(trainer.model, options, batch)
        tracker.log_params({"calibration_examples": int(batch["input_ids"].shape[0])})
    clock.mark("trainer")
    with guards.overflow_is_divergence(lr):
        result = trainer.train(resume_from_checkpoint=str(ckpt.resume_from) if ckpt.resume_from else None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    guard.check_final(trainer.model)

    adapter_dir = None
    if not structure_only:  # a shapes-only init is no real adapter: nothing to save
        adapter_dir = distributed.save_trained(trainer, trainer.model, spec, options, out / "adapter",
                                               base_model=base.short, base_source=base.source, tokenizer=tokenizer)
        tracker.log_artifacts(adapter_dir, "adapter")
        ckpt.finish()
    summary = {
        "train/final_loss": losses[-1] if losses else float("nan"),
        "train/runtime_s": result.metrics.get("train_runtime", float("nan")),
    }
    tracker.log_metrics({**summary, **clock.metrics()})
    trainer.accelerator.wait_for_everyone()  # rank 0 has uploaded the adapter before any process cleans up
    return {"adapter_dir": str(adapter_dir) if adapter_dir else None, "trainable_params": trainable,
            "total_params": total, "label": spec.label(options), "losses": losses, "steps": total_steps,
            "examples": len(records), "monitor_stopped": monitor[0].stopped if monitor else None,
            "settings": settings.params(), "startup": clock.metrics(), **summary}
