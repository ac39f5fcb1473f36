"""What every generation backend shares: prompt rendering, the prompt's token ids, stop-string trimming.

Every backend feeds the model the same token ids for a prompt (:func:`encode_prompt`), so a benchmark scored
through transformers, the vLLM engine or a vLLM server sees identical inputs: the chat template's text when
the tokenizer has one (it carries its own BOS where the model needs one), else the messages' contents
concatenated; then exactly one BOS where the tokenizer would add one, never a second.
"""

from __future__ import annotations

from typing import Sequence, Union

Prompt = Union[str, list]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest stop string (the stop string itself is dropped, as vLLM does)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The exact text fed to the model for one prompt."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] for m in prompt if m["role"] != "system")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of plain text by default (Llama does, SmolLM2/Qwen do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with exactly one BOS where the tokenizer uses one (none added twice)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """The token ids every backend feeds the model for ``prompt``."""
    return encode_text(tokenizer, render_prompt(tokenizer, prompt))
