"""Evaluation: benchmark registry, data sources, generation backends, scorers, arena scores.

Importing the package registers every benchmark (the member modules below fill the registry table, in this
order: target math, target medical, general, extended).
"""

# isort: off
from peft_arena.evaluation import target_math  # noqa: F401  (registration)
from peft_arena.evaluation import target_med  # noqa: F401
from peft_arena.evaluation import general  # noqa: F401
from peft_arena.evaluation import extended  # noqa: F401
# isort: on
from peft_arena.evaluation.benchmarks import (  # noqa: F401
    BENCHMARKS,
    BenchmarkSpec,
    describe_benchmarks,
    describe_suites,
    suite_of,
    get_benchmark,
    resolve_suite,
)
