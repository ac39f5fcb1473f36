"""The tracker object stages log through. Stages never import mlflow; they get a Tracker.

``MlflowTracker`` logs into one active MLflow run. ``MemoryTracker`` keeps everything in memory, for unit tests
of stages and for dry runs.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")


def metric_key(key: str) -> str:
    """MLflow accepts only ``[A-Za-z0-9_ . - / : space]`` in names: ``pass@1`` → ``pass_at_1``."""
    return _BAD_KEY_CHARS.sub("_", key.replace("@", "_at_"))


GLOSSARY = "docs/metrics.md"


def rounded(key: str, value: float) -> float:
    """The number a person reads: scores, percentages and percentage points (``score/*``, ``*_pp``, ``*_pct``)
    to 0.01, whole numbers as they are, everything else to 4 significant digits (``5.555555555555554`` → ``5.56``).
    Curves (``train/*``, ``monitor/*``) keep full precision: runs are compared point by point on them (a resumed
    or multi-process run against a plain one agrees to ~1e-7, far below a 4th significant digit)."""
    import math

    value = float(value)
    if not math.isfinite(value) or value == 0 or value.is_integer() or key.startswith(("train/", "monitor/")):
        return value
    if key.startswith("score/") or key.endswith(("_pp", "_pct")):
        return round(value, 2)
    return float(f"{value:.4g}")


class MemoryTracker:
    """Records what a stage logs; the same interface as :class:`MlflowTracker`."""

    run_id = "memory"
    logs_to_mlflow = False
    resuming = False

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: dict[str, Any] = {}
        self.artifact_dir = Path(tempfile.mkdtemp(prefix="arena-artifacts-"))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, dataset: str | None = None,
                    model_id: str | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(metric_key(k), []).append((step, float(v)))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts[f"{artifact_path or ''}/{Path(path).name}".lstrip("/")] = Path(path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts[artifact_path or ""] = Path(directory)

    def log_dict(self, obj: Any, name: str) -> None:
        self.artifacts[name] = obj

    def log_text(self, text: str, name: str) -> None:
        self.artifacts[name] = text

    def log_figure(self, figure, name: str) -> None:
        out = self.artifact_dir / name
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out)
        self.artifacts[name] = out

    def log_table(self, data, name: str) -> None:
        self.artifacts[name] = data

    def already_logged(self, key: str, step: int | None) -> bool:
        return False

    def logged_params(self) -> dict[str, str]:
        return dict(self.params)

    def describe(self, text: str) -> None:
        self.tags["mlflow.note.content"] = text

    def log_dataset(self, frame, name: str, source: str, context: str = "training") -> None:
        self.artifacts[f"input:{context}"] = (name, source, len(frame))

    def log_adapter_model(self, name: str, artifact_uri: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        self.artifacts[f"model:{name}"] = (artifact_uri, dict(tags), dict(params))
        return f"memory-model-{name}"

    def last(self, key: str) -> float:
        return self.metrics[metric_key(key)][-1][1]


class NullTracker:
    """What a training process other than rank 0 logs through: nothing. Rank 0 logs for the whole job, so the
    run gets one set of params, metrics and artifacts; ``run_id`` is the shared run's (output folders agree)."""

    logs_to_mlflow = False
    resuming = False

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def already_logged(self, key: str, step: int | None) -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith(("log_", "set_")) or name == "describe":
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class MlflowTracker:
    """Logs into one MLflow run (the active run the entry point resumed or started)."""

    def __init__(self, run_id: str) -> None:
        import mlflow

        self._mlflow = mlflow
        self.client = mlflow.MlflowClient()
        self.run_id = run_id
        self.resuming = False  # a reopened run (--resume): points it already holds are not logged again
        self._logged_steps: dict[str, int] = {}

    logs_to_mlflow = True

    def start_resume(self) -> None:
        """Remember the last step of every metric the run holds; later points at or before it are skipped."""
        self.resuming = True
        for key in self.client.get_run(self.run_id).data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            self._logged_steps[key] = max(m.step for m in history) if history else -1

    def already_logged(self, key: str, step: int | None) -> bool:
        return self.resuming and self._logged_steps.get(key, -1) >= (step or 0)

    def logged_params(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.params)

    def run_tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def log_params(self, params: dict[str, Any]) -> None:
        # `mlflow run` already logged the -P values as given; MLflow refuses to change a param, so a resolved
        # value that differs from the given one (e.g. lr "" -> 0.0002) is logged as `resolved.<key>`.
        existing = self.client.get_run(self.run_id).data.params
        fresh: dict[str, str] = {}
        for key, value in params.items():
            text = str(value)[:6000]
            if key not in existing:
                fresh[key] = text
            elif existing[key] != text:
                fresh[f"resolved.{key}"] = text
        items = list(fresh.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i:i + 100]), run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, dataset: str | None = None,
                    model_id: str | None = None) -> None:
        clean = {metric_key(k): rounded(k, v) for k, v in metrics.items()}
        clean = {k: v for k, v in clean.items() if not self.already_logged(k, step)}
        if not clean:
            return
        kwargs: dict[str, Any] = {"run_id": self.run_id, "step": step}
        if model_id:
            kwargs["model_id"] = model_id
        if dataset:
            kwargs["dataset"] = _named_dataset(dataset)
        self._mlflow.log_metrics(clean, **kwargs)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:8000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(obj, indent=2, default=str), name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_table(self, data, name: str) -> None:
        self.client.log_table(self.run_id, data=data, artifact_file=name)

    def describe(self, text: str) -> None:
        """The run's description (MLflow's note, shown at the top of the run page)."""
        self.client.set_tag(self.run_id, "mlflow.note.content", text)

    def log_dataset(self, frame, name: str, source: str, context: str = "training") -> None:
        """A data set the run consumed, as an MLflow dataset input (name, digest, schema, source)."""
        import warnings

        import mlflow
        from mlflow.data.pandas_dataset import from_pandas

        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a local path, as meant
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(frame.astype(str), source=source, name=name)
        self.client.log_inputs(self.run_id, datasets=[mlflow.entities.DatasetInput(
            dataset._to_mlflow_entity(), tags=[mlflow.entities.InputTag("mlflow.data.context", context)])])

    def log_adapter_model(self, name: str, artifact_uri: str, tags: dict[str, Any], params: dict[str, Any]) -> str:
        """The trained adapter as a LoggedModel named ``name`` (the run's name), linked to this run. Its files stay
        where every stage reads them (``artifact_uri``, e.g. ``runs:/<run>/adapter``), so the LoggedModel is an
        external one pointing there (tag ``arena.artifact_uri``): no second copy of the weights."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        model = self._mlflow.create_external_model(
            name=name, source_run_id=self.run_id, experiment_id=experiment_id, model_type="peft-adapter",
            tags={**{k: str(v) for k, v in tags.items() if v not in (None, "")}, "arena.artifact_uri": artifact_uri},
            params={k: str(v)[:6000] for k, v in params.items()})
        return model.model_id


def _named_dataset(name: str):
    """A metadata-only MLflow dataset named after a benchmark, so per-benchmark metrics link to it."""
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    return from_pandas(pd.DataFrame({"benchmark": [name]}), name=name)
