"""Generation backends behind one interface.

``backend.generate(prompts, n, temperature, max_new_tokens, stop, seed) -> list[list[str]]`` returns ``n``
completions per prompt; ``backend.mean_nll(texts) -> list[float]`` gives the mean per-token negative
log-likelihood of each text (OpenCompass's PPL inferencer compares exactly this across candidates);
``backend.close()`` frees the engine before the next one starts; ``backend.describe()`` gives the settings
that are recorded with the results.

A prompt is a list of chat messages (``{"role", "content"}``) or a plain string. Models whose tokenizer has a
chat template get it applied (one generation prompt after the last user turn); plain LMs get the messages'
contents concatenated, which is how OpenCompass renders its templates for base models. Every backend sends
the model the same token ids (``backends/common.py``).

* ``transformers`` (:mod:`.backends.transformers`): batched ``generate``; bf16, token-budget batches and
  static cache + compilation on a GPU.
* ``vllm`` (:mod:`.backends.vllm`): vLLM's offline engine, one at a time, shut down after the suite.
* ``openai`` (:mod:`.backends.openai`): a running OpenAI-compatible vLLM server at ``base_url``.
"""

from __future__ import annotations

import importlib.util

from peft_arena.evaluation.backends.common import Prompt, render_prompt, truncate_at_stop  # noqa: F401
from peft_arena.evaluation.backends.transformers import TransformersBackend

BACKENDS = ("auto", "transformers", "vllm", "openai")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_backend(model_path: str, backend: str = "auto", batch_size: int = 0, progress: bool = True,
                 seed: int = 0, *, dtype: str = "auto", max_batch_tokens: int = 0, max_model_len: int = 9216,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85, base_url: str = ""):
    """``auto``: the OpenAI-compatible server when ``base_url`` is set, else vLLM when installed, else
    transformers. ``batch_size``/``max_batch_tokens`` size the transformers backend's batches (0 = auto);
    ``max_model_len``, ``tensor_parallel_size``, ``gpu_memory_utilization`` configure the vLLM engine."""
    if backend == "auto":
        backend = "openai" if base_url else "vllm" if vllm_available() else "transformers"
    if backend == "openai":
        from peft_arena.evaluation.backends.openai import OpenAIBackend

        return OpenAIBackend(model_path, base_url, progress=progress)
    if base_url:
        raise ValueError(f"base_url is only used by backend=openai (or auto), not backend={backend}")
    if backend == "vllm":
        if not vllm_available():
            raise RuntimeError("backend='vllm' but vllm is not installed: `pip install -e .[vllm]` on a CUDA machine "
                               "(README, 'Generation with vLLM'), or use backend=transformers")
        from peft_arena.evaluation.backends.vllm import VllmBackend

        return VllmBackend(model_path, seed=seed, dtype=dtype, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                           progress=progress)
    if backend == "transformers":
        return TransformersBackend(model_path, dtype=dtype, max_batch_size=batch_size,
                                   max_batch_tokens=max_batch_tokens, progress=progress)
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
