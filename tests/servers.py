"""Server processes for tests (imported by name from both virtualenvs: tests/ is on sys.path under pytest).

One way to start a server in its own process group, wait for its health endpoint, and stop the whole group
(SIGTERM, a grace period, then SIGKILL), so that no test leaves a server or its workers behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the process group of ``proc`` (started with ``start_new_session``), SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running_server(argv: list[str], *, log_path: Path, health_url: str, start_timeout_s: float,
                   stop_grace_s: float = 30, env: dict | None = None, cwd: Path | None = None,
                   poll_s: float = 1.0):
    """Start ``argv`` in a new process group with output to ``log_path``; yield the process once ``health_url``
    answers 200; fail the test with the log's tail if it exits or does not come up in ``start_timeout_s``."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(health_url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"{Path(argv[0]).name} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{Path(argv[0]).name} not up after {start_timeout_s} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(poll_s)
        yield proc
    finally:
        stop_process_group(proc, stop_grace_s)
