"""Screenshots of the MLflow UI on the demo's store, for the README (docs/ui/*.png).

Starts ``make ui`` (the demo store, on a free port), waits until it answers, and photographs a few pages with a
real headless browser (Chromium from the system packages: ``apt-get install chromium``), then stops the UI.

    make demo && python scripts/screenshots.py            # writes docs/ui/*.png
    python scripts/screenshots.py --store other/mlflow.db --out /tmp/shots

Fails with a one-line reason when Chromium, the store or the UI is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("screenshots: no Chromium found; install it with `apt-get install chromium`")


def _wait(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"screenshots: `make ui` exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"screenshots: the MLflow UI did not answer at {url} within {seconds:.0f} s")


def _pages(store: Path) -> list[tuple[str, str]]:
    """(file name, URL fragment) of the pages to photograph, found in the store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", "peft-arena-demo"))
    if exp is None:
        sys.exit(f"screenshots: no experiment 'peft-arena-demo' in {store}; run `make demo` first")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("arena.stage", ""), []).append(r)
    e = exp.experiment_id
    pages = [("runs-table", f"#/experiments/{e}/runs"),
             ("charts", f"#/experiments/{e}/runs?compareRunsMode=CHART")]
    evals = [r for r in by_stage.get("evaluate", []) if r.data.tags.get("arena.is_base") == "false"]
    if evals:
        pages.append(("evaluate-run", f"#/experiments/{e}/runs/{evals[0].info.run_id}"))
    if by_stage.get("report"):
        report = by_stage["report"][0].info.run_id
        pages.append(("report-pareto", f"#/experiments/{e}/runs/{report}/artifacts/pareto.png"))
    models = client.search_registered_models()
    if models:
        pages.append(("registry-model", f"#/models/{models[0].name}"))
    return pages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="demo_arena/mlflow.db", help="the sqlite store `make demo` wrote")
    ap.add_argument("--out", default="docs/ui", help="folder for the PNG files")
    ap.add_argument("--width", type=int, default=1600, help="browser window width in pixels")
    ap.add_argument("--height", type=int, default=900, help="browser window height in pixels")
    ap.add_argument("--wait", type=int, default=20000, help="ms of page time before each screenshot")
    args = ap.parse_args()

    store = Path(args.store).resolve()
    if not store.exists():
        sys.exit(f"screenshots: {store} not found; run `make demo` first")
    browser = _browser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    venv = ROOT / ".venv"
    make_args = ["make", "-s", "-C", str(ROOT), "ui", f"PORT={port}", f"STORE={store}"]
    if not (venv / "bin" / "mlflow").exists():  # run from another environment: use this interpreter's mlflow
        make_args.append(f"VENV={Path(sys.executable).parent.parent}")
    ui = subprocess.Popen(make_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}/"
        _wait(base + "health", ui)
        for name, fragment in _pages(store):
            target = out / f"{name}.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--no-zygote", "--hide-scrollbars",
                            f"--window-size={args.width},{args.height}", f"--virtual-time-budget={args.wait}",
                            f"--screenshot={target.resolve()}", base + fragment],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
            print(f"{target}  ({base}{fragment})")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the UI and the server workers it started, nothing else
        time.sleep(10)
        try:
            os.killpg(ui.pid, signal.SIGKILL)  # what did not stop on SIGTERM (the mlflow process outlives make)
        except ProcessLookupError:
            pass
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
