"""vLLM's offline engine on a (merged) HF folder: one engine at a time, fed token ids, shut down when done.

The engine receives the prompt's token ids (:func:`~peft_arena.evaluation.backends.common.encode_prompt`),
never text: vLLM would tokenise text with the special tokens added again (a second BOS after the chat
template's, on Llama). ``tensor_parallel_size``, ``max_model_len`` (the paper used 9216; clamped to the model's
own limit), ``gpu_memory_utilization`` and ``dtype`` are evaluation settings. :meth:`VllmBackend.close` shuts
the engine core (and its worker processes) down before the next model's engine starts.
"""

from __future__ import annotations

import gc
import sys
from typing import Sequence

from peft_arena.evaluation.backends.common import Prompt, encode_prompt, encode_text, render_prompt

PAPER_MAX_MODEL_LEN = 9216

_open_engine: "VllmBackend | None" = None  # the one engine this process may hold


def model_max_len(model_path: str) -> int | None:
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    return getattr(text, "max_position_embeddings", None)


class VllmBackend:
    name = "vllm"

    def __init__(self, model_path: str, *, seed: int = 0, dtype: str = "auto", max_model_len: int = PAPER_MAX_MODEL_LEN,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 progress: bool = True, **engine_kwargs):
        global _open_engine
        if _open_engine is not None:
            raise RuntimeError("a vLLM engine is already open in this process; close() it before starting another "
                               "(two engines would split the GPU memory between them)")
        from vllm import LLM

        from peft_arena.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_path)  # the transformers path's tokenizer: same ids
        limit = model_max_len(model_path)
        self.max_model_len = min(max_model_len, limit) if limit else max_model_len
        if self.max_model_len < max_model_len:
            print(f"[evaluate] vllm: max_model_len {max_model_len} exceeds the model's {limit}; using {limit}",
                  file=sys.stderr)
        self.settings = {"dtype": dtype, "max_model_len": self.max_model_len,
                         "gpu_memory_utilization": gpu_memory_utilization,
                         "tensor_parallel_size": tensor_parallel_size}
        self.progress = progress
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=self.max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enforce_eager=enforce_eager, trust_remote_code=False, **engine_kwargs)
        _open_engine = self
        self.last_prompt_ids: list[list[int]] = []

    def describe(self) -> dict:
        return dict(self.settings)

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def generate(self, prompts: list[Prompt], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int = 0, top_p: float = 1.0, desc: str = "generate",
                 ignore_eos: bool = False) -> list[list[str]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, stop=list(stop) or None, seed=seed,
                                ignore_eos=ignore_eos, skip_special_tokens=True)
        ids = [self.encode(p) for p in prompts]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=self.progress)
        self.last_prompt_ids = [list(o.prompt_token_ids) for o in outputs]  # what the engine actually received
        return [[c.text for c in o.outputs] for o in outputs]

    def mean_nll(self, texts: list[str], desc: str = "loglikelihood") -> list[float]:
        from vllm import SamplingParams, TokensPrompt

        ids = [encode_text(self.tokenizer, t) for t in texts]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                                    SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=self.progress)
        result = []
        for o in outputs:
            tokens = o.prompt_token_ids
            logprobs = [lp[tok].logprob for tok, lp in zip(tokens[1:], o.prompt_logprobs[1:])]
            result.append(-sum(logprobs) / max(len(logprobs), 1))
        return result

    def close(self) -> None:
        """Shut the engine core and its workers down and free the device, so the next engine starts clean."""
        global _open_engine
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
            del llm
            if _open_engine is self:
                _open_engine = None
            try:
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            finally:
                gc.collect()
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
