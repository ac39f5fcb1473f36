"""A work limit for symbolic comparison that counts Python calls instead of seconds.

math-verify bounds its work with ``signal.alarm``: a wall-clock limit, main thread only. On a loaded machine the
same comparison takes longer, so the verdict on the same pair of answers can flip (issue 14 saw it in the GRPO
reward). :func:`run_with_budget` instead counts Python function calls (``sys.settrace``'s call events, one per
frame) and stops the work after ``max_calls``. The count depends on the inputs, not on how busy the CPU is, it
works in every thread, and it needs no helper process.

Garbage collection is paused while the budget runs, so finalisers do not fire (and count) at moments that depend
on the process's history. Counts can still differ by a few hundred calls between runs (sympy iterates some sets
in hash or identity order); ordinary answers stay far below any useful limit, so that cannot flip a verdict.

Work that happens inside a single C call (big-integer arithmetic such as ``9^{9^9}``) is invisible to the count;
the math grader refuses such expressions before evaluating them (``math_answer._too_big``).
"""

from __future__ import annotations

import gc
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


class BudgetExceeded(BaseException):
    """Raised inside the budgeted work when it used up its calls.

    A BaseException on purpose: math-verify and sympy catch ``Exception`` (and math-verify its own
    ``TimeoutException``) to turn errors into "not equal"; none of them catches this, so it unwinds the whole
    comparison and :func:`run_with_budget` returns the fallback.
    """


_LOCK = threading.RLock()  # sympy's caches are process-wide; one budgeted comparison at a time keeps counts exact


def run_with_budget(fn: Callable[[], T], max_calls: int, fallback: T) -> tuple[T, int]:
    """``(fn(), calls used)``, or ``(fallback, calls used)`` when ``fn`` needs more than ``max_calls`` calls.

    CPython removes a trace function that raises, so an exhausted budget whose exception is swallowed (a generator
    finalised during garbage collection, a bare ``except:`` in mpmath) would let the work run on unbounded. Once
    the budget is spent, a profile hook therefore re-installs the tracer at every event until the work has
    unwound, and a result that arrives after the budget was spent is discarded. A tracer or profiler already
    installed in this thread (a debugger, coverage) is restored afterwards.
    """
    count = 0
    spent = False
    finished = False

    def tracer(frame, event, arg):  # sys.settrace: called on "call" events; returning None skips line events
        nonlocal count, spent
        count += 1
        if count > max_calls:
            if not spent:
                spent = True
                sys.setprofile(rearm)
            raise BudgetExceeded
        return None

    def rearm(frame, event, arg):  # sys.setprofile, only once the budget is spent; never raises itself
        if not finished and sys.gettrace() is not tracer:
            sys.settrace(tracer)

    def unraisable(info):  # "Exception ignored in …" for our own exception is expected noise
        if not (isinstance(info.exc_value, BudgetExceeded) and not finished):
            previous_hook(info)

    with _LOCK:
        previous_trace, previous_profile, previous_hook = sys.gettrace(), sys.getprofile(), sys.unraisablehook
        sys.unraisablehook = unraisable
        gc_was_enabled = gc.isenabled()
        gc.disable()  # collections fire when allocation counters say so (process history) and run finalisers
        sys.settrace(tracer)
        try:
            result = fn()
        except BudgetExceeded:
            result = fallback
        finally:
            finished = True  # first: makes rearm inert before the restoring calls below fire profile events
            sys.settrace(previous_trace)
            sys.setprofile(previous_profile)
            sys.unraisablehook = previous_hook
            if gc_was_enabled:
                gc.enable()
        return (fallback if spent else result), count
