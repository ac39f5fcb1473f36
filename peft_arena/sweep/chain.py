"""One chain of an arena sweep, run in its own process: ``python -m peft_arena.sweep.chain SPEC.json``.

For each stage of the chain, in order: reuse the newest FINISHED run with the same config hash (about the same
training run), or create a child run under the sweep's parent and run the stage in it (``cli.run_stage``, the
code every entry point runs). A failed stage ends its run FAILED (``arena.error``) and the chain stops there; the
rest of the sweep goes on in other processes. The chain's outcome is written to the spec's ``result`` path.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from peft_arena.sweep.plan import Chain, stage_inputs
from peft_arena.tracking import sweep as tracking


def lookup(chain: Chain, stage: str, upstream: dict, experiment_id: str | None, fresh: bool) -> dict:
    """What the sweep does with ``stage`` now: ``{"action": "reuse", "run_id", "tags"}``, ``{"action": "run"}``
    or ``{"action": "retry", "previous": {run_id, error}}`` (the newest run with this hash did not finish)."""
    verb, digest = chain.verb(stage), chain.hashes[stage]
    if not fresh:
        found = tracking.find_finished(verb, digest, experiment_id,
                                       source_run=upstream.get("train_run") if stage != "train" else None)
        if found is not None:
            return {"action": "reuse", **found}
    failed = tracking.last_failure(verb, digest, experiment_id)
    return {"action": "retry", "previous": failed} if failed else {"action": "run"}


def absorb(stage: str, run_id: str, facts: dict, upstream: dict) -> None:
    """Carry what later stages need from a finished stage (its result dict or its run's tags)."""
    if stage == "train":
        upstream["train_run"] = run_id
    elif stage == "promote":
        uri = facts.get("model_uri") or facts.get("arena.model_uri")
        if not uri:
            raise RuntimeError(f"promote run {run_id} records no model URI (tag arena.model_uri)")
        upstream["model_uri"] = uri


@contextmanager
def _serialised(lock_dir: str | None, name: str):
    """Hold an exclusive file lock under ``lock_dir`` (shared by the sweep's chain processes) for the block."""
    if not lock_dir:
        yield
        return
    import fcntl

    path = Path(lock_dir) / f"{name}.lock"
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_chain(chain: Chain, parent_run_id: str, experiment_id: str, fresh: bool = False,
              lock_dir: str | None = None) -> dict:
    """Run (or reuse) every stage of ``chain``. Promotions of chains into the same registered model (same base
    and domain) take turns through a file lock in ``lock_dir``, so parallel chains never race to create the
    model or move its ``candidate`` alias."""
    from peft_arena.cli import run_stage

    upstream: dict = {}
    stages: list[dict] = []
    failed = False
    for stage in chain.stages:
        verb = chain.verb(stage)
        if failed:
            stages.append({"stage": verb, "status": "skipped", "reason": "an earlier stage of the chain failed"})
            continue
        decision = lookup(chain, stage, upstream, experiment_id, fresh)
        if decision["action"] == "reuse":
            absorb(stage, decision["run_id"], decision["tags"], upstream)
            stages.append({"stage": verb, "status": "reused", "run_id": decision["run_id"]})
            print(f"[arena] {chain.key}: {verb} reused (run {decision['run_id']})", file=sys.stderr, flush=True)
            continue
        run_id = tracking.create_child_run(parent_run_id, experiment_id, verb, chain.key, chain.hashes[stage])
        os.environ["MLFLOW_RUN_ID"] = run_id  # the stage resumes it, as under `mlflow run`
        started = time.time()
        print(f"[arena] {chain.key}: {verb} in run {run_id}", file=sys.stderr, flush=True)
        try:
            turn = f"promote-{chain.base_model}-{chain.domain}".replace("/", "_") if stage == "promote" else None
            with _serialised(lock_dir if turn else None, turn or ""):
                result = run_stage(verb, None, stage_inputs(chain, stage, upstream))
            absorb(stage, run_id, result, upstream)
            stages.append({"stage": verb, "status": "finished", "run_id": run_id,
                           "seconds": round(time.time() - started, 1),
                           **({"retried": decision["previous"]["run_id"]} if decision["action"] == "retry" else {})})
        except Exception as exc:  # the stage's run is FAILED with the reason; the chain stops, the sweep goes on
            traceback.print_exc()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            stages.append({"stage": verb, "status": "failed", "run_id": run_id, "error": f"{type(exc).__name__}: "
                           f"{message}", "seconds": round(time.time() - started, 1)})
            failed = True
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
    return {"chain": chain.key, "status": "failed" if failed else "finished", "stages": stages,
            "train_run": upstream.get("train_run"), "model_uri": upstream.get("model_uri")}


def run_report(overrides: dict, parent_run_id: str, experiment_id: str) -> dict:
    """The sweep's closing report, as one more child run (never reused: the store changed)."""
    from peft_arena.cli import run_stage

    run_id = tracking.create_child_run(parent_run_id, experiment_id, "report", "report", "-")
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        result = run_stage("report", None, overrides)
        return {"chain": "report", "status": "finished", "run_id": run_id, "output_dir": result.get("output_dir")}
    except Exception as exc:
        traceback.print_exc()
        return {"chain": "report", "status": "failed", "run_id": run_id, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m peft_arena.sweep.chain SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if "report" in spec:
        outcome = run_report(spec["report"], spec["parent_run_id"], spec["experiment_id"])
    else:
        chain = Chain.from_dict(spec["chain"])
        outcome = run_chain(chain, spec["parent_run_id"], spec["experiment_id"], bool(spec.get("fresh")),
                            lock_dir=str(Path(spec["result"]).parent))
    Path(spec["result"]).write_text(json.dumps(outcome, indent=2))
    return 0 if outcome["status"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
