"""Reliability probes (issue 15): every hostile input and fault found so far, kept as a regression test.

Each test is one probe, marked ``@probe(area, fault)``: it feeds the fault in and asserts that it is *handled*
(refused before it costs anything with a one-line error, or ended FAILED with the reason in ``arena.error``,
or cleaned up, with nothing half-done left behind). ``tests/conftest.py`` counts the probes and prints the
figures at the end of the session::

    ===== reliability probes =====
      registry      12 / 12  handled
      ...
    probes tried: 40, handled: 40

Areas (one section each below, so that additions merge cleanly):
  ``inputs``    bad settings refused up front (numbers, paths, names)           — training side
  ``training``  divergence, non-finite loss/grad norm, checkpoints and resume    — training side
  ``runs``      a run whose process died does not stay RUNNING (heartbeat, ``peft-arena doctor``)
  ``registry``  promote gates, atomic registration, concurrency of model creation, aliases, base evaluation
  ``stages``    spectral without an update, ``report`` on any subset of benchmarks
  ``disk``      local output copies and the download cache are pruned

Keep every probe small: the tiny model (``peft_arena.models.ensure_tiny``), a sqlite store in ``tmp_path``.
"""

from __future__ import annotations

import pytest

probe = pytest.mark.probe


def _failed_stage(stage: str, overrides: dict, match: str):
    """Run a stage that must refuse its input; return its MLflow run (asserted FAILED with the reason)."""
    import mlflow

    from peft_arena.cli import run_stage

    with pytest.raises(Exception, match=match):
        run_stage(stage, None, overrides)
    run = mlflow.search_runs(search_all_experiments=True, order_by=["attributes.start_time DESC"], max_results=1,
                             output_format="list")[0]
    assert run.info.status == "FAILED", run.info.status
    assert run.data.tags.get("arena.error"), "a FAILED run carries its reason in arena.error"
    return run


# ================================================================================================ inputs


@probe("inputs", "unknown method name")
def test_unknown_method_is_refused_with_a_failed_run(mlflow_store):
    run = _failed_stage("train_sft", {"adapter": "no-such-method", "base_model": "tiny"}, "no-such-method")
    assert "no-such-method" in run.data.tags["arena.error"]


# ================================================================================================ training


# ================================================================================================ runs


# ================================================================================================ registry


# ================================================================================================ stages


# ================================================================================================ disk
