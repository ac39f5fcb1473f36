"""What a model URI points at, for the stages that load a model: a local folder plus its lineage tags."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from peft_arena.models import KNOWN_BASES, resolve_base
from peft_arena.tracking.runs import run_tags

LINEAGE_TAGS = ("arena.method", "arena.method_label", "arena.train", "arena.domain", "arena.base_model",
                "arena.base_source")


@dataclass
class Target:
    path: str  # local folder (trained artifact or HF model), or a hub id
    kind: str  # "base" | "adapter" (trained-artifact folder) | "model" (merged or plain HF model)
    lineage: dict = field(default_factory=dict)  # the LINEAGE_TAGS known for it
    resolved: object | None = None  # tracking.registry.ResolvedModel for MLflow URIs
    source_run: str | None = None
    temporary: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self.temporary:
            shutil.rmtree(path, ignore_errors=True)


def lineage_of(uri: str, prefer_adapter: bool = False) -> Target:
    """Resolve ``uri`` (base short name, models:/…, runs:/…, folder, hub id) with its lineage.

    ``prefer_adapter``: for a registered merged model whose training run is known, use that run's trained
    artifact instead (the spectral stage analyses low-rank updates exactly from their factors).
    """
    if uri in KNOWN_BASES:
        base = resolve_base(uri)
        return Target(base.source, "base", {"arena.base_model": base.short, "arena.base_source": base.source})
    from peft_arena.tracking.registry import resolve_model_uri

    resolved = resolve_model_uri(uri)
    lineage = {k: v for k, v in resolved.tags.items() if k in LINEAGE_TAGS}
    if resolved.source_run:
        lineage = {**{k: v for k, v in run_tags(resolved.source_run).items() if k in LINEAGE_TAGS}, **lineage}
    target = Target(resolved.local_path, "model", lineage, resolved, resolved.source_run)
    if (Path(resolved.local_path) / "arena_method.json").exists():
        target.kind = "adapter"
    elif prefer_adapter and resolved.source_run and resolved.registered_model:
        adapter = resolve_model_uri(f"runs:/{resolved.source_run}/adapter")
        target.path, target.kind = adapter.local_path, "adapter"
        target.temporary.append(adapter.local_path)
    elif uri.startswith("runs:/"):
        target.temporary.append(resolved.local_path)
    return target
