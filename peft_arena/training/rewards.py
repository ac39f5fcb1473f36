"""Verifiable rewards for GRPO, as plain TRL reward functions.

TRL calls ``fn(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and wants one float per
completion. Completions are strings, or conversations (``[{"role": "assistant", "content": ...}]``) for chat
prompts; both are accepted. Every function returns 0.0 rather than raising on any model output.

* :func:`math_reward`: 1.0 when the last ``\\boxed{}`` is mathematically equivalent to the ground truth
  (math-verify), else 0.0. Like the paper's RL scorer (reference §3.2) there is no partial credit; unlike it,
  there is no fall-back to "the answer is …" or to the last number: the prompt asks for a box, and rewarding
  unboxed numbers teaches the policy to skip it.
* :func:`med_mc_reward`: 1.0 when the chosen option letter equals the ground truth letter.
* :func:`format_reward`: 1.0 when the completion ends its reasoning with a non-empty ``\\boxed{}``.

Time limits: math-verify bounds parsing and comparison with ``signal.alarm``, which only works in the main
thread (dependency-notes §4.4). In the main thread we use it as is; from any other thread the check runs in a
helper process that is killed and restarted when it overruns. Inputs are capped before parsing, so neither a
1 MB completion nor an exponent tower like ``9^{9^{9^9}}`` can stall training.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
from typing import Any, Iterable

from peft_arena.data.answers import last_boxed

MATH_VERIFY_TIMEOUT_S = 2  # per parse and per verify call; math-verify's alarm takes whole seconds
MAX_ANSWER_CHARS = 300  # a boxed answer longer than this is not an answer (and would be slow to parse)
MAX_TAIL_CHARS = 4000  # the letter/format searches look at the end of a completion only

_LETTERS = "ABCDEFGHIJ"  # up to MMLU-Pro's ten options
_BOXED_LETTER = re.compile(r"^\s*(?:\\text\{|\\textbf\{|\\mathrm\{)?\s*\(?\s*([A-J])\s*\)?\s*(?:\}|[.:)]|\s|$)")
_ANSWER_IS_LETTER = re.compile(  # "answer" in any case, the letter upper case ("the answer is a ..." is no letter)
    r"(?i:answer\s*(?:is|:)?\s*(?:option\s*)?)[:\s]*\(?\s*\**\s*([A-J])\b(?![a-z'])"
)
_LONE_LETTER_LINE = re.compile(r"(?:(?:final\s+)?(?:option|answer|choice)\s*:?\s*)?\**\(?([A-J])\)?\**\.?", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is, a conversation's assistant turns joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        parts = [m.get("content") or "" for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        return "\n".join(str(p) for p in parts)
    return "" if completion is None else str(completion)


# ---------------------------------------------------------------------------------------------------- math


def math_reward(completions: list, ground_truth: list[str], **kwargs) -> list[float]:
    """1.0 per completion whose last ``\\boxed{}`` equals its ground truth under math-verify, else 0.0."""
    return [1.0 if math_correct(completion_text(c), str(gt)) else 0.0 for c, gt in zip(completions, ground_truth)]


def math_correct(text: str, ground_truth: str) -> bool:
    """Is the last boxed answer in ``text`` equivalent to ``ground_truth``? Never raises, never hangs."""
    predicted = last_boxed(text, max_chars=MAX_ANSWER_CHARS)
    if predicted is None or not predicted.strip() or len(ground_truth) > 10 * MAX_ANSWER_CHARS:
        return False
    if _canonical(predicted) == _canonical(ground_truth):
        return True
    if threading.current_thread() is threading.main_thread():
        return _verify_in_process(ground_truth, predicted, MATH_VERIFY_TIMEOUT_S)
    return _helper().verify(ground_truth, predicted, MATH_VERIFY_TIMEOUT_S)


def _canonical(answer: str) -> str:
    """Cheap exact-match key: no spaces, no ``$``, no ``\\left``/``\\right``, ``\\dfrac``→``\\frac``."""
    s = _SPACES.sub("", answer).strip("$.")
    return s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _verify_in_process(gold: str, predicted: str, timeout_s: int | None) -> bool:
    """math-verify on two boxed answers; ``timeout_s`` uses signal.alarm (main thread only), None disables it."""
    try:
        from math_verify import parse, verify

        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout_s)
        pred_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except BaseException as e:  # math-verify raises TimeoutException, sympy anything; a reward must not
        if isinstance(e, KeyboardInterrupt):
            raise
        return False


class _VerifyHelper:
    """A helper process running math-verify in its own main thread, so its alarms work; killed on overrun."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from peft_arena.training.rewards import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        if self._readline(proc, 120.0) != "ready":
            proc.kill()
            raise RuntimeError("the math-verify helper process did not start (is math-verify installed?)")
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout_s: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line.strip() if line else None

    def verify(self, gold: str, predicted: str, timeout_s: int) -> bool:
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                self._proc.stdin.write(json.dumps({"gold": gold, "pred": predicted, "timeout": timeout_s}) + "\n")
                self._proc.stdin.flush()
                # parse twice + verify, each bounded inside the helper; the margin covers a stuck C call
                reply = self._readline(self._proc, 3 * timeout_s + 2.0)
            except (OSError, ValueError):
                reply = None
            if reply is None:
                self.close()
                return False
            return reply == "1"

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


_HELPER: _VerifyHelper | None = None
_HELPER_LOCK = threading.Lock()


def _helper() -> _VerifyHelper:
    global _HELPER
    with _HELPER_LOCK:
        if _HELPER is None:
            _HELPER = _VerifyHelper()
        return _HELPER


def _serve() -> None:
    """Helper process loop: one JSON request per line in, ``1``/``0`` per line out."""
    import math_verify  # noqa: F401  (import before announcing readiness)

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        ok = _verify_in_process(request["gold"], request["pred"], int(request["timeout"]))
        print("1" if ok else "0", flush=True)


# ---------------------------------------------------------------------------------------------------- medical


def med_mc_reward(completions: list, ground_truth: list[str], **kwargs) -> list[float]:
    """1.0 per completion whose chosen option matches its ground truth (a letter, or a label such as "yes")."""
    return [1.0 if med_correct(completion_text(c), str(gt)) else 0.0 for c, gt in zip(completions, ground_truth)]


def med_correct(text: str, ground_truth: str) -> bool:
    gold = ground_truth.strip()
    if len(gold) == 1 and gold.upper() in _LETTERS:
        return extract_option_letter(text) == gold.upper()
    # a worded label (PubMedQA-style yes/no/maybe): compare the boxed word
    boxed = last_boxed(text, max_chars=MAX_ANSWER_CHARS)
    if boxed is None:
        return False
    return _canonical(_strip_text_command(boxed)).lower() == _canonical(gold).lower()


def extract_option_letter(text: str) -> str | None:
    """The option letter a completion chose: ``\\boxed{C}``, else the last "answer is C", else a lone last-line letter."""
    boxed = last_boxed(text, max_chars=MAX_ANSWER_CHARS)
    if boxed is not None:
        match = _BOXED_LETTER.match(boxed)
        return match.group(1) if match else None  # a box with no letter in it is a wrong answer, not a cue to guess
    tail = text[-MAX_TAIL_CHARS:]
    matches = list(_ANSWER_IS_LETTER.finditer(tail))
    if matches:
        return matches[-1].group(1)
    lines = [line for line in tail.splitlines() if line.strip()]
    if lines:
        # a last line that is only a letter: "C", "(C)", "Option C." — never "A" opening a sentence
        match = _LONE_LETTER_LINE.fullmatch(lines[-1].strip())
        if match and match.group(1).isupper():
            return match.group(1)
    return None


def _strip_text_command(s: str) -> str:
    match = re.fullmatch(r"\s*\\(?:text|textbf|mathrm)\{(.*)\}\s*", s)
    return match.group(1) if match else s


# ---------------------------------------------------------------------------------------------------- format


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion has a closed, non-empty ``\\boxed{}`` and at most a short sentence after it."""
    scores = []
    for c in completions:
        text = completion_text(c)
        start = text.rfind("\\boxed")
        boxed = last_boxed(text, max_chars=MAX_ANSWER_CHARS)
        if start < 0 or boxed is None or not boxed.strip():
            scores.append(0.0)
            continue
        after = len(text) - (start + len("\\boxed{") + len(boxed) + 1)
        scores.append(1.0 if after <= 200 else 0.0)
    return scores


# ---------------------------------------------------------------------------------------------------- helpers

CORRECTNESS_REWARDS = {"math": math_reward, "med": med_mc_reward}


def correctness_reward(domain: str):
    """The 0/1 correctness reward of a domain (what accuracy is measured with)."""
    try:
        return CORRECTNESS_REWARDS[domain]
    except KeyError:
        raise ValueError(f"no reward for domain {domain!r}: use one of {', '.join(CORRECTNESS_REWARDS)}") from None


def is_correct(completion: Any, ground_truth: str, domain: str) -> bool:
    return correctness_reward(domain)([completion], [ground_truth])[0] == 1.0


def accuracy(completions: Iterable[Any], ground_truths: Iterable[str], domain: str) -> float:
    """Fraction of completions judged correct (0.0 for an empty list)."""
    completions, ground_truths = list(completions), list(ground_truths)
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    if not completions:
        return 0.0
    scores = correctness_reward(domain)(completions, ground_truths)
    return sum(scores) / len(scores)
