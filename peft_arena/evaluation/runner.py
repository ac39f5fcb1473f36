"""Run a suite of benchmarks on one model folder and collect metrics, per-sample tables and settings.

``evaluate_model`` is what the evaluate stage calls; it never talks to MLflow. :func:`log_suite_result` writes a
result through the stage's tracker (metrics linked to the benchmark as ``dataset=``, one table per benchmark, the
paper-shaped CSV, settings and provenance).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from peft_arena.evaluation.benchmarks import BenchmarkSpec, GenerationSettings, LoadedItems, get_benchmark
from peft_arena.evaluation.common import completion_text, has_chat_template
from peft_arena.evaluation.data import SAMPLES_DIR
from peft_arena.evaluation.generation import make_backend
from peft_arena.evaluation.scores import arena_scores, averaged_benchmarks

PROTOCOL_VERSION = 2  # bump when a prompt, scorer or default changes, so cached base evaluations are not reused
FULL = "full"


@dataclass
class SuiteResult:
    metrics: dict[str, float]  # "target/<bench>/<metric>" | "general/<bench>/<metric>", 0–100
    per_benchmark: dict[str, dict[str, float]]
    samples: dict[str, "object"]  # bench -> pandas.DataFrame
    provenance: dict[str, str]  # "full" | "sample" | "subset(limit=N)" | "tasks(k/27)" | "sample+subset(limit=N)" …
    settings: dict
    backend: str
    sources: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def settings_key(self) -> str:
        """Stable hash of everything that must match for a cached (base-model) evaluation to be reusable."""
        return settings_key(self.settings)

    @property
    def benchmarks(self) -> list[str]:
        return list(self.per_benchmark)

    @property
    def provisional(self) -> bool:
        """True unless every benchmark ran in full under its own protocol: such numbers are never benchmark scores."""
        return any(p != FULL for p in self.provenance.values())

    @property
    def provenance_tag(self) -> str:
        """``arena.provenance``: ``full`` or ``provisional``."""
        return "provisional" if self.provisional else FULL

    def scores(self, base_metrics: dict[str, float] | None = None, domain: str | None = None) -> dict[str, float]:
        return arena_scores(self.metrics, base_metrics, self.benchmarks, domain)

    def paper_rows(self, checkpoint: str) -> list[dict]:
        """Rows ``checkpoint, domain, benchmark, metric, value`` like the paper's ``summarize_results.py``
        (plus an ``AVG`` row per domain), all on the 0–100 scale."""
        rows = []
        for bench, values in self.per_benchmark.items():
            domain = get_benchmark(bench).domain or "general"
            rows += [{"checkpoint": checkpoint, "domain": domain, "benchmark": bench, "metric": m, "value": v}
                     for m, v in values.items()]
        scores = self.scores()
        for group, specs in averaged_benchmarks(self.benchmarks).items():
            partial = group.endswith("_partial")
            domain = group.removesuffix("_partial").removeprefix("target_")
            metric = "mean(" + ",".join(f"{s.name}.{s.headline}" for s in specs) + ")"
            rows.append({"checkpoint": checkpoint, "domain": domain, "benchmark": "PARTIAL_AVG" if partial else "AVG",
                         "metric": metric, "value": scores[f"score/{group}_avg"]})
        return rows

    def paper_csv(self, checkpoint: str) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["checkpoint", "domain", "benchmark", "metric", "value"])
        writer.writeheader()
        writer.writerows(self.paper_rows(checkpoint))
        return out.getvalue()


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def select_items(items: list[dict], limit: int | None, subset_key: str | None) -> list[dict]:
    """The first ``limit`` items; with subsets (BBH tasks, MMLU subjects) taken round-robin across subsets so a
    small limit still covers many of them."""
    if limit is None or limit >= len(items):
        return items
    if not subset_key:
        return items[:limit]
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item[subset_key], []).append(item)
    interleaved = [x for row in zip_longest(*groups.values()) for x in row if x is not None]
    return interleaved[:limit]


def effective_generation(spec: BenchmarkSpec, n_samples: int | None, max_new_tokens: int | None
                         ) -> GenerationSettings:
    """Overrides: ``n_samples`` applies to sampled benchmarks only (greedy ones keep n=1); ``max_new_tokens`` caps."""
    g = spec.generation
    n = n_samples if (n_samples and g.temperature > 0) else g.n_samples
    max_new = min(g.max_new_tokens, max_new_tokens) if max_new_tokens else g.max_new_tokens
    return GenerationSettings(temperature=g.temperature, n_samples=n, max_new_tokens=max_new, stop=g.stop,
                              top_p=g.top_p)


def provenance_detail(data_provenance: str, n_selected: int, n_available: int, limit: int | None,
                      spec: BenchmarkSpec, gen: GenerationSettings) -> str:
    """How far one benchmark's run is from the full benchmark under its protocol: ``full``, or the parts that
    differ joined by ``+``: the data (``sample``, ``tasks(k/n)``, ``languages(k/n)``), ``subset(limit=N)``,
    ``n_samples(m/n)`` and ``max_new_tokens(m/n)`` (used / protocol)."""
    parts = [] if data_provenance == FULL else [data_provenance]
    if n_selected < n_available:
        parts.append(f"subset(limit={limit})")
    protocol = spec.generation
    if gen.n_samples != protocol.n_samples:
        parts.append(f"n_samples({gen.n_samples}/{protocol.n_samples})")
    if gen.max_new_tokens != protocol.max_new_tokens:
        parts.append(f"max_new_tokens({gen.max_new_tokens}/{protocol.max_new_tokens})")
    return "+".join(parts) or FULL


def _source_label(source: str) -> str:
    try:
        return "bundled-sample:" + str(Path(source).resolve().relative_to(SAMPLES_DIR.resolve()))
    except ValueError:
        return source


def _digest(items: list[dict]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def evaluate_model(model_path: str, benchmarks: list[BenchmarkSpec], *, limit: int | None = None,
                   n_samples: int | None = None, max_new_tokens: int | None = None, backend: str = "auto",
                   batch_size: int = 0, seed: int = 0, data_dir: str | None = None, progress: bool = True,
                   data_paths: dict[str, str] | None = None, engine_options: dict | None = None,
                   model_kind: str | None = None) -> SuiteResult:
    """Evaluate the HF model folder ``model_path`` on ``benchmarks``.

    ``limit`` caps items per benchmark (provenance ``subset(limit=N)``), ``n_samples`` overrides the sample
    count of sampled benchmarks, ``max_new_tokens`` caps generation (both recorded in the provenance: the run is
    then provisional), ``data_dir`` replaces ``$PEFT_ARENA_DATA_DIR`` and ``data_paths`` gives a
    benchmark-specific file/folder (``{"bbh": "/data/bbh"}``). ``model_kind`` (``base``/``instruct``; None: by
    :func:`peft_arena.models.model_kind` of ``model_path``) picks each benchmark's prompt format.
    ``engine_options`` go to :func:`make_backend` (dtype, max_batch_tokens, max_model_len, tensor_parallel_size,
    gpu_memory_utilization, base_url). The engine is closed before this returns, so the next one (the base
    model's) starts on a free device.
    """
    from peft_arena.models import model_kind as detect_kind

    data_paths = data_paths or {}
    kind = model_kind or detect_kind(model_path)
    unknown = set(data_paths) - {b.name for b in benchmarks}
    if unknown:
        raise ValueError(f"data_paths given for benchmarks not in the suite: {sorted(unknown)}")

    # Load every benchmark's items before the model, so a missing dataset fails in seconds.
    loaded: dict[str, LoadedItems] = {}
    selected: dict[str, list[dict]] = {}
    provenance: dict[str, str] = {}
    for spec in benchmarks:
        data = spec.load(data_paths.get(spec.name), data_dir)
        items = select_items(data.items, limit, spec.subset_key)
        if not items:
            raise ValueError(f"benchmark {spec.name} has no items (source {data.source})")
        loaded[spec.name], selected[spec.name] = data, items
        provenance[spec.name] = provenance_detail(data.provenance, len(items), len(data.items), limit, spec,
                                                  effective_generation(spec, n_samples, max_new_tokens))

    engine = make_backend(model_path, backend=backend, batch_size=batch_size, progress=progress, seed=seed,
                          **(engine_options or {}))
    try:
        return _run_suite(engine, benchmarks, selected, loaded, provenance, limit, n_samples, max_new_tokens, seed,
                          progress, kind)
    finally:
        engine.close()


def _run_suite(engine, benchmarks, selected, loaded, provenance, limit, n_samples, max_new_tokens, seed, progress,
               kind):
    import pandas as pd

    settings: dict = {"protocol_version": PROTOCOL_VERSION, "backend": engine.name, "seed": seed, "limit": limit,
                      "model_kind": kind, "benchmarks": {}}
    if engine.describe().get("dtype") not in (None, "float32", "auto"):
        settings["dtype"] = engine.describe()["dtype"]  # reduced precision can change scores; fp32 keeps old keys
    per_benchmark: dict[str, dict[str, float]] = {}
    metrics: dict[str, float] = {}
    samples: dict[str, object] = {}
    seconds: dict[str, float] = {}
    for spec in benchmarks:
        start = time.time()
        items, data = selected[spec.name], loaded[spec.name]
        gen = effective_generation(spec, n_samples, max_new_tokens)
        chat = spec.prompt_format(kind) == "chat"
        fmt = "chat" if chat and has_chat_template(engine.tokenizer) and spec.protocol == "generate" else "raw"
        _log(progress, f"{spec.name}: {len(items)} items ({provenance[spec.name]}), protocol {spec.protocol}, "
                       f"{fmt} prompts ({kind} model), n={gen.n_samples}, T={gen.temperature}, "
                       f"max_new_tokens={gen.max_new_tokens}")
        if chat and fmt == "raw":
            _log(progress, f"{spec.name}: the paper used the chat template here, but this tokenizer has none; "
                           "raw prompts (recorded as prompt_format=raw)")
        if spec.protocol == "generate":
            prompts = [spec.build_prompt(item, data) for item in items]
            if fmt == "raw":  # a plain string reaches every backend as is (no chat template)
                prompts = [completion_text(p) for p in prompts]
            completions = engine.generate(prompts, n=gen.n_samples, temperature=gen.temperature,
                                          max_new_tokens=gen.max_new_tokens, stop=gen.stop, seed=seed,
                                          top_p=gen.top_p, desc=spec.name)
            records = [spec.score(item, comps) for item, comps in zip(items, completions)]
            rendered = [engine.render(p) for p in prompts]
        elif spec.protocol == "loglikelihood":
            candidates = [spec.build_candidates(item, data) for item in items]
            flat = [text for cands in candidates for text in cands]
            nll = engine.mean_nll(flat, desc=spec.name)
            records, completions, rendered, pos = [], [], [], 0
            for item, cands in zip(items, candidates):
                scores = nll[pos:pos + len(cands)]
                pos += len(cands)
                pred = min(range(len(cands)), key=scores.__getitem__)
                ok = pred == item["gold_index"]
                records.append({"extracted": ["ABCDEFGH"[pred]], "nll": scores, "n_correct": int(ok),
                                "correct": float(ok)})
                completions.append([""])
                rendered.append("\n||\n".join(cands))
        else:
            raise ValueError(f"benchmark {spec.name}: unknown protocol {spec.protocol!r}")

        for item, rec in zip(items, records):  # aggregators group by subset (BBH task, MMLU subject, language)
            rec.setdefault("subset", item.get(spec.subset_key or "subset", ""))
        values = spec.aggregate(records)
        per_benchmark[spec.name] = values
        metrics.update({spec.metric_key(m): v for m, v in values.items()})
        samples[spec.name] = pd.DataFrame([_sample_row(spec, item, prompt, comps, rec)
                                           for item, prompt, comps, rec in zip(items, rendered, completions, records)])
        settings["benchmarks"][spec.name] = {
            "protocol": spec.protocol, "prompt_format": fmt, "temperature": gen.temperature, "top_p": gen.top_p,
            "n_samples": gen.n_samples, "max_new_tokens": gen.max_new_tokens, "stop": list(gen.stop),
            "provenance": provenance[spec.name], "n_items": len(items), "data_digest": _digest(items),
        }
        seconds[spec.name] = time.time() - start
        _log(progress, f"{spec.name}: {spec.headline}={values.get(spec.headline, float('nan')):.2f} "
                       f"({seconds[spec.name]:.1f} s)")
    return SuiteResult(metrics=metrics, per_benchmark=per_benchmark, samples=samples, provenance=provenance,
                       settings=settings, backend=engine.name,
                       sources={n: _source_label(d.source) for n, d in loaded.items()}, seconds=seconds)


def _gold(item: dict) -> str:
    gold = item.get("gold", item.get("instruction_id_list", ""))
    return json.dumps(gold) if isinstance(gold, list) else str(gold)


def _sample_row(spec: BenchmarkSpec, item: dict, prompt: str, completions: list[str], record: dict) -> dict:
    extracted = record.get("extracted", [])
    row = {"id": item.get("id", ""), "subset": item.get(spec.subset_key or "subset", ""), "prompt": prompt,
           "completion": completions[0] if completions else "", "extracted": extracted[0] if extracted else "",
           "gold": _gold(item), "correct": record["correct"], "n_correct": record["n_correct"],
           "n_samples": len(completions)}
    if len(completions) > 1:
        row["completions"] = json.dumps(completions)
        row["extracted_all"] = json.dumps(extracted)
    for key in ("status", "rule", "nll"):
        if key in record:
            row[key] = json.dumps(record[key]) if isinstance(record[key], list) else record[key]
    if "ifeval" in record:
        row.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in record["ifeval"].items()})
    return row


def log_suite_result(tracker, result: SuiteResult, checkpoint: str, base_metrics: dict[str, float] | None = None,
                     model_id: str | None = None, domain: str | None = None) -> dict[str, float]:
    """Log ``result`` through a tracker (``MlflowTracker``/``MemoryTracker``) and return the arena scores.

    Metrics go per benchmark with ``dataset=<benchmark>`` (linked to ``model_id`` when given); each benchmark's
    per-sample table goes to ``samples/<bench>.json``; ``results/paper_results.csv`` has the paper's shape;
    ``results/settings.json`` holds the settings and provenance. The run is tagged ``arena.provenance`` =
    ``full`` only when every benchmark ran in full under its protocol, else ``provisional`` (per-benchmark detail
    in ``arena.data_provenance``); ``arena.samples_only`` is the older name of ``provisional`` and says the same.
    """
    for bench, values in result.per_benchmark.items():
        spec = get_benchmark(bench)
        tracker.log_metrics({spec.metric_key(m): v for m, v in values.items()}, dataset=bench, model_id=model_id)
    scores = result.scores(base_metrics, domain)
    tracker.log_metrics(scores, model_id=model_id)
    for bench, frame in result.samples.items():
        tracker.log_table(frame, f"samples/{bench}.json")
    tracker.log_text(result.paper_csv(checkpoint), "results/paper_results.csv")
    tracker.log_dict({"settings": result.settings, "settings_key": result.settings_key(),
                      "provenance": result.provenance, "sources": result.sources, "backend": result.backend,
                      "seconds": result.seconds}, "results/settings.json")
    tracker.set_tags({"arena.eval_key": result.settings_key(),
                      "arena.provenance": result.provenance_tag,
                      "arena.samples_only": str(result.provisional).lower(),
                      "arena.model_kind": result.settings.get("model_kind", ""),
                      "arena.suite": ",".join(result.benchmarks),
                      "arena.data_provenance": json.dumps(result.provenance, sort_keys=True),
                      "arena.generation_backend": result.backend})
    tracker.log_params({f"eval.provenance.{b}": p for b, p in result.provenance.items()})
    return scores
