"""A run's heartbeat: proof that the process working on a RUNNING run is still alive.

Every stage run (and the base-evaluation side run) carries the tag ``arena.heartbeat``, a JSON lease
``{"host", "pid", "pidns", "start", "at", "every"}`` that a daemon thread in the working process rewrites every
``every`` seconds (``PEFT_ARENA_HEARTBEAT_S``, default 30). :func:`liveness` judges a RUNNING run from it:

* same host and PID namespace: the process is checked directly (alive, and the same process: its start time
  matches, so a reused PID does not count); a dead process is dead at once, whatever the lease says;
* another host (or namespace): the lease: dead when the last beat is older than ``LEASE_BEATS`` intervals.

``peft-arena doctor`` (and the cheap sweep at the start of every store command) ends dead runs FAILED.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

HEARTBEAT_TAG = "arena.heartbeat"
LEASE_BEATS = 5  # a lease expires after this many missed beats (other hosts only)


def interval_s() -> float:
    """Seconds between beats (``PEFT_ARENA_HEARTBEAT_S``, default 30)."""
    value = os.environ.get("PEFT_ARENA_HEARTBEAT_S", "30")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"PEFT_ARENA_HEARTBEAT_S={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"PEFT_ARENA_HEARTBEAT_S={value!r} must be > 0")
    return seconds


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The kernel's start time of ``pid`` (clock ticks since boot), '' where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def identity() -> dict:
    """Who is beating: host, PID, PID namespace and the process's start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pidns": _pid_namespace(), "start": _process_start(pid)}


class Heartbeat:
    """Rewrites ``arena.heartbeat`` on ``run_id`` every ``interval_s()`` seconds until :meth:`stop`."""

    def __init__(self, run_id: str, every: float | None = None) -> None:
        import mlflow

        self.run_id = run_id
        self.every = every or interval_s()
        self._client = mlflow.MlflowClient()
        self._who = identity()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"arena-heartbeat-{run_id[:8]}", daemon=True)
        self._warned = False

    def start(self) -> "Heartbeat":
        self.beat()  # the lease exists before the stage does any work
        self._thread.start()
        return self

    def beat(self) -> None:
        value = json.dumps({**self._who, "at": round(time.time(), 3), "every": self.every})
        self._client.set_tag(self.run_id, HEARTBEAT_TAG, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except Exception as exc:  # a store hiccup must not kill the training; the next beat retries
                if not self._warned:
                    print(f"[peft-arena] warning: heartbeat of run {self.run_id} failed ({exc}); retrying",
                          file=sys.stderr)
                    self._warned = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def liveness(tag_value: str | None, now: float | None = None) -> tuple[bool, str]:
    """(alive, why) for a RUNNING run whose heartbeat tag is ``tag_value`` (None: the run never beat)."""
    now = time.time() if now is None else now
    if not tag_value:
        return False, "the run never recorded a heartbeat"
    try:
        beat = json.loads(tag_value)
        host, pid, at, every = beat["host"], int(beat["pid"]), float(beat["at"]), float(beat["every"])
    except (ValueError, KeyError, TypeError):
        return False, f"its heartbeat tag is unreadable ({tag_value[:80]!r})"
    last = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    me = identity()
    if host == me["host"] and beat.get("pidns", "") == me["pidns"]:
        started = _process_start(pid)
        alive = _pid_alive(pid) and (not beat.get("start") or not started or started == beat["start"])
        if not alive:
            return False, f"its process (pid {pid} on {host}) is gone; last heartbeat {last}"
        return True, f"pid {pid} on {host} is alive"
    lease = LEASE_BEATS * every
    if now - at > lease:
        return False, (f"its process (pid {pid} on {host}) stopped beating: last heartbeat {last}, "
                       f"{now - at:.0f} s ago (lease {lease:.0f} s)")
    return True, f"pid {pid} on {host} beat {now - at:.0f} s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:  # a killed process its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
