"""An arena sweep's plan: one chain per (train, method, domain), each stage with its overrides and config hash.

A chain runs ``train → promote → evaluate → spectral`` (``stages`` picks a prefix-respecting subset) through the
same stage functions as the entry points. Each stage's **config hash** covers everything that decides what it
computes: the stage, its overrides, and for the stages after training the hash of the training it is about.
A re-run of the sweep reuses a stage whose newest run with the same hash FINISHED (about the same training run)
and runs the others, so failed or missing stages are retried and finished ones are not repeated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from peft_arena.config import ConfigError, parse_assignments

STAGES = ("train", "promote", "evaluate", "spectral")
TRAIN_KINDS = ("sft", "grpo")


def split_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in str(text or "").split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{what} is empty: give a comma list")
    return list(dict.fromkeys(items))  # keep order, drop repeats


def config_hash(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Chain:
    """One (train, method, domain) chain of the sweep."""

    train: str
    method: str
    domain: str
    base_model: str
    stages: list[str]
    overrides: dict[str, dict] = field(default_factory=dict)  # stage -> overrides (inputs from upstream added later)
    hashes: dict[str, str] = field(default_factory=dict)  # stage -> config hash

    @property
    def key(self) -> str:
        return f"{self.train}-{self.method}-{self.domain}"

    def verb(self, stage: str) -> str:
        """The stage function's name (``train_sft``, ``promote``, …), as in ``arena.stage``."""
        return f"train_{self.train}" if stage == "train" else stage

    def to_dict(self) -> dict:
        return {"key": self.key, "train": self.train, "method": self.method, "domain": self.domain,
                "base_model": self.base_model, "stages": self.stages, "overrides": self.overrides,
                "hashes": self.hashes}

    @classmethod
    def from_dict(cls, d: dict) -> "Chain":
        return cls(d["train"], d["method"], d["domain"], d["base_model"], list(d["stages"]), dict(d["overrides"]),
                   dict(d["hashes"]))


def _sets(cfg) -> dict[str, dict]:
    out = {}
    for name in ("sft_set", "grpo_set", "promote_set", "eval_set", "spectral_set"):
        values = parse_assignments(getattr(cfg, name))
        for key in values:
            if key in {"adapter", "method", "domain", "base_model", "source_run", "model_uri"}:
                raise ConfigError(f"{name} may not set {key!r}: the sweep sets it for each chain")
        out[name] = values
    if cfg.monitor_every:
        for name in ("sft_set", "grpo_set"):
            out[name].setdefault("monitor_every", str(cfg.monitor_every))
    return out


def plan_chains(cfg) -> list[Chain]:
    """Every chain of the sweep ``cfg`` (an ``ArenaConfig``), in (train, domain, method) order."""
    methods = split_list(cfg.methods, "methods")
    domains = split_list(cfg.domains, "domains")
    trains = split_list(cfg.train, "train")
    bad = [t for t in trains if t not in TRAIN_KINDS]
    if bad:
        raise ConfigError(f"unknown train kind(s) {', '.join(bad)}: use sft, grpo")
    stages = split_list(cfg.stages, "stages")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)} in stages: use {', '.join(STAGES)}")
    if stages[0] != "train":
        raise ConfigError("stages must start with train: every other stage is about the chain's training run")
    stages = [s for s in STAGES if s in stages]
    if not cfg.base_model:
        raise ConfigError("base_model is empty: give one base for the sweep")
    sets = _sets(cfg)
    chains = []
    for train in trains:
        for domain in domains:
            for method in methods:
                chain = Chain(train, method, domain, cfg.base_model, stages)
                train_over = {"adapter": method, "domain": domain, "base_model": cfg.base_model,
                              **sets[f"{train}_set"]}
                chain.overrides["train"] = train_over
                chain.hashes["train"] = config_hash({"stage": chain.verb("train"), "overrides": train_over})
                for stage, name in (("promote", "promote_set"), ("evaluate", "eval_set"),
                                    ("spectral", "spectral_set")):
                    if stage in stages:
                        chain.overrides[stage] = dict(sets[name])
                        chain.hashes[stage] = config_hash({"stage": stage, "overrides": sets[name],
                                                           "upstream": chain.hashes["train"],
                                                           **({"via": "promote"} if stage == "evaluate" and
                                                              "promote" in stages else {})})
                chains.append(chain)
    return chains


def stage_inputs(chain: Chain, stage: str, upstream: dict) -> dict:
    """The stage's overrides plus what it takes from the chain's earlier stages (``upstream``: ``train_run``,
    ``model_uri`` of the promoted version)."""
    over = dict(chain.overrides[stage])
    if stage == "promote":
        over["source_run"] = upstream["train_run"]
    elif stage == "evaluate":
        over["model_uri"] = upstream.get("model_uri") or f"runs:/{upstream['train_run']}/adapter"
    elif stage == "spectral":
        over["model_uri"] = f"runs:/{upstream['train_run']}/adapter"
    return over


def unknown_methods(chains: list[Chain]) -> list[str]:
    """Methods of the plan that the registry does not know (their chains will fail alone)."""
    from peft_arena.methods import METHODS

    return sorted({c.method for c in chains if c.method not in METHODS})
