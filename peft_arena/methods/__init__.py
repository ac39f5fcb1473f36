"""Every PEFT method of the arena, one module per family. Importing this package fills the registry."""

from peft_arena.methods.registry import METHODS, BuildContext, MergeError, MethodError, MethodSpec, get_method

__all__ = ["METHODS", "BuildContext", "MergeError", "MethodError", "MethodSpec", "get_method"]
