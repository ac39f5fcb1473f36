"""Multi-process training through ``accelerate launch``: which strategy, who is rank 0, how the adapter is saved.

``num_processes > 1`` makes the CLI start itself again under ``accelerate launch`` with one of the shipped
accelerate configs (``peft_arena/assets/accelerate/``): ``ddp`` (data parallel; gloo on CPU, NCCL on GPUs),
``fsdp`` (FSDP2, ``fully_shard`` per decoder layer) or ``deepspeed`` (ZeRO-3), or a user's accelerate YAML.
Every process trains; only rank 0 talks to MLflow (the others get a :class:`~peft_arena.tracking.tracker.NullTracker`)
and only rank 0 writes the trained artifact. The batch size stays *per process*: the global batch is
``batch_size × grad_accum × num_processes`` (GRPO: ``prompts_per_generation`` prompts per process and round).
Losses and rewards that reach MLflow are the trainer's logged values, averaged over every process's batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "accelerate"
STRATEGIES = {
    "ddp": "ddp.yaml",  # DistributedDataParallel: every process holds the whole model
    "fsdp": "fsdp2.yaml",  # FSDP2: parameters, gradients and optimizer state sharded per decoder layer
    "deepspeed": "deepspeed_zero3.yaml",  # DeepSpeed ZeRO-3 (needs `pip install deepspeed` on CUDA machines)
}
DEEPSPEED_JSON = "deepspeed_zero3.json"


# ------------------------------------------------------------------------------------------------ where am I


def world_size() -> int:
    """Processes in this training job (1 outside ``accelerate launch`` / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_worker() -> bool:
    """True inside a process that ``accelerate launch`` (torchrun) started for a multi-process job."""
    return world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


# ------------------------------------------------------------------------------------------------ launching


def config_file(strategy: str) -> Path:
    """The accelerate YAML for a strategy name, or the user's own YAML."""
    if strategy in STRATEGIES:
        return ASSETS / STRATEGIES[strategy]
    path = Path(strategy)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    raise ValueError(f"distributed={strategy!r}: use {', '.join(STRATEGIES)} or the path of an accelerate "
                     "config YAML (`accelerate config --config_file my.yaml`)")


def distributed_type(strategy: str) -> str:
    """accelerate's ``distributed_type`` of a strategy (``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``…)."""
    data = yaml.safe_load(config_file(strategy).read_text()) or {}
    return str(data.get("distributed_type", "MULTI_GPU")).upper()


def check_strategy(strategy: str, method_spec, cuda: bool | None = None) -> None:
    """Fail before launching what cannot run as asked (never let it quietly run as something else)."""
    kind = distributed_type(strategy)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if kind in ("FSDP", "DEEPSPEED") and not cuda:
        raise ValueError(f"distributed={strategy} ({kind}) needs GPUs: accelerate runs FSDP and DeepSpeed only on "
                         "accelerators (on CPU it would quietly fall back to plain data parallel); use "
                         "distributed=ddp here")
    check_method(strategy, method_spec)


def check_method(strategy: str, method_spec) -> None:
    """Fail before launching when a method cannot be saved from sharded parameters.

    PiSSA/MiLoRA convert their adapter against a copy of the initial adapter, and KeepLoRA writes its own
    (B − B₀, A₀) folder: both need the live, unsharded modules, which FSDP and ZeRO-3 do not keep.
    """
    if distributed_type(strategy) in ("FSDP", "DEEPSPEED") and (
            method_spec.rewrites_base or method_spec.save_adapter is not None):
        raise ValueError(f"method {method_spec.name!r} saves its adapter from the live unsharded model, which "
                         f"distributed={strategy} shards; use distributed=ddp for it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(verb: str, argv: list[str], num_processes: int, strategy: str) -> list[str]:
    """``accelerate launch`` running ``peft-arena <verb> <argv>`` in ``num_processes`` processes on this machine."""
    path = config_file(strategy)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
           "--num_processes", str(num_processes), "--num_machines", "1",
           "--main_process_port", os.environ.get("PEFT_ARENA_MAIN_PROCESS_PORT") or str(_free_port())]
    if distributed_type(strategy) == "DEEPSPEED" and strategy in STRATEGIES:
        cmd += ["--deepspeed_config_file", str(ASSETS / DEEPSPEED_JSON)]
    return [*cmd, "-m", "peft_arena.cli", verb, *argv]


def launch(verb: str, argv: list[str], num_processes: int, strategy: str, run_id: str) -> int:
    """Run the training processes; they resume MLflow run ``run_id`` (rank 0 logs). Returns the exit code."""
    if distributed_type(strategy) == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise RuntimeError("distributed=deepspeed needs DeepSpeed: `pip install deepspeed` on the CUDA machine "
                               "(or use distributed=fsdp, which needs nothing beyond torch)")
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "PEFT_ARENA_RUN_ID": run_id,
           "PEFT_ARENA_NO_SWEEP": "1"}  # the launcher checked the store already; the workers only train
    print(f"[peft-arena] {verb}: {num_processes} processes through accelerate launch ({strategy}), "
          f"MLflow run {run_id} (rank 0 logs)", file=sys.stderr)
    # the workers' console output goes to stderr: stdout carries only the launcher's own result (--json)
    return subprocess.call(launch_command(verb, argv, num_processes, strategy), env=env, stdout=sys.stderr)


# ------------------------------------------------------------------------------------------------ in the workers


def shards_parameters(trainer) -> bool:
    """True when the trainer's engine keeps each parameter in pieces across processes (FSDP, ZeRO-3)."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    if acc.distributed_type == DistributedType.FSDP:
        return True
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return acc.state.deepspeed_plugin.zero_stage == 3
    return False


def describe(trainer) -> dict[str, str]:
    """Tags saying how the job ran: processes, accelerate's distributed type, FSDP version / ZeRO stage."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    for flag, wanted in (("ACCELERATE_USE_FSDP", DistributedType.FSDP), ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(flag, "false").lower() == "true" and acc.distributed_type != wanted:
            raise RuntimeError(f"{wanted.value} was asked for but accelerate set up {acc.distributed_type.value}; "
                               "refusing to train under a different engine than the one requested")
    tags = {"arena.num_processes": str(acc.num_processes), "arena.distributed": str(acc.distributed_type.value)}
    if acc.distributed_type == DistributedType.FSDP:
        tags["arena.fsdp_version"] = str(acc.state.fsdp_plugin.fsdp_version)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        tags["arena.zero_stage"] = str(acc.state.deepspeed_plugin.zero_stage)
    return tags


def save_trained(trainer, model, spec, options, out_dir: str | Path, **record) -> Path:
    """Write the trained artifact once (rank 0), gathering sharded parameters first; every process calls this.

    ``record``: ``base_model``, ``base_source``, ``tokenizer`` as :func:`peft_arena.methods.ops.save_trained` takes.
    """
    from peft_arena.methods import ops

    out = Path(out_dir)
    state_dict = None
    if trainer.accelerator.num_processes > 1 and shards_parameters(trainer):
        if spec.rewrites_base or spec.save_adapter is not None:
            raise ValueError(f"method {spec.name!r} cannot be saved from sharded parameters; train it with ddp")
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: every rank joins
    if trainer.accelerator.is_main_process:
        ops.save_trained(model, spec, options, out, state_dict=state_dict, **record)
    trainer.accelerator.wait_for_everyone()
    return out
