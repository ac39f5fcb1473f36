"""GRPO with verifiable rewards for every method of the registry, on TRL's ``GRPOTrainer`` (paper §3.2).

The paper's RL protocol, kept: group size 8 with group-normalised advantages, clip ratio 0.2 on both sides
plus a dual-clip bound of 3 (TRL's ``delta``), no KL term, no entropy bonus, token-mean loss aggregation,
a constant learning rate (1e-5 adapters, 1e-6 full finetuning: each method's ``grpo_lr``), sampling at
temperature 1.0, reward 1/0 for a correct/incorrect answer (read and judged by the benchmarks' rule,
docs/grading.md). Lengths and batch sizes come from the recipe; the defaults are sized for the CPU demo, not the
paper's 256 prompts × 8192 tokens.

TRL's ``loss_type="dapo"`` is VeRL's ``token-mean``: the clipped per-token losses are summed over every
completion token of the accumulated batch and divided by that token count (``"grpo"`` would average per
sequence first, ``"dr_grpo"`` divide by a constant).

Methods are built by the arena's registry and handed to TRL already wrapped (never through TRL's
``peft_config``), so PiSSA/MiLoRA's residual base, KeepLoRA's gradient init and AdaLoRA's schedule are the
arena's own. A method that cannot run raises; none is replaced by another.

AdaLoRA trains under GRPO exactly as under SFT: the method's own callback adds the orthogonality regulariser's
gradient once per optimizer step and, with ``reallocate=true``, calls peft's ``update_and_allocate`` after each
step (the budget schedule prunes only between ``tinit`` and ``total_step − tfinal``, every ``delta_t`` steps); with
``reallocate=false`` (the paper's code) neither runs. peft's own regulariser is off (it only sees a loss computed
from labels, which GRPO has not). AdaLoRA with a KL term is refused (see :func:`train_grpo`).

KeepLoRA's calibration batch (GRPO has no labels) is the prompts of the trainer's first generation round, in its
shuffled sampler's order, paired with their reference answers (:func:`first_generation_rows`,
:func:`keeplora_calibration_batch`); with a KL term the frozen reference adapter is re-copied afterwards, so the
reference stays the initial policy.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from peft_arena.config import coerce, validate
from peft_arena.data import grpo_dataset
from peft_arena.data.schema import rl_prompt_text
from peft_arena.methods import BuildContext, MethodError, get_method
from peft_arena.methods import ops
from peft_arena.models import load_tokenizer, short_name
from peft_arena.training import checkpoints, distributed, guards, lean, precision
from peft_arena.training.rewards import completion_text, correctness_reward, format_reward

COMPLETIONS_TABLE = "grpo/completions.json"

# TRL's logged keys → the arena's stable metric names (the only curves logged: TRL's own names are not)
CURVES = {
    "reward": "train/reward",
    "reward_std": "train/reward_std",
    "kl": "train/kl",
    "entropy": "train/entropy",
    "completions/mean_length": "train/completion_length",
    "completions/clipped_ratio": "train/clipped_ratio",
    "clip_ratio/region_mean": "train/clip_ratio",
    "frac_reward_zero_std": "train/frac_reward_zero_std",
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "learning_rate": "train/learning_rate",
}


@dataclass
class GRPORecipe:
    """Every GRPO knob. Paper values where the paper fixes one; CPU-sized lengths and batches otherwise."""

    num_generations: int = 8  # completions per prompt (the group, at least 2); paper rollout.n = 8
    prompts_per_generation: int = 2  # prompts sampled per generation round; paper 256
    updates_per_generation: int = 1  # optimizer steps per generation round; paper 4 (256 / mini-batch 64)
    grad_accum: int = 1  # micro-batches per optimizer step (memory only; same maths)
    max_steps: int = 4  # optimizer steps
    learning_rate: float | None = None  # None: the method's grpo_lr (1e-5 adapters, 1e-6 full)
    lr_scheduler_type: str = "constant"  # paper: constant, no warmup
    weight_decay: float = 0.01  # paper (VeRL optimizer)
    max_grad_norm: float = 1.0  # paper
    epsilon: float = 0.2  # clip ratio, lower side; paper 0.2
    epsilon_high: float | None = None  # upper side; None = epsilon (paper: symmetric 0.2)
    delta: float | None = 3.0  # dual-clip bound on the ratio (paper clip_ratio_c = 3.0); None disables
    beta: float = 0.0  # KL coefficient against the initial policy; paper: no KL term
    loss_type: str = "dapo"  # TRL's name for token-mean aggregation (see the module docstring)
    scale_rewards: str = "group"  # advantages = (r - group mean) / group std (paper norm_adv_by_std_in_grpo)
    temperature: float = 1.0  # paper sampling: T=1, top_p=1, no top-k
    top_p: float = 1.0
    max_completion_length: int = 64  # paper 8192
    max_prompt_length: int = 1024  # prompts longer than this (tokens) are dropped, as the paper filters them
    format_reward_weight: float = 0.0  # weight of the optional format reward (paper: none)
    log_completions_every: int = 1  # log a table of sampled completions every N optimizer steps (0 = never)
    completions_table_rows: int = 32  # rows per logged table (whole groups, first prompts of the round)
    logging_steps: int = 1
    gradient_checkpointing: bool = False  # turn on for long completions on GPU
    precision: str = "auto"  # policy weights: auto (bf16 on a GPU, fp32 on CPU) | bf16 | fp32; adapters train in fp32
    attn_implementation: str = "auto"  # auto (transformers' default) | sdpa | eager | flex_attention | …
    disable_dropout: bool = True  # paper RL builds its adapters without dropout; keeps π_old = π exact
    seed: int = 0
    use_vllm: str = "auto"  # auto: vLLM when installed; "true" requires it; "false" uses transformers generate
    vllm_mode: str = "auto"  # auto: "server" when vllm_server_base_url is set, else "colocate"
    vllm_gpu_memory_utilization: float = 0.3  # colocate mode: share of GPU memory vLLM may take
    vllm_server_base_url: str | None = None  # server mode: a running `trl vllm-serve` (e.g. on another GPU)
    vllm_max_model_length: int | None = None  # colocate mode: vLLM context (None: the model's own; paper 9216)
    vllm_tensor_parallel_size: int = 1  # colocate mode: GPUs per vLLM engine

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(GRPORecipe)
        for f in dataclasses.fields(self):  # values from YAML or `-P grpo.x=y` arrive as strings
            setattr(self, f.name, coerce(f"grpo.{f.name}", getattr(self, f.name), hints[f.name]))
        validate(self, "grpo.")
        if str(self.use_vllm).lower() not in ("auto", "true", "false"):
            raise ValueError(f"grpo.use_vllm must be auto, true or false, not {self.use_vllm!r}")
        self.use_vllm = str(self.use_vllm).lower()
        if self.vllm_mode not in ("auto", "colocate", "server"):
            raise ValueError(f"grpo.vllm_mode must be auto, colocate or server, not {self.vllm_mode!r}")
        per_update, rest = divmod(self.prompts_per_generation * self.num_generations, self.updates_per_generation)
        if rest or per_update % self.grad_accum:
            raise ValueError(
                f"prompts_per_generation × num_generations = {self.prompts_per_generation * self.num_generations} "
                f"completions must split evenly into updates_per_generation={self.updates_per_generation} "
                f"× grad_accum={self.grad_accum} micro-batches"
            )

    @property
    def micro_batch_size(self) -> int:
        """Completions per forward/backward (TRL's per_device_train_batch_size)."""
        return self.prompts_per_generation * self.num_generations // (self.updates_per_generation * self.grad_accum)


# ---------------------------------------------------------------------------------------------------- backend


def generation_backend(use_vllm: str, vllm_installed: bool | None = None) -> str:
    """``"vllm"`` or ``"transformers"``: vLLM when it is installed (auto) or required (true)."""
    installed = importlib.util.find_spec("vllm") is not None if vllm_installed is None else vllm_installed
    if use_vllm == "false":
        return "transformers"
    if use_vllm == "true" and not installed:
        raise RuntimeError("grpo.use_vllm=true but vLLM is not installed: `pip install trl[vllm]` on a GPU machine, "
                           "or set grpo.use_vllm=auto to generate with transformers")
    return "vllm" if installed else "transformers"


def vllm_settings(recipe: GRPORecipe, cuda: bool | None = None) -> dict[str, Any]:
    """GRPOConfig's vLLM fields: colocate on the training GPU, or a separate `trl vllm-serve` server.

    Server mode pushes the policy's weights into the server after every update through vLLM's NCCL
    weight-transfer engine (TRL's client), which needs the trainer on a CUDA device: refused up front elsewhere.
    """
    mode = recipe.vllm_mode
    if mode == "auto":
        mode = "server" if recipe.vllm_server_base_url else "colocate"
    if mode == "server":
        if not recipe.vllm_server_base_url:
            raise ValueError("grpo.vllm_mode=server needs grpo.vllm_server_base_url, e.g. http://localhost:8000 "
                             "(start it with `trl vllm-serve --model <base>` on the GPUs not used for training)")
        if not (torch.cuda.is_available() if cuda is None else cuda):
            raise RuntimeError("grpo.vllm_mode=server syncs the policy into the server over NCCL (TRL's vLLM client), "
                               "which needs the trainer on a CUDA GPU; on this machine use grpo.vllm_mode=colocate")
        return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": recipe.vllm_server_base_url}
    return {"use_vllm": True, "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": recipe.vllm_gpu_memory_utilization,
            "vllm_max_model_length": recipe.vllm_max_model_length,
            "vllm_tensor_parallel_size": recipe.vllm_tensor_parallel_size}


# ---------------------------------------------------------------------------------------------------- logging


class CompletionsRecorder:
    """Wraps reward functions so each call's inputs and scores are kept for the completions table."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.generation = 0  # generation rounds seen (several optimizer steps may share one round)

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)  # TRL names the reward curves after __name__
        def recorded(prompts=None, completions=None, **kwargs):
            scores = fn(prompts=prompts, completions=completions, **kwargs)
            if fn.__name__ == self._first:
                self.generation += 1
                self.latest = {"prompts": prompts, "completions": completions,
                               "ground_truth": kwargs.get("ground_truth"), "rewards": {}}
            self.latest["rewards"][fn.__name__] = list(scores)
            return scores

        return recorded

    def set_order(self, functions: list[Callable]) -> None:
        self._first = functions[0].__name__

    def rows(self, step: int, limit: int) -> dict[str, list]:
        latest = self.latest
        if not latest.get("completions"):
            return {}
        n = min(limit, len(latest["completions"]))
        table = {
            "step": [step] * n,
            "prompt": [_prompt_text(p) for p in latest["prompts"][:n]],
            "completion": [completion_text(c) for c in latest["completions"][:n]],
            "ground_truth": list(latest["ground_truth"][:n]) if latest["ground_truth"] else [""] * n,
        }
        for name, scores in latest["rewards"].items():
            table[f"reward_{name}"] = scores[:n]
        return table


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return str(prompt)


def _arena_callback(tracker, recorder: CompletionsRecorder, recipe: GRPORecipe, correctness_name: str):
    from transformers import TrainerCallback

    class ArenaGRPOLogging(TrainerCallback):
        """Stable curve names through the tracker, plus the sampled completions table every N steps."""

        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []
            self.logged_generation = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:
                return
            curves = {arena: float(logs[key]) for key, arena in CURVES.items() if key in logs}
            accuracy_key = f"rewards/{correctness_name}/mean"
            if accuracy_key in logs:
                curves["train/accuracy"] = float(logs[accuracy_key])
            self.history.append({"step": state.global_step, **curves})
            tracker.log_metrics(curves, step=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            every = recipe.log_completions_every
            replayed = tracker.already_logged("train/reward", state.global_step)  # a resumed run's replayed step
            if (every and state.global_step % every == 0 and recorder.generation > self.logged_generation
                    and not replayed):
                table = recorder.rows(state.global_step, recipe.completions_table_rows)
                if table:
                    tracker.log_table(table, COMPLETIONS_TABLE)
                    self.logged_generation = recorder.generation

    return ArenaGRPOLogging()


# ---------------------------------------------------------------------------------------------------- training


def first_generation_rows(trainer) -> list[dict]:
    """The dataset rows of the trainer's first generation round, one per prompt, in its sampler's (shuffled)
    order. GRPOTrainer builds a fresh seeded ``RepeatSampler`` for every train dataloader, so training's first round
    draws the same prompts."""
    rows, seen = [], set()
    for row in next(iter(trainer.get_train_dataloader())):
        key = repr(row["prompt"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def keeplora_calibration_batch(rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """KeepLoRA's gradient seed under GRPO: cross-entropy of the reference answers given the RL prompts.

    ``rows`` are GRPO dataset rows (``prompt`` messages and ``answer``; :func:`first_generation_rows`). GRPO has
    no labels, so the prompts are paired with their reference solutions (the same pairs SFT would train on, loss on
    the answer tokens only). The gradient then points toward producing correct, boxed answers to these prompts,
    which is where the policy gradient pushes once rewards arrive.
    """
    pairs = []
    for row in rows:
        if not row.get("answer"):
            raise MethodError("keeplora under GRPO needs reference answers for its calibration batch; "
                              "the training records have none (use a source with worked solutions)")
        prompt = tokenizer.apply_chat_template(list(row["prompt"]), tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        pairs.append((prompt_ids, answer_ids))
    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(pairs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def drop_long_prompts(records: list[dict], tokenizer, domain: str, max_prompt_length: int) -> list[dict]:
    """The paper filters over-long prompts (filter_overlong_prompts) instead of truncating them."""
    kept = []
    for record in records:
        messages = [{"role": "user", "content": rl_prompt_text(record["question"], domain)}]
        n_tokens = len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"])
        if n_tokens <= max_prompt_length:
            kept.append(record)
    return kept


def grpo_settings(recipe: GRPORecipe, lr: float, backend: str) -> dict[str, Any]:
    """The effective settings, logged as ``grpo.*`` params so runs can be compared on them."""
    return {
        "num_generations": recipe.num_generations,
        "prompts_per_generation": recipe.prompts_per_generation,
        "completions_per_generation": recipe.prompts_per_generation * recipe.num_generations,
        "updates_per_generation": recipe.updates_per_generation,
        "micro_batch_size": recipe.micro_batch_size,
        "grad_accum": recipe.grad_accum,
        "max_steps": recipe.max_steps,
        "learning_rate": lr,
        "lr_scheduler_type": recipe.lr_scheduler_type,
        "weight_decay": recipe.weight_decay,
        "max_grad_norm": recipe.max_grad_norm,
        "epsilon": recipe.epsilon,
        "epsilon_high": recipe.epsilon_high if recipe.epsilon_high is not None else recipe.epsilon,
        "delta": recipe.delta,
        "beta": recipe.beta,
        "kl": "on" if recipe.beta else "off",
        "loss_type": recipe.loss_type,
        "loss_aggregation": "token-mean" if recipe.loss_type == "dapo" else recipe.loss_type,
        "scale_rewards": recipe.scale_rewards,
        "temperature": recipe.temperature,
        "top_p": recipe.top_p,
        "max_completion_length": recipe.max_completion_length,
        "max_prompt_length": recipe.max_prompt_length,
        "format_reward_weight": recipe.format_reward_weight,
        "disable_dropout": recipe.disable_dropout,
        "generation_backend": backend,
        "seed": recipe.seed,
    }


def train_grpo(model_source: str, tokenizer_source: str, method: str, method_options: dict, records: list[dict],
               domain: str, recipe: GRPORecipe, output_dir: str, tracker, *,
               reward_funcs: list[Callable] | None = None, extra_callbacks: list | tuple = (), save_steps: int = -1,
               resume: bool = False) -> dict:
    """Train ``method`` on ``records`` with GRPO; save the trained artifact under ``output_dir/adapter``.

    ``reward_funcs``: TRL reward functions to use instead of the domain's correctness reward (and the optional
    format reward); the first one is the one whose mean is logged as ``train/accuracy``.
    ``extra_callbacks``: more TrainerCallbacks (the forgetting monitor, :mod:`peft_arena.training.monitor`).
    ``save_steps`` and ``resume``: checkpoints and resume (``training/checkpoints.py``); guards:
    ``training/guards.py``.

    Returns adapter_dir, trainable_params, total_params, label, steps, final_reward, final_accuracy,
    first_reward, history (one dict of curves per logged step) and generation_backend.
    """
    from trl import GRPOConfig, GRPOTrainer

    spec = get_method(method)
    options = spec.resolve(method_options)
    if recipe.beta and spec.name == "adalora":
        raise MethodError("adalora cannot run GRPO with a KL term (grpo.beta > 0): TRL's KL reference is a second "
                          "adapter and peft's AdaLoRA allows only one trainable adapter; use grpo.beta=0 (the paper's)")
    lr = recipe.learning_rate if recipe.learning_rate is not None else spec.grpo_lr
    backend = generation_backend(recipe.use_vllm)
    tokenizer = load_tokenizer(tokenizer_source)
    tokenizer.padding_side = "left"  # generation pads on the left

    records = drop_long_prompts(records, tokenizer, domain, recipe.max_prompt_length)
    if len(records) < recipe.prompts_per_generation:
        raise ValueError(f"{len(records)} prompts fit max_prompt_length={recipe.max_prompt_length}, fewer than "
                         f"prompts_per_generation={recipe.prompts_per_generation}: add data or lower it")
    dataset = grpo_dataset(records, domain)

    torch.manual_seed(recipe.seed)
    cuda = torch.cuda.is_available()
    # multi-process jobs: each process loads onto its own GPU (LOCAL_RANK); FSDP/DeepSpeed place the weights
    # themselves, so there the base is loaded on the host in fp32 as before (unless grpo.precision says otherwise)
    local = os.environ.get("LOCAL_RANK")
    sharded = distributed.is_worker() and os.environ.get("ACCELERATE_USE_FSDP", os.environ.get(
        "ACCELERATE_USE_DEEPSPEED", "false")).lower() == "true"
    dtype = precision.resolve_dtype(recipe.precision, cuda and not sharded)
    device = None if not cuda or sharded else f"cuda:{local if local is not None else torch.cuda.current_device()}"
    model = precision.load_base_for_training(model_source, dtype, recipe.attn_implementation, device=device)
    ctx = BuildContext(defer_calibration=spec.needs_calibration, train="grpo", total_steps=recipe.max_steps,
                       seed=recipe.seed)
    model = spec.build(model, options, ctx)
    lean.prepare(model, dtype, cuda)  # peft's adapter math without fp32 copies and full-size temporaries
    if recipe.beta and spec.rewrites_base:
        # TRL's KL reference is a copy of the adapter added through peft's add_adapter, which would run the
        # SVD init again on the already-residual base; the copy must start from the current weights instead.
        _plain_init_for_reference_copy(model)
    trainable, total = ops.count_parameters(model)

    if reward_funcs:
        reward_funcs = list(reward_funcs)
        reward_weights = [1.0] * len(reward_funcs)
    else:
        reward_funcs, reward_weights = [correctness_reward(domain)], [1.0]
        if recipe.format_reward_weight:
            reward_funcs.append(format_reward)
            reward_weights.append(recipe.format_reward_weight)
    correctness = reward_funcs[0]
    recorder = CompletionsRecorder()
    recorder.set_order(reward_funcs)
    reward_funcs = [recorder.wrap(fn) for fn in reward_funcs]

    settings = grpo_settings(recipe, lr, backend)
    tracker.log_params({f"grpo.{k}": v for k, v in settings.items()})
    tracker.log_params({"method_label": spec.label(options),
                        **{f"method.{k}": v for k, v in options.items()}})
    tracker.set_tags({"arena.generation_backend": backend})
    tracker.log_metrics({"arena/trainable_params": trainable, "arena/total_params": total,
                         "arena/train_prompts": len(records)})

    out = Path(output_dir)
    ckpt = checkpoints.prepare(tracker, out / "trainer", save_steps, recipe.max_steps, resume)
    args = GRPOConfig(
        output_dir=str(out / "trainer"),
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.micro_batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        steps_per_generation=recipe.updates_per_generation * recipe.grad_accum,
        num_generations=recipe.num_generations,
        num_iterations=1,  # paper ppo_epochs = 1
        learning_rate=lr,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=0,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        epsilon=recipe.epsilon,
        epsilon_high=recipe.epsilon_high,
        delta=recipe.delta,
        beta=recipe.beta,
        loss_type=recipe.loss_type,
        scale_rewards=recipe.scale_rewards,
        reward_weights=reward_weights,
        temperature=recipe.temperature,
        top_p=recipe.top_p,
        max_completion_length=recipe.max_completion_length,
        gradient_checkpointing=recipe.gradient_checkpointing,
        disable_dropout=recipe.disable_dropout,
        logging_steps=recipe.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the guards
        **ckpt.args,
        report_to="none",  # the stable curves (CURVES) go through the tracker; no TrainingArguments dump
        use_cpu=not cuda,
        bf16=cuda,
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
        **(vllm_settings(recipe) if backend == "vllm" else {"use_vllm": False}),
    )
    optimizer = (spec.make_optimizer(model, options, lr, recipe.weight_decay, (args.adam_beta1, args.adam_beta2))
                 if spec.make_optimizer else None)
    callbacks = list(spec.callbacks(model, options, ctx)) if spec.callbacks else []
    logging_callback = _arena_callback(tracker, recorder, recipe, correctness.__name__)
    probe_rows = [dataset[i] for i in range(min(len(dataset), recipe.prompts_per_generation))]
    probe = (keeplora_calibration_batch(probe_rows, tokenizer)  # prompts + reference answers, when the data has them
             if all(r.get("answer") for r in probe_rows) else None)
    # no divergence rule on the loss: the GRPO loss is a signed surrogate; non-finite, weights and probe checks
    guard = guards.guard_callback(lr, probe=probe, probe_factor=guards.GRPO_PROBE_FACTOR)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=[*callbacks, guard, *ckpt.callbacks, logging_callback, *extra_callbacks],
    )
    tracker.set_tags(distributed.describe(trainer))  # also refuses an engine other than the one asked for
    if spec.needs_calibration:  # KeepLoRA: from the prompts of the trainer's own first generation round
        rows = first_generation_rows(trainer)
        spec.calibrate(trainer.model, options, keeplora_calibration_batch(rows, tokenizer))
        tracker.log_params({"calibration_examples": len(rows)})
        if "ref" in getattr(trainer.model, "peft_config", {}):
            _copy_adapter(trainer.model, "default", "ref")  # TRL copied the adapter before it was initialised
    with guards.overflow_is_divergence(lr):
        trainer.train(resume_from_checkpoint=str(ckpt.resume_from) if ckpt.resume_from else None)
    guard.check_final(trainer.model)

    trained = trainer.model
    if recipe.beta and "ref" in getattr(trained, "peft_config", {}):
        trained.delete_adapter("ref")  # TRL's frozen KL reference is not part of the result
    adapter_dir = distributed.save_trained(trainer, trained, spec, options, out / "adapter",
                                           base_model=short_name(model_source), base_source=model_source,
                                           tokenizer=tokenizer)
    tracker.log_artifacts(adapter_dir, "adapter")
    ckpt.finish()
    trainer.accelerator.wait_for_everyone()  # rank 0 has uploaded the adapter before any process cleans up

    history = logging_callback.history
    logged = trainer.state.log_history  # the whole run's, a resumed run's included
    rewards = [float(h["reward"]) for h in logged if "reward" in h]
    accuracies = [float(h[f"rewards/{correctness.__name__}/mean"]) for h in logged
                  if f"rewards/{correctness.__name__}/mean" in h]
    summary = {
        "train/first_reward": rewards[0] if rewards else math.nan,
        "train/final_reward": rewards[-1] if rewards else math.nan,
        "train/final_accuracy": accuracies[-1] if accuracies else math.nan,
    }
    tracker.log_metrics(summary)
    return {
        "adapter_dir": str(adapter_dir), "trainable_params": trainable, "total_params": total,
        "label": spec.label(options), "steps": recipe.max_steps, "learning_rate": lr,
        "generation_backend": backend, "first_reward": summary["train/first_reward"],
        "final_reward": summary["train/final_reward"], "final_accuracy": summary["train/final_accuracy"],
        "history": history,
    }


def _copy_adapter(peft_model, source: str, target: str) -> None:
    """Copy adapter ``source``'s weights into adapter ``target`` (as TRL builds its KL reference adapter)."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f".{source}." in name:
                peft_model.get_parameter(name.replace(f".{source}.", f".{target}.")).copy_(param)


def _plain_init_for_reference_copy(peft_model) -> None:
    for config in peft_model.peft_config.values():
        if hasattr(config, "init_lora_weights"):
            config.init_lora_weights = True
