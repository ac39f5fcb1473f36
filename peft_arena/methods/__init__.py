"""Every PEFT method of the arena, one module per family. Importing this package fills the registry.

Adding a method: write its module (build function + ``register(MethodSpec(...))``) and import it below.
"""

from peft_arena.methods import adalora, boft, full, ia3, keeplora, lora, miss, oft, svd_init, vera  # noqa: F401  (registers)
from peft_arena.methods.registry import (
    METHODS,
    BuildContext,
    MergeError,
    MethodError,
    MethodSpec,
    describe_methods,
    get_method,
)

__all__ = ["METHODS", "BuildContext", "MergeError", "MethodError", "MethodSpec", "describe_methods", "get_method"]
