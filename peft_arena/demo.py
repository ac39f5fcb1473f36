"""``peft-arena demo``: a small arena on the embedded model, every stage once, in its own MLflow store.

SFT with LoRA and with OFT on the bundled medical sample, promote both, evaluate the base and both versions by
registry URI, a spectral profile of each, the champion policy, and the report. Each stage is the same code the
entry points run (`run_stage`), one MLflow run each, in ``<dir>/mlflow.db``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from peft_arena.cli import run_stage

# The demo trains on the medical domain: multiple-choice targets are where a 135M model scores above zero after a
# few CPU steps (it scores ~0 on MATH-500 and GSM8K either way), so gain and forgetting both show.
DOMAIN = "med"
# The paper's medical target (every medical benchmark) and general average (IFEval, NQ, BBH), so both averages hold.
DEMO_SUITE = "medqa,medmcqa,pubmedqa,mmlu_medical,ifeval,nq,bbh"
# Sized so the whole demo takes about 5 minutes of one CPU core with SmolLM2-135M (OMP_NUM_THREADS=1): SFT of 5
# steps × 2 sequences (the loss visibly falls), 3 items per benchmark with short answers, spectral profiles of
# every 4th layer (all 7 module types). A smoke run of the pipeline, not a benchmark: the scores are subsets.
FULL = {"base": "smollm2-135m", "steps": 5, "batch_size": 2, "limit": 16, "eval_limit": 3, "n_samples": 1,
        "max_new_tokens": 32, "spectral_layers": "0,4,8,12,16,20,24,28"}
FAST = {"base": "tiny", "steps": 2, "batch_size": 4, "limit": 8, "eval_limit": 2, "n_samples": 1, "max_new_tokens": 8,
        "spectral_layers": ""}


def ui_command(db: Path) -> str:
    """The command that opens the MLflow UI on ``db``, runnable as printed: ``make ui`` for the default store in
    the project folder, else this interpreter's own ``mlflow`` (the virtualenv's, which may not be on PATH)."""
    here = Path.cwd()
    if db == (here / "demo_arena" / "mlflow.db").resolve() and (here / "Makefile").exists():
        return "make ui"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return f"{mlflow_bin if mlflow_bin.exists() else 'mlflow'} ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000"


def _say(step: int, total: int, text: str, started: float) -> None:
    print(f"\n[demo {step}/{total}] {text}  (t+{time.time() - started:.0f}s)", file=sys.stderr, flush=True)


def run_demo(directory: str = "demo_arena", fast: bool = False) -> dict:
    size = FAST if fast else FULL
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    db = root / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # an id from another store (set_experiment exports one) means nothing here
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "peft-arena-demo")
    outputs = str(root / "outputs")
    common_train = {"base_model": size["base"], "domain": DOMAIN, "max_steps": size["steps"],
                    "batch_size": size["batch_size"], "limit": size["limit"], "output_dir": outputs}
    # Limits and bundled samples make every demo evaluation provisional: the policy refuses them (and says why)
    # and the report shows them only because it is asked to, flagged as provisional.
    common_eval = {"suite": DEMO_SUITE, "limit": size["eval_limit"], "n_samples": size["n_samples"],
                   "max_new_tokens": size["max_new_tokens"]}
    total, started, results = 9, time.time(), {}

    trained = {}
    for i, (method, options) in enumerate((("lora", {}), ("oft", {"method.block_size": 32})), start=1):
        _say(i, total, f"SFT {method} on the {DOMAIN} sample ({size['steps']} steps of {size['batch_size']}, "
                       f"{size['base']})", started)
        trained[method] = run_stage("train_sft", None, {**common_train, "adapter": method, **options})

    versions = {}
    for i, method in enumerate(trained, start=3):
        _say(i, total, f"promote {method}: merge into the base, register, alias candidate", started)
        versions[method] = run_stage("promote", None, {"source_run": trained[method]["run_id"]})

    _say(5, total, "evaluate the base model (cached for the others' gain/forgetting)", started)
    results["base"] = run_stage("evaluate", None, {**common_eval, "model_uri": size["base"]})
    name = versions["lora"]["name"]
    uris = {"lora": f"models:/{name}/{versions['lora']['version']}", "oft": f"models:/{name}@candidate"}
    _say(6, total, f"evaluate both versions by registry URI: {uris['lora']} and {uris['oft']}", started)
    for method, uri in uris.items():
        results[method] = run_stage("evaluate", None, {**common_eval, "model_uri": uri})

    layers = f"layers {size['spectral_layers']}" if size["spectral_layers"] else "every layer"
    _say(7, total, f"spectral profile of each trained model against the base ({layers})", started)
    for method in trained:
        run_stage("spectral", None, {"model_uri": f"runs:/{trained[method]['run_id']}/adapter",
                                     **({"layers": size["spectral_layers"]} if size["spectral_layers"] else {})})

    _say(8, total, "champion policy (registry/policy.yaml) on the evaluated versions", started)
    policy = Path(__file__).resolve().parent.parent / "registry" / "policy.yaml"
    for method in trained:
        decision = run_stage("promote", None, {"alias": "champion", "policy": str(policy),
                                               "model_uri": f"models:/{name}/{versions[method]['version']}"})
        verdict = "champion" if decision["promoted"] else "not champion"
        print(f"  {method} (version {decision['version']}): {verdict}: {'; '.join(decision['reasons'])}",
              file=sys.stderr)

    _say(9, total, "report: leaderboard, Pareto plot, family summary, method grid", started)
    run_stage("report", None, {"output_dir": str(root / "report"), "include_provisional": True})

    minutes, cpu = (time.time() - started) / 60, time.process_time() / 60
    print(f"\n[demo] done in {minutes:.1f} min ({cpu:.1f} min of CPU). Open the MLflow UI on the demo's store (then http://127.0.0.1:5000):"
          f"\n  {ui_command(db)}", file=sys.stderr)
    return {"trained": trained, "versions": versions, "evaluations": results, "store": str(db)}
