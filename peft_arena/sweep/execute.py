"""Running a sweep's chains: one subprocess per chain, ``parallel`` at once, one GPU per worker slot.

Worker slot ``k`` runs its chains with ``CUDA_VISIBLE_DEVICES`` set to the ``k``-th GPU (round robin when there
are more slots than GPUs), so on a multi-GPU machine each chain has a GPU to itself. A chain process that dies
without writing its result (killed, out of memory) counts as a failed chain, and the runs it left RUNNING are
ended FAILED with the reason.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from peft_arena.sweep.plan import Chain
from peft_arena.tracking import sweep as tracking


def visible_gpus(spec: str = "") -> list[str]:
    """GPU ids to spread chains over: ``spec`` (comma list), else ``CUDA_VISIBLE_DEVICES``, else every GPU torch
    sees (none on a CPU machine)."""
    if spec.strip():
        return [g.strip() for g in spec.split(",") if g.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA runtime: a CPU machine
        return []


def slot_devices(parallel: int, gpus: list[str]) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each worker slot (None: leave the environment as it is)."""
    return [gpus[k % len(gpus)] if gpus else None for k in range(parallel)]


def _package_root() -> str:
    import peft_arena

    return str(Path(peft_arena.__file__).resolve().parent.parent)


def chain_env(experiment_id: str, device: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    env["MLFLOW_EXPERIMENT_ID"] = experiment_id
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def run_process(spec: dict, workdir: Path, name: str, device: str | None) -> dict:
    """Run one chain (or the report) process; its outcome, or a failure when it died without writing one."""
    spec_path, result_path, log_path = (workdir / f"{name}.json", workdir / f"{name}.result.json",
                                        workdir / f"{name}.log")
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=2))
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "peft_arena.sweep.chain", str(spec_path)], stdout=log,
                              stderr=subprocess.STDOUT, env=chain_env(spec["experiment_id"], device))
    if result_path.exists():
        outcome = json.loads(result_path.read_text())
    else:
        reason = (f"the chain process exited with code {proc.returncode} before recording its outcome "
                  f"(see sweep/logs/{name}.log)")
        ended = tracking.fail_running_children(spec["parent_run_id"], name, reason)
        outcome = {"chain": name, "status": "failed", "error": reason, "stages": [], "ended_runs": ended}
    outcome.update({"device": device, "seconds": round(time.time() - started, 1), "log": str(log_path)})
    return outcome


def run_chains(chains: list[Chain], parent_run_id: str, experiment_id: str, workdir: Path, parallel: int,
               gpus: list[str], fresh: bool, on_done: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Every chain, ``parallel`` at once; outcomes in plan order."""
    workdir.mkdir(parents=True, exist_ok=True)
    free: queue.Queue = queue.Queue()
    for device in slot_devices(parallel, gpus):
        free.put(device)
    lock, done = threading.Lock(), [0]

    def one(chain: Chain) -> dict:
        device = free.get()
        try:
            outcome = run_process({"chain": chain.to_dict(), "parent_run_id": parent_run_id,
                                   "experiment_id": experiment_id, "fresh": fresh}, workdir, chain.key, device)
        finally:
            free.put(device)
        with lock:
            done[0] += 1
            if on_done:
                on_done(outcome, done[0], len(chains))
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, chains))
