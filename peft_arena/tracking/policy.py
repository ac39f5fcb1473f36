"""The promotion policy: declarative gates (``registry/policy.yaml``) a version must pass to become ``champion``.

:func:`load_policy` reads the gates, :func:`evaluate_policy` decides (pure), :func:`apply_policy` decides for a
registered version from its recorded scores and moves the alias only when every gate passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from peft_arena.tracking.aliases import eval_history, move_alias, record_decision, version_scores
from peft_arena.tracking.locks import store_lock
from peft_arena.tracking.versions import (CHAMPION, PolicyError, RegistryError, alias_holder, mlflow_client,
                                          require_version)



@dataclass(frozen=True)
class Gates:
    """The thresholds a version must pass to take an alias (one set per domain)."""

    max_forget_pp: float = 2.0
    min_target_gain_pp: float = 1.0
    min_margin_over_champion_pp: float = 0.0
    same_eval_settings: bool = True


@dataclass(frozen=True)
class Policy:
    default: Gates
    domains: dict[str, Gates]
    alias: str = CHAMPION
    source: str = ""

    def gates(self, domain: str | None) -> Gates:
        return self.domains.get(domain or "", self.default)


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    gates: dict[str, Any] = field(default_factory=dict)  # the thresholds that applied
    # gate -> (value, threshold, passed) for every gate that could be checked, e.g.
    # {"forget_pp": (0.5, 2.0, True)}; the policy stage logs them as metrics and writes them in its description
    checks: dict[str, tuple[Any, Any, bool]] = field(default_factory=dict)

    def summary(self) -> str:
        return ("promote: " if self.promote else "keep: ") + "; ".join(self.reasons)


def load_policy(path: str | Path = "registry/policy.yaml", alias: str = CHAMPION) -> Policy:
    """Read the gates for ``alias`` from a policy YAML (``default`` plus per-domain overrides)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise PolicyError(f"policy file {path} not found; pass policy=<path to registry/policy.yaml>")
    data = yaml.safe_load(path.read_text()) or {}
    if alias not in data:
        raise PolicyError(f"{path} has no section {alias!r} (sections: {', '.join(data) or 'none'})")
    section = data[alias] or {}
    extra = set(section) - {"default", "domains"}
    if extra:
        raise PolicyError(f"{path}: {alias} takes only 'default' and 'domains', not {sorted(extra)}")
    default = _gates(path, f"{alias}.default", section.get("default") or {}, Gates())
    domains = {str(d): _gates(path, f"{alias}.domains.{d}", g or {}, default)
               for d, g in (section.get("domains") or {}).items()}
    return Policy(default=default, domains=domains, alias=alias, source=str(path))


def _gates(path: Path, where: str, values: dict, base: Gates) -> Gates:
    known = {f.name: f.type for f in fields(Gates)}
    unknown = set(values) - set(known)
    if unknown:
        raise PolicyError(f"{path}: {where} has unknown keys {sorted(unknown)} (known: {', '.join(known)})")
    merged = asdict(base)
    for key, value in values.items():
        if key == "same_eval_settings":
            if not isinstance(value, bool):
                raise PolicyError(f"{path}: {where}.{key} must be true or false")
            merged[key] = value
        else:
            try:
                merged[key] = float(value)
            except (TypeError, ValueError):
                raise PolicyError(f"{path}: {where}.{key}={value!r} is not a number") from None
    return Gates(**merged)


def evaluate_policy(policy: Policy, domain: str | None, candidate_scores: dict[str, Any],
                    champion_scores: dict[str, Any] | None) -> Decision:
    """Decide whether a candidate may take the policy's alias. Pure: no MLflow calls.

    Scores are dicts with ``target_avg``, ``target_gain_pp``, ``forget_pp`` (``score/`` prefixes allowed),
    ``provenance`` and optionally ``eval_key``. Only ``provenance == "full"`` evidence is accepted: a sample,
    subset or partial-task evaluation (or scores of unknown provenance) is refused, and the reason says so.
    ``champion_scores`` is None when no version holds the alias yet. Every gate is reported in ``reasons``,
    passed or failed, so the record says what the decision was based on.
    """
    gates = policy.gates(domain)
    cand = {k.removeprefix("score/"): v for k, v in candidate_scores.items()}
    reasons, ok = [], True
    checks: dict[str, tuple[Any, Any, bool]] = {}
    provenance = cand.get("provenance")
    checks["provenance"] = (provenance or "unknown", "full", provenance == "full")
    if provenance != "full":
        ok = False
        reasons.append(f"refused: the evidence is {provenance or 'of unknown provenance'}, not a full evaluation; "
                       "provisional scores (bundled samples, limit subsets, partial task lists, protocol overrides) "
                       "cannot make a champion: evaluate the version on the full benchmarks")

    def need(key: str) -> float | None:
        nonlocal ok
        if cand.get(key) is None:
            ok = False
            reasons.append(f"missing score {key}; evaluate the version first")
            return None
        return float(cand[key])

    forget, gain, target = need("forget_pp"), need("target_gain_pp"), need("target_avg")
    if forget is not None:
        passed = forget <= gates.max_forget_pp
        checks["forget_pp"] = (forget, gates.max_forget_pp, passed)
        ok &= passed
        reasons.append(f"forgetting {forget:.2f} pp {'<=' if passed else '>'} {gates.max_forget_pp:g} pp")
    if gain is not None:
        passed = gain >= gates.min_target_gain_pp
        checks["target_gain_pp"] = (gain, gates.min_target_gain_pp, passed)
        ok &= passed
        reasons.append(f"target gain {gain:+.2f} pp {'>=' if passed else '<'} {gates.min_target_gain_pp:g} pp")
    if champion_scores is None:
        reasons.append(f"no {policy.alias} yet")
    elif target is not None:
        champ = {k.removeprefix("score/"): v for k, v in champion_scores.items()}
        if gates.same_eval_settings and cand.get("eval_key") != champ.get("eval_key"):
            ok = False
            reasons.append(f"scored with other eval settings than the {policy.alias} (eval_key "
                           f"{cand.get('eval_key')} vs {champ.get('eval_key')}); evaluate both with the same settings")
        elif champ.get("target_avg") is None:
            ok = False
            reasons.append(f"the {policy.alias} has no recorded target_avg; evaluate it first")
        else:
            margin = target - float(champ["target_avg"])  # same eval_key: same suite, settings and data
            passed = margin > gates.min_margin_over_champion_pp
            checks["margin_over_champion_pp"] = (margin, gates.min_margin_over_champion_pp, passed)
            ok &= passed
            reasons.append(f"target {target:.2f} vs {policy.alias} {float(champ['target_avg']):.2f} "
                           f"({margin:+.2f} pp, needs > {gates.min_margin_over_champion_pp:g})")
    return Decision(bool(ok), reasons, {"domain": domain, **asdict(gates)}, checks)


def apply_policy(name: str, version: str | int, policy: Policy | str | Path = "registry/policy.yaml",
                 actor: str | None = None) -> Decision:
    """Apply the policy to an evaluated version: move the policy's alias to it only when every gate passes.

    Scores come from the version's tags (written by :func:`record_scores`, full evaluations only); the
    champion's from its own tags. A version evaluated only provisionally gets a recorded refusal that says so.
    The decision, promote or not, is recorded on the version (``arena.policy.<alias>.decision``, the reasons in
    ``arena.alias_history`` and the version's description).
    """
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    client = mlflow_client()
    version = str(version)
    mv = require_version(client, name, version)
    scores = version_scores(mv.tags)
    history = eval_history(mv.tags)
    if not scores and not history:
        raise RegistryError(f"version {version} of {name!r} has no recorded evaluation; "
                            f"run evaluate on models:/{name}/{version} first")
    domain = mv.tags.get("arena.domain")
    # the decision and its tags under the lock of the alias moves: MLflow's SQL store inserts a version tag without
    # upsert, and the champion read here must still hold when the alias moves
    with store_lock(f"registry/{name}"):
        holder = alias_holder(client, name, policy.alias)
        if holder is not None and str(holder.version) == version:
            decision = Decision(False, [f"version {version} already holds {policy.alias}"], {"domain": domain})
        elif not scores:
            last = history[-1]
            detail = ", ".join(f"{b}: {p}" for b, p in (last.get("detail") or {}).items()) or "details unknown"
            decision = Decision(False, [
                f"refused: version {version} has only provisional evaluations (latest: run {last.get('run')}, "
                f"{detail}); provisional scores cannot make a {policy.alias}: evaluate models:/{name}/{version} on the "
                "full benchmarks (no limit, full data, protocol generation settings)"], {"domain": domain})
        else:
            champion_scores = None
            if holder is not None:
                champion_scores = {**version_scores(holder.tags), "eval_key": holder.tags.get("arena.eval_key")}
            decision = evaluate_policy(policy, domain, {**scores, "eval_key": mv.tags.get("arena.eval_key"),
                                                        "provenance": mv.tags.get("arena.score_provenance")},
                                       champion_scores)
        client.set_model_version_tag(name, version, f"arena.policy.{policy.alias}.decision",
                                     "promote" if decision.promote else "keep")
        record_decision(name, version, policy.alias, decision.promote, decision.reasons, actor)
        if decision.promote:
            move_alias(name, policy.alias, version,
                       f"policy {policy.source or 'gates'}: " + "; ".join(decision.reasons), scores, actor)
    return decision
