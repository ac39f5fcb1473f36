"""Shared test setup: one CPU thread, no hub access, a private MLflow store per test that asks for one."""

import os

# Before torch is imported anywhere: with a second busy core, two OpenMP threads made torch 50-100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import pytest  # noqa: E402


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite tracking store in tmp_path, used as the working directory too."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID into os.environ: an id of this store must not follow
    # the next test into another one
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def tiny_source() -> str:
    from peft_arena.models import ensure_tiny

    return str(ensure_tiny())


# ----------------------------------------------------------------------------------------------- reliability probes
# A test marked ``@pytest.mark.probe(area, fault)`` (tests/test_reliability.py) is one hostile input or fault. The
# session ends with the figures: probes tried / handled, per area (a probe is handled when its test passed).
_PROBES: dict[str, tuple[str, str, str]] = {}  # nodeid -> (area, fault, outcome)


def pytest_configure(config):
    config.addinivalue_line("markers", "probe(area, fault): a reliability probe; counted in the session's "
                                       "'probes tried / handled' summary")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("probe")
        if marker is not None:
            area, fault = (list(marker.args) + ["?", item.name])[:2]
            item.user_properties.append(("probe", (area, f"{fault} [{item.callspec.id}]"
                                                   if hasattr(item, "callspec") else fault)))


def pytest_runtest_logreport(report):
    probe = dict(report.user_properties).get("probe")
    if probe is None:
        return
    if report.when == "call" or report.outcome != "passed":  # a setup error counts as tried and not handled
        previous = _PROBES.get(report.nodeid, (None, None, "passed"))[2]
        outcome = report.outcome if previous == "passed" else previous
        _PROBES[report.nodeid] = (*probe, outcome)


def pytest_terminal_summary(terminalreporter):
    tried = {k: v for k, v in _PROBES.items() if v[2] != "skipped"}
    if not tried:
        return
    tr = terminalreporter
    tr.section("reliability probes")
    by_area: dict[str, list[int]] = {}
    for area, _fault, outcome in tried.values():
        counts = by_area.setdefault(area, [0, 0])
        counts[0] += 1
        counts[1] += outcome == "passed"
    for area, (n, ok) in sorted(by_area.items()):
        tr.write_line(f"  {area:<12} {ok:>3} / {n:<3} handled")
    for area, fault, outcome in sorted(tried.values()):
        if outcome != "passed":
            tr.write_line(f"  NOT HANDLED  {area}: {fault}")
    handled = sum(v[2] == "passed" for v in tried.values())
    tr.write_line(f"probes tried: {len(tried)}, handled: {handled}")
