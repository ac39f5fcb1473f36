"""A work limit for symbolic comparison that counts Python calls instead of seconds.

math-verify bounds its work with ``signal.alarm``: a wall-clock limit, main thread only. On a loaded machine the
same comparison takes longer, so the verdict on the same pair of answers can flip (issue 14 saw it in the GRPO
reward). :func:`run_with_budget` instead counts Python function calls (``sys.settrace``'s call events, one per
frame) and stops the work after ``max_calls``. The count depends on the inputs, not on how busy the CPU is, it
works in every thread, and it needs no helper process.

Work that happens inside a single C call (big-integer arithmetic such as ``9^{9^9}``) is invisible to the count;
the math grader refuses such expressions before evaluating them (``math_answer._too_big``).
"""

from __future__ import annotations

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

    A tracer already installed in this thread (a debugger, coverage) is restored afterwards.
    """
    count = 0

    def tracer(frame, event, arg):  # sys.settrace: called on "call" events; returning None skips line events
        nonlocal count
        count += 1
        if count > max_calls:
            raise BudgetExceeded
        return None

    with _LOCK:
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            return fn(), count
        except BudgetExceeded:
            return fallback, count
        finally:
            sys.settrace(previous)
