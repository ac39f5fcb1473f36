"""The model registry's public API: one registered model per (base, domain), aliases moved with a written record,
URIs resolved. Each concern lives in its own module; this one re-exports their public names so callers write
``from peft_arena.tracking import registry as reg`` and need not know the split.

* :mod:`.uris` — :func:`resolve_model_uri` / :func:`lookup_version`: ``models:/NAME@ALIAS``, ``models:/NAME/N``,
  ``models:/<model_id>``, ``runs:/ID/path``, a local folder or a hub id to a folder ``from_pretrained`` takes.
* :mod:`.registration` — :func:`register_merged_model`: log a merged HF folder, register it, all or nothing.
* :mod:`.aliases` — :func:`move_alias`, :func:`alias_history`, :func:`record_scores`, :func:`version_scores`,
  :func:`eval_history`.
* :mod:`.policy` — :func:`load_policy` / :func:`evaluate_policy` / :func:`apply_policy`: the gates of
  ``registry/policy.yaml`` that decide whether a version may become ``champion``.
* :mod:`.versions` — names, errors and look-ups shared by the modules above.
"""

from __future__ import annotations

from peft_arena.tracking.aliases import (alias_history, default_actor, eval_history, move_alias, record_scores,
                                         version_scores)
from peft_arena.tracking.policy import Decision, Gates, Policy, apply_policy, evaluate_policy, load_policy
from peft_arena.tracking.registration import register_merged_model
from peft_arena.tracking.uris import ResolvedModel, lookup_version, resolve_model_uri
from peft_arena.tracking.versions import (ALIAS_HISTORY_TAG, CANDIDATE, CHAMPION, EVAL_HISTORY_TAG, SCORE_KEYS,
                                          SCORE_TAG, PolicyError, RegistryError, registered_name)

__all__ = ["ALIAS_HISTORY_TAG", "CANDIDATE", "CHAMPION", "EVAL_HISTORY_TAG", "SCORE_KEYS", "SCORE_TAG", "Decision",
           "Gates", "Policy", "PolicyError", "RegistryError", "ResolvedModel", "alias_history", "apply_policy",
           "default_actor", "eval_history", "evaluate_policy", "load_policy", "lookup_version", "move_alias", "record_scores",
           "register_merged_model", "registered_name", "resolve_model_uri", "version_scores"]
