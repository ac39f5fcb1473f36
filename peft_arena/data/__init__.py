"""Training data: the normalised record, PEFT-Arena's schema, loaders for every source kind, TRL datasets."""

from peft_arena.data.answers import gsm8k_solution, last_boxed
from peft_arena.data.schema import (
    DOMAINS,
    INSTRUCTIONS,
    grpo_dataset,
    normalise_row,
    rl_prompt_text,
    to_peft_arena_row,
)
from peft_arena.data.sources import SOURCES, DataSourceError, list_sources, load_records

__all__ = [
    "DOMAINS", "INSTRUCTIONS", "SOURCES", "DataSourceError", "grpo_dataset", "gsm8k_solution", "last_boxed",
    "list_sources", "load_records", "normalise_row", "rl_prompt_text", "to_peft_arena_row",
]
