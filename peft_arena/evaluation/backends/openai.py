"""Evaluate against a running OpenAI-compatible vLLM server (``vllm serve`` / ``trl vllm-serve``), so a team
can share one server instead of starting an engine per evaluation.

Prompts go to ``/v1/completions`` as token ids (rendered and encoded locally with the model's tokenizer, the
same ids as the other backends), so the server adds no special tokens of its own. The server must serve the
evaluated model: its ``/v1/models`` entry (``id`` or ``root``) has to name ``model_path``, else the evaluation
stops before any request (scores against the wrong model would be silently wrong).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from peft_arena.evaluation.backends.common import Prompt, encode_prompt, encode_text, render_prompt

PROMPTS_PER_REQUEST = 32


class OpenAIBackend:
    name = "openai"

    def __init__(self, model_path: str, base_url: str, *, served_model: str = "", api_key: str = "EMPTY",
                 timeout: float = 600.0, concurrency: int = 8, progress: bool = True):
        from peft_arena.models import load_tokenizer

        if not base_url:
            raise ValueError("backend=openai needs base_url, e.g. http://127.0.0.1:8000 (a running `vllm serve`)")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout, self.concurrency, self.progress = api_key, timeout, concurrency, progress
        self.tokenizer = load_tokenizer(model_path)
        self.model = self._served_model(model_path, served_model)
        self.last_prompt_ids: list[list[int]] = []

    # ------------------------------------------------------------------------------------------------ http

    def _request(self, path: str, payload: dict | None = None) -> dict:
        req = urllib.request.Request(self.base_url + path, method="POST" if payload is not None else "GET",
                                     data=json.dumps(payload).encode() if payload is not None else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.base_url}{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach the OpenAI-compatible server at {self.base_url} ({e.reason}); "
                               "start one with `vllm serve <model>` or fix base_url") from None

    def _served_model(self, model_path: str, served_model: str) -> str:
        models = self._request("/v1/models").get("data", [])
        names = {m["id"]: m for m in models}
        if served_model:
            if served_model not in names:
                raise RuntimeError(f"{self.base_url} serves {sorted(names)}, not {served_model!r}")
            return served_model
        wanted = {model_path, str(Path(model_path).expanduser().resolve())}
        for m in models:
            if m["id"] in wanted or m.get("root") in wanted:
                return m["id"]
        raise RuntimeError(f"the server at {self.base_url} serves {[(m['id'], m.get('root')) for m in models]}, "
                           f"not the evaluated model {model_path}; serve that model (or pass served_model)")

    def describe(self) -> dict:
        return {"base_url": self.base_url, "served_model": self.model}

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def _completions(self, requests: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda body: self._request("/v1/completions", body), requests))

    # ------------------------------------------------------------------------------------------------ api

    def generate(self, prompts: list[Prompt], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int = 0, top_p: float = 1.0, desc: str = "generate",
                 ignore_eos: bool = False) -> list[list[str]]:
        ids = [self.encode(p) for p in prompts]
        self.last_prompt_ids = ids
        chunks = [ids[i:i + PROMPTS_PER_REQUEST] for i in range(0, len(ids), PROMPTS_PER_REQUEST)]
        common = {"model": self.model, "n": n, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
                  "max_tokens": max_new_tokens, "seed": seed, "ignore_eos": ignore_eos,
                  "skip_special_tokens": True, "add_special_tokens": False}
        if stop:
            common["stop"] = list(stop)
        if self.progress:
            print(f"[evaluate] {desc}: {len(ids)} prompts to {self.base_url}", file=sys.stderr, flush=True)
        responses = self._completions([{**common, "prompt": chunk} for chunk in chunks])
        out: list[list[str]] = []
        for chunk, response in zip(chunks, responses):
            texts = [[""] * n for _ in chunk]
            for choice in response["choices"]:  # index = prompt position in the request × n + sample
                texts[choice["index"] // n][choice["index"] % n] = choice["text"]
            out.extend(texts)
        return out

    def mean_nll(self, texts: list[str], desc: str = "loglikelihood") -> list[float]:
        ids = [encode_text(self.tokenizer, t) for t in texts]
        body = {"model": self.model, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0.0,
                "add_special_tokens": False}
        responses = self._completions([{**body, "prompt": i} for i in ids])
        result = []
        for tokens, response in zip(ids, responses):
            logprobs = response["choices"][0]["logprobs"]["token_logprobs"][1:len(tokens)]
            result.append(-sum(logprobs) / max(len(logprobs), 1))
        return result

    def close(self) -> None:
        """Nothing to free: the server is shared and stays up."""
