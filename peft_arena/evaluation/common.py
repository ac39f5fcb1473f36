"""Small helpers shared by the benchmark modules: chat messages and their raw-text form, accuracy aggregation,
per-subset means."""

from __future__ import annotations

from collections import defaultdict

BOXED_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
SYSTEM_PROMPT = "You are a helpful assistant."


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def boxed_chat(question: str) -> list[dict]:
    """The paper's ``qwen-boxed`` prompt (system + question + step-by-step/boxed suffix), as chat messages."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"{question}\n{BOXED_SUFFIX}"}]


def completion_text(prompt) -> str:
    """A prompt as raw completion text, as OpenCompass renders a dialogue template for a base model
    (``LMTemplateParser`` without a meta template): the non-empty turns' texts joined by newlines, no roles."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m["content"])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def mean_pct(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def accuracy(records: list[dict]) -> dict[str, float]:
    return {"acc": mean_pct(r["correct"] for r in records)}


def subset_means(records: list[dict], key: str = "subset") -> dict[str, float]:
    """Accuracy per subset (0–100)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        groups[r[key]].append(r["correct"])
    return {name: mean_pct(vals) for name, vals in groups.items()}


def options_block(options: dict[str, str], sep: str = ". ") -> str:
    return "\n".join(f"{k}{sep}{v}" for k, v in options.items())
