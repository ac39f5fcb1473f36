"""Generation backends behind one interface.

``backend.generate(prompts, n, temperature, max_new_tokens, stop, seed) -> list[list[str]]`` returns ``n``
completions per prompt; ``backend.mean_nll(texts) -> list[float]`` gives the mean per-token negative
log-likelihood of each text (OpenCompass's PPL inferencer compares exactly this across candidates).

A prompt is a list of chat messages (``{"role", "content"}``) or a plain string. Models whose tokenizer has a
chat template get it applied (one generation prompt after the last user turn); plain LMs get the messages'
contents concatenated, which is how OpenCompass renders its templates for base models.

* :class:`VllmBackend` – used when ``vllm`` is installed (the merged model folder is loaded as is).
* :class:`TransformersBackend` – batched ``generate`` with left padding and the KV cache, a tqdm bar on stderr,
  stop strings honoured during decoding and trimmed afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
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


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_path: str, batch_size: int = 8, progress: bool = True, dtype: str = "float32",
                 device: str | None = None):
        import torch

        from peft_arena.models import load_model, load_tokenizer

        self.torch = torch
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, dtype=dtype, device=self.device).eval()
        self.batch_size = batch_size
        self.progress = progress

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    def _batches(self, texts: list[str], desc: str):
        from tqdm.auto import tqdm

        # Longest first, so padding is small inside a batch and an out-of-memory shows up at once.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not self.progress, file=sys.stderr, leave=False):
            yield order[start:start + self.batch_size]

    def generate(self, prompts: list[Prompt], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int = 0, top_p: float = 1.0, desc: str = "generate"
                 ) -> list[list[str]]:
        torch = self.torch
        texts = [self.render(p) for p in prompts]
        out: list[list[str]] = [[] for _ in texts]
        sampling = temperature > 0
        for batch_no, idx in enumerate(self._batches(texts, desc)):
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=n, do_sample=sampling,
                          pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
            if sampling:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if stop:
                kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
            torch.manual_seed(seed + batch_no)  # reproducible for the same batch size and prompt order
            with torch.no_grad():
                gen = self.model.generate(**enc, **kwargs)
            new_tokens = gen[:, enc["input_ids"].shape[1]:]
            decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for j, i in enumerate(idx):
                out[i] = [truncate_at_stop(t, stop) for t in decoded[j * n:(j + 1) * n]]
        return out

    def mean_nll(self, texts: list[str], desc: str = "loglikelihood") -> list[float]:
        torch = self.torch
        result = [0.0] * len(texts)
        for idx in self._batches(texts, desc):
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            labels = enc["input_ids"][:, 1:]
            mask = enc["attention_mask"][:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
            per_text = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
            for j, i in enumerate(idx):
                result[i] = float(per_text[j])
        return result


class VllmBackend:
    """vLLM offline engine on a (merged) HF folder. Cannot run on the CPU test machine; the code path is real."""

    name = "vllm"

    def __init__(self, model_path: str, seed: int = 0, dtype: str = "bfloat16", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1):
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size)
        self.tokenizer = self.llm.get_tokenizer()

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    def generate(self, prompts: list[Prompt], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int = 0, top_p: float = 1.0, desc: str = "generate"
                 ) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, stop=list(stop) or None, seed=seed)
        texts = [self.render(p) for p in prompts]
        outputs = self.llm.generate(texts, params, use_tqdm=True)
        return [[c.text for c in o.outputs] for o in outputs]

    def mean_nll(self, texts: list[str], desc: str = "loglikelihood") -> list[float]:
        from vllm import SamplingParams

        outputs = self.llm.generate(texts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=True)
        result = []
        for o in outputs:
            ids = o.prompt_token_ids
            logprobs = [lp[tok].logprob for tok, lp in zip(ids[1:], o.prompt_logprobs[1:])]
            result.append(-sum(logprobs) / max(len(logprobs), 1))
        return result


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_backend(model_path: str, backend: str = "auto", batch_size: int = 8, progress: bool = True,
                 seed: int = 0):
    """``auto`` picks vLLM when it is installed, else transformers."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
    if backend == "vllm":
        if not vllm_available():
            raise RuntimeError("backend='vllm' but vllm is not installed; install it or use backend='transformers'")
        return VllmBackend(model_path, seed=seed)
    if backend == "transformers":
        return TransformersBackend(model_path, batch_size=batch_size, progress=progress)
    raise ValueError(f"unknown backend {backend!r}; use auto, vllm or transformers")
