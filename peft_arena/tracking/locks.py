"""Mutual exclusion between processes that share one MLflow store: ``with store_lock("registry/qwen2.5-7b-math"):``.

Read-modify-write steps on the store (moving an alias and writing its history on the versions, appending to a
version's history tag, computing the base model's evaluation once) run under a lock named after what they touch.
Two implementations, chosen from the tracking URI:

* **local stores** (``sqlite:///…``, ``file:…``, a plain path): an ``fcntl`` file lock on
  ``<store folder>/.arena-locks/<store file>/<key>.lock``. The kernel releases it when the holder exits, even on
  ``kill -9``, so a dead holder never blocks anyone.
* **servers** (``http(s)://…``, ``databricks``, anything else): a registered model named ``arena-lock.<hash>``
  used as a compare-and-set cell. Creating a registered model is atomic on every MLflow backend (the name is a
  unique key; a second create fails with ``RESOURCE_ALREADY_EXISTS``), so exactly one process wins; the others
  retry with jitter. The holder renews ``arena.lock.expires`` from a background thread; a lock whose expiry has
  passed (its holder died) is broken by the next waiter. Release deletes the registered model.

  A failed create is not taken at its word. MLflow's SQL registry store answers a create that lost the race with
  ``get_registered_model(name)`` (to say whether the existing name is a prompt); when the holder released the lock
  in between, that look-up raises ``RESOURCE_DOES_NOT_EXIST`` *from the create* (seen in team mode on PostgreSQL
  and against a basic-auth server on sqlite; the look-up is in the store, not in the auth app). And a create that
  went through can still come back as an error (basic auth's after-request hook that grants the creator MANAGE
  failed, or the client retried a request whose first attempt had succeeded and got ``RESOURCE_ALREADY_EXISTS``).
  So after any error the lock model is read back: it is ours only if its ``arena.lock.owner`` is our unique owner
  id; otherwise ``RESOURCE_ALREADY_EXISTS`` and ``RESOURCE_DOES_NOT_EXIST`` mean contention (back off and retry),
  any other error is raised. Release and breaking re-read the owner right before the delete (MLflow has no
  conditional delete, so this narrows, not closes, the window in which a holder that stalled past the TTL deletes
  its successor's lock). Basic auth's grants on the name cannot block the next create (creating needs only the
  workspace's create permission; the creator's MANAGE grant is an upsert); but its delete hook sweeps the grants
  on the name *after* the delete and may remove the next holder's fresh grant: accounts that are not admins
  therefore need MANAGE on registered models (``default_permission = MANAGE``, or an admin account as team mode
  uses) to release and break locks.

``PEFT_ARENA_LOCK=file|mlflow`` forces one implementation (the tests run the server path against sqlite).
Locks are re-entrant within a thread, so a locked step may call another step that takes the same lock.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

LOCK_MODEL_PREFIX = "arena-lock."
_TTL_S = 60.0  # a server lock whose holder stopped renewing for this long is broken by the next waiter
_held = threading.local()


class LockTimeout(RuntimeError):
    """A store lock that stayed held by another process for longer than the caller's timeout."""


def local_store_path(uri: str) -> Path | None:
    """The database file (sqlite) or folder (file store) behind a local tracking URI, else None (a server)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).expanduser().resolve()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path).resolve()
    if parsed.scheme == "" and uri:
        return Path(uri).expanduser().resolve()
    return None


@contextmanager
def store_lock(key: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the store-wide lock ``key`` for the block; waits (at most ``timeout`` seconds, else forever)."""
    import mlflow

    held = getattr(_held, "keys", None)
    if held is None:
        held = _held.keys = {}
    uri = mlflow.get_tracking_uri()
    ident = (uri, key)
    if held.get(ident):  # re-entrant within this thread
        held[ident] += 1
        try:
            yield
        finally:
            held[ident] -= 1
        return
    kind = os.environ.get("PEFT_ARENA_LOCK") or ("file" if local_store_path(uri) is not None else "mlflow")
    if kind not in ("file", "mlflow"):
        raise ValueError(f"PEFT_ARENA_LOCK={kind!r}: use file or mlflow")
    acquire = _file_lock if kind == "file" else _mlflow_lock
    with acquire(uri, key, timeout):
        held[ident] = 1
        try:
            yield
        finally:
            del held[ident]


def _safe(key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key)[:80]
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


@contextmanager
def _file_lock(uri: str, key: str, timeout: float | None) -> Iterator[None]:
    import fcntl

    store = local_store_path(uri)
    if store is None:
        raise ValueError(f"PEFT_ARENA_LOCK=file needs a local store, not {uri}")
    folder = store.parent / ".arena-locks" / store.name
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{_safe(key)}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"store lock {key!r} is held by another process (waited {timeout:g} s)") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _mlflow_lock(uri: str, key: str, timeout: float | None) -> Iterator[None]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name = LOCK_MODEL_PREFIX + hashlib.sha1(key.encode()).hexdigest()[:24]
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _try_create(client, name, key, owner):
        _break_if_expired(client, name)
        if deadline is not None and time.monotonic() > deadline:
            raise LockTimeout(f"store lock {key!r} is held by another process (waited {timeout:g} s)")
        time.sleep(random.uniform(0.05, 0.3))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(_TTL_S / 3):
            try:
                client.set_registered_model_tag(name, "arena.lock.expires", repr(time.time() + _TTL_S))
            except MlflowException:
                pass  # the next renewal retries; a lock that expires is broken by a waiter

    renewer = threading.Thread(target=renew, name=f"arena-lock-{key}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if _owner_of(client, name) == owner:  # else broken by a waiter after expiry: nothing of ours to delete
            try:
                client.delete_registered_model(name)
            except MlflowException:
                pass  # deleted meanwhile (broken), or the server failed: it expires after _TTL_S and is broken


_CONTENTION = ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")


def _try_create(client, name: str, key: str, owner: str) -> bool:
    """One attempt to take the lock; True when it is ours (see the module docstring for why errors are read back)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"arena.lock.key": key[:5000], "arena.lock.owner": owner,
                                                   "arena.lock.expires": repr(time.time() + _TTL_S)},
                                       description="peft-arena store lock (deleted on release)")
        return True
    except MlflowException as exc:
        if _owner_of(client, name) == owner:
            return True  # our create went through; the error came after it
        if exc.error_code in _CONTENTION:
            return False
        raise


def _owner_of(client, name: str) -> str | None:
    """The owner id of the lock model ``name``, or None when there is none (or it cannot be read now)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name).tags.get("arena.lock.owner")
    except MlflowException:
        return None


def _break_if_expired(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(name)
    except MlflowException:
        return  # released meanwhile
    if float(held.tags.get("arena.lock.expires", "0") or 0) < time.time():
        if _owner_of(client, name) != held.tags.get("arena.lock.owner"):
            return  # released and taken again since we read it: the new holder's lock is not expired
        try:
            client.delete_registered_model(name)
        except MlflowException:
            pass
