"""The normalised record every loader returns, the PEFT-Arena row schema, and the TRL datasets built from records.

A record is a plain dict::

    {"question": str,      # the problem as the user asks it (options included for multiple choice)
     "answer": str,        # a full worked response (the SFT target); math answers end in \\boxed{final}
     "ground_truth": str,  # the short answer a reward checks: a math expression, or an option letter
     "domain": "math" | "med",
     "data_source": str}

PEFT-Arena's parquet rows (reference §3.3) look like::

    {"system": str, "data_source": str, "prompt": [{"role", "content"}], "ability": str,
     "reward_model": {"ground_truth": str, "style": "rule"},
     "extra_info": {"question": str, "answer": str, "index": int, "split": str}}

SFT reads ``extra_info.question``/``extra_info.answer`` (tokenised by ``training/sft.py`` exactly as the paper does);
RL reads ``reward_model.ground_truth``.
"""

from __future__ import annotations

from typing import Any, Iterable

from peft_arena.answers import last_boxed
from peft_arena.data.answers import gsm8k_solution, is_gsm8k_answer

DOMAINS = ("math", "med")

# The "qwen-boxed" suffix of the paper's math evaluation (reference §4.1); the medical one asks for the letter.
INSTRUCTIONS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "med": "Please reason step by step, and put the letter of the correct option within \\boxed{}.",
}

# data_source / ability values of the paper's data and of common sets, mapped to our domains
_DOMAIN_ALIASES = {
    "math": "math", "openr1": "math", "gsm8k": "math", "math-sample": "math",
    "med": "med", "medical": "med", "medicine": "med", "med_23k_think": "med", "med-sample": "med",
}


def domain_of(value: str | None) -> str | None:
    """Map a domain name, an ``ability`` or a ``data_source`` value to ``"math"``/``"med"`` (None if unknown)."""
    if not value:
        return None
    return _DOMAIN_ALIASES.get(str(value).strip().lower())


def check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}: use one of {', '.join(DOMAINS)}")
    return domain


def normalise_row(row: dict[str, Any], domain: str | None = None, data_source: str | None = None) -> dict[str, str]:
    """One row of any supported layout → a record.

    Layouts, tried in this order: the PEFT-Arena schema (``extra_info`` + ``reward_model``); plain
    ``question``/``answer`` (GSM8K's ``#### n`` answers are converted to a boxed solution);
    ``problem``/``solution`` (MATH). ``ground_truth`` comes from the row when present, else from the last
    ``\\boxed{}`` of the answer, else it is ``""`` (fine for SFT, refused by :func:`grpo_dataset`).
    """
    extra = row.get("extra_info")
    if isinstance(extra, dict) and ("question" in extra or "answer" in extra):
        question = extra.get("question") or _strip_instruction(_prompt_text(row.get("prompt")))
        answer = extra.get("answer") or ""
        reward_model = row.get("reward_model") or {}
        ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        source = row.get("data_source")
        row_domain = domain_of(row.get("ability")) or domain_of(source)
    else:
        question = row.get("question", row.get("problem", row.get("prompt")))
        if not isinstance(question, str):
            question = _prompt_text(question)
        answer = row.get("answer", row.get("solution", row.get("response", ""))) or ""
        ground_truth = row.get("ground_truth")
        source = row.get("data_source")
        row_domain = domain_of(row.get("domain")) or domain_of(row.get("ability")) or domain_of(source)
    if not question:
        keys = ", ".join(sorted(row))
        raise ValueError(f"row has no question (looked for extra_info.question, question, problem, prompt); keys: {keys}")
    answer = str(answer)
    if is_gsm8k_answer(answer):
        answer, gsm_final = gsm8k_solution(answer)
        ground_truth = ground_truth or gsm_final
    if ground_truth is None or str(ground_truth).strip() == "":
        ground_truth = last_boxed(answer) or ""
    resolved_domain = domain or row_domain
    if resolved_domain is None:
        raise ValueError(
            f"cannot tell the domain of a row from data_source={source!r}: pass domain='math' or domain='med'"
        )
    return {
        "question": str(question).strip(),
        "answer": answer.strip(),
        "ground_truth": str(ground_truth).strip(),
        "domain": check_domain(resolved_domain),
        "data_source": str(data_source or source or "unknown"),
    }


def to_peft_arena_row(record: dict[str, str], index: int, split: str = "train") -> dict[str, Any]:
    """A record → a row in PEFT-Arena's parquet schema (the inverse of :func:`normalise_row`)."""
    return {
        "system": "",
        "data_source": record["data_source"],
        "prompt": [{"role": "user", "content": rl_prompt_text(record["question"], record["domain"])}],
        "ability": "medical" if record["domain"] == "med" else record["domain"],
        "reward_model": {"ground_truth": record["ground_truth"], "style": "rule"},
        "extra_info": {"question": record["question"], "answer": record["answer"], "index": index, "split": split},
    }


def rl_prompt_text(question: str, domain: str) -> str:
    """The user turn GRPO samples from: the question plus the instruction to box the final answer."""
    sep = "\n" if "\n" in question else " "
    return f"{question}{sep}{INSTRUCTIONS[check_domain(domain)]}"


def grpo_dataset(records: Iterable[dict[str, str]], domain: str):
    """Prompts for GRPO: ``prompt`` (one user turn with the boxed-answer instruction), ``ground_truth``, ``domain``.

    Extra columns reach TRL reward functions as keyword arguments of the same name. The reference answer is
    kept as ``answer`` (KeepLoRA's calibration batch and the completions table use it).
    """
    from datasets import Dataset

    check_domain(domain)
    rows = []
    for r in records:
        if not r["ground_truth"]:
            raise ValueError(
                f"record without a ground truth cannot be rewarded: {r['question'][:80]!r} "
                "(give a ground_truth field or end the answer with \\boxed{...})"
            )
        rows.append({
            "prompt": [{"role": "user", "content": rl_prompt_text(r["question"], domain)}],
            "ground_truth": r["ground_truth"],
            "domain": domain,
            "answer": r["answer"],
        })
    if not rows:
        raise ValueError("no records to build a GRPO dataset from")
    return Dataset.from_list(rows)


def _strip_instruction(text: str | None) -> str | None:
    """A question taken from an RL prompt loses our boxed-answer instruction (grpo_dataset adds it back)."""
    if text:
        for instruction in INSTRUCTIONS.values():
            if text.rstrip().endswith(instruction):
                return text.rstrip()[: -len(instruction)].rstrip()
    return text


def _prompt_text(prompt: Any) -> str | None:
    """The last user turn of a chat prompt (PEFT-Arena's ``prompt`` column), or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else None
    return None
