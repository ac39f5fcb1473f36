"""Where a training process's startup goes: wall-clock seconds per phase, from process start to the end of the first
optimizer step.

``train_sft`` marks the end of each phase it runs (imports, config, tokenizer, data, weights, adapter, trainer, ...);
the callback from :meth:`StartupClock.callback` marks ``train_begin`` (the Trainer's optimizer/accelerate set-up and
the guards' probe forward) and ``first_step`` (the first optimizer step, after a CUDA synchronise).
:meth:`StartupClock.metrics` gives them as ``startup/<phase>_s`` (each phase's own seconds) plus
``startup/to_first_step_s`` (process start to the end of the first step); the run logs those, ``bench/train_bench.py``
prints them.

Time before the call (the interpreter, the caller's imports, for ``peft-arena train-sft`` the MLflow run:
``startup/run_setup_s`` and ``startup/module_imports_s`` there, ``startup/before_call_s`` for what is left) counts
from the process's start as the kernel recorded it (``/proc``), or from ``t0`` when the caller knows better (the
bench passes its spawn time); a caller marks its own phases on the clock it passes. Work that runs in the
background while the main thread goes on (:class:`Background`: the base's weights load while the data is tokenised)
is reported by its own duration (``startup/<name>_bg_s``) next to the main-thread phase that waited for it.
:meth:`StartupClock.prefetch` reads a local folder's safetensors shards into the page cache in a daemon thread as
early as the caller can (before the heavy imports), so a cold disk is read while the process imports
(``startup/prefetch_read_gib``: 0 when the shards were cached already).
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager


def process_start() -> float:
    """This process's start as a ``time.time()`` value: its age from ``/proc/self/stat`` (clock ticks since boot, on
    the boot clock) subtracted from now; the module's import time where ``/proc`` is not available."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 (starttime), after pid and (comm)
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


_IMPORTED = time.time()


_FIRST = True  # the process's first clock counts from the process's start; later ones from their creation


class StartupClock:
    """Phase ends on the wall clock; ``mark(name)`` closes the phase that began at the previous mark (or at ``t0``:
    default, the process's start for its first clock, the clock's creation for later ones)."""

    def __init__(self, t0: float | None = None):
        global _FIRST
        if t0 is None:
            t0 = process_start() if _FIRST else time.time()
        _FIRST = False
        self.t0 = float(t0)
        self.marks: list[tuple[str, float]] = []
        self.background: dict[str, float] = {}
        self.prefetched: list[str] = []  # sources whose page-cache prefetch this clock started

    def prefetch(self, name_or_path: str) -> None:
        """:func:`prefetch_base`, its figures reported with this clock's (``startup/prefetch_*``)."""
        source = prefetch_base(name_or_path)
        if source is not None:
            self.prefetched.append(source)

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))

    def record_background(self, name: str, seconds: float) -> None:
        self.background[name] = seconds

    @property
    def first_step_done(self) -> bool:
        return any(name == "first_step" for name, _ in self.marks)

    def phases(self) -> dict[str, float]:
        """``{phase: seconds}`` in the order marked (a phase marked twice adds up); the first counts from ``t0``."""
        out: dict[str, float] = {}
        previous = self.t0
        for name, at in self.marks:
            out[name] = out.get(name, 0.0) + (at - previous)
            previous = at
        return out

    def metrics(self) -> dict[str, float]:
        out = {f"startup/{name}_s": round(s, 3) for name, s in self.phases().items()}
        out.update({f"startup/{name}_bg_s": round(s, 3) for name, s in self.background.items()})
        done = [PREFETCH_STATS[src] for src in self.prefetched if PREFETCH_STATS[src]["done"]]
        if done:  # what the page-cache prefetch had to read from disk (0 = the weights were cached already)
            out["startup/prefetch_read_gib"] = round(sum(s["read_gib"] for s in done), 2)
            out["startup/prefetch_bg_s"] = round(sum(s["seconds"] for s in done), 3)
        if self.first_step_done:
            out["startup/to_first_step_s"] = round(dict(self.marks)["first_step"] - self.t0, 3)
        return out

    def table(self) -> str:
        """One line per phase (seconds, share of the time to the first step), for printing."""
        total = dict(self.marks).get("first_step", self.marks[-1][1] if self.marks else self.t0) - self.t0
        lines = [f"{name:<14} {s:7.2f} s  {100 * s / total if total else 0:5.1f} %"
                 for name, s in self.phases().items()]
        lines += [f"{name + ' (bg)':<14} {s:7.2f} s" for name, s in self.background.items()]
        lines.append(f"{'total':<14} {total:7.2f} s")
        return "\n".join(lines)

    def callback(self):
        """A TrainerCallback marking ``train_begin`` and, at the end of the first optimizer step, ``first_step``."""
        from transformers import TrainerCallback

        clock = self

        class StartupCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if not clock.first_step_done:
                    clock.mark("train_begin")

            def on_step_end(self, args, state, control, **kwargs):
                if clock.first_step_done:
                    return
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # once: the step's kernels have run, not just been queued
                clock.mark("first_step")

        return StartupCallback()


class Background:
    """``fn()`` started in a thread now; :meth:`result` waits for it (re-raising its error) and records how long it
    ran in ``clock`` under ``name``. For work that releases the GIL most of its time (reading safetensors shards,
    copying them to the GPU) while the main thread does other work (tokenising the data)."""

    def __init__(self, name: str, fn, clock: StartupClock | None = None):
        import threading

        self.name, self.clock = name, clock
        self._value = self._error = None
        self._seconds = 0.0
        self._discarded = self._finished = False
        self._lock = threading.Lock()

        def run():
            started = time.time()
            try:
                self._value = fn()
            except BaseException as err:  # handed to the caller of result()
                self._error = err
            self._seconds = time.time() - started
            with self._lock:
                self._finished = True
                if self._discarded:  # nobody will take it: free it (a loaded model) now
                    self._value = self._error = None

        self._thread = threading.Thread(target=run, name=f"peft-arena-{name}")
        self._thread.start()

    def discard(self) -> None:
        """The caller failed before taking the result: the thread finishes, then drops what it made (nothing stays
        referenced from a traceback that keeps this object alive)."""
        with self._lock:
            self._discarded = True
            if self._finished:
                self._value = self._error = None

    def result(self):
        self._thread.join()
        if self.clock is not None:
            self.clock.record_background(self.name, self._seconds)
        if self._error is not None:
            raise self._error
        value, self._value = self._value, None
        return value


@contextmanager
def frozen_gc():
    """The objects alive now (after the imports: ~500k modules, functions, classes) left out of the cyclic garbage
    collector's scans until the block ends, when they go back to its oldest generation. Each full collection then
    skips them: the Trainer's ``gc.collect()`` when training begins took ~0.5 s on a 2-core CPU, ~0 s frozen.
    Nothing is freed later than it would be: garbage among them waits for the first full collection after the
    block. A block inside another (or after someone else froze) changes nothing."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ------------------------------------------------------------------------------------------- weights prefetch
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore: bit 0 of each page's byte = resident


def resident_fraction(path: str | os.PathLike) -> float:
    """Share of ``path``'s pages in the page cache (``mincore`` on a private mapping; Linux/macOS)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if not size:
            return 1.0
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: a buffer ctypes can address; no copies
        try:
            anchor = ctypes.c_char.from_buffer(mm)
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            del anchor
            return bytes(vec).translate(_LOW_BIT).count(1) / pages
        finally:
            mm.close()


def weight_files(source: str) -> list[str]:
    """The safetensors shards of a local model folder ([] for a hub id or a folder without them)."""
    from pathlib import Path

    folder = Path(source)
    return sorted(str(p) for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_PREFETCHED: set[str] = set()  # sources whose prefetch this process started
PREFETCH_STATS: dict[str, dict] = {}  # source -> GiB read (0: all cached), seconds, done


def prefetch_base(name_or_path: str) -> str | None:
    """:func:`prefetch_weights` of a base given as train-sft takes it (short name, folder, hub id: only local
    folders are prefetched); returns the folder when a prefetch started. An unknown name is left for the loader
    to report."""
    from peft_arena.models import ModelNotFoundError, resolve_base

    try:
        source = resolve_base(name_or_path, materialise=False).source
        return source if prefetch_weights(source) is not None else None
    except (ModelNotFoundError, OSError):
        return None


def prefetch_weights(source: str, chunk: int = 8 << 20):
    """Read a local model folder's safetensors shards into the page cache in a background (daemon) thread, so that
    a cold disk is read while the process imports and tokenises instead of when the loader asks for each tensor.
    Shards already ≥ 90 % cached are skipped (a warm start costs a ``mincore`` call per shard); nothing is
    prefetched when the shards would not fit in half of the available memory (it would evict what the loader
    needs). Plain reads: the GIL is released while the kernel reads. Returns the thread, or None."""
    files = weight_files(source)
    if not files or source in _PREFETCHED:
        return None
    _PREFETCHED.add(source)
    total = sum(os.path.getsize(f) for f in files)
    if total > _available_bytes() // 2:
        return None

    stats = PREFETCH_STATS.setdefault(source, {"read_gib": 0.0, "seconds": 0.0, "done": False})

    def run():
        started, buf = time.time(), bytearray(chunk)
        for path in files:
            try:
                cached = resident_fraction(path) >= 0.9
            except Exception:  # no mincore here (not Linux/macOS): read the shard anyway
                cached = False
            if cached:
                continue
            try:
                with open(path, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        stats["read_gib"] += n / 1024 ** 3
            except OSError:  # a prefetch only saves time: the loader reads (and reports) the file itself
                continue
        stats.update(seconds=time.time() - started, done=True)

    import threading

    thread = threading.Thread(target=run, name="peft-arena-prefetch", daemon=True)
    thread.start()
    return thread


def warm_cuda(device: str, dtype) -> None:
    """Load the CUDA math libraries a training step needs (cuBLAS/cuBLASLt for the matmuls, the attention kernels'
    library for SDPA) with tiny tensors, in the loader thread while the weights stream in, instead of inside the
    first forward. Zeros only: no random number is drawn (the CUDA generator's state is left as it was). A cuBLAS
    handle made here goes back to PyTorch's pool when the thread ends and is reused by the main thread."""
    import torch
    import torch.nn.functional as F

    if not str(device).startswith("cuda"):
        return
    a = torch.zeros(64, 64, dtype=dtype, device=device, requires_grad=True)
    (a @ a).sum().backward()
    q = torch.zeros(1, 4, 16, 128, dtype=dtype, device=device, requires_grad=True)
    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    torch.cuda.synchronize(device)
