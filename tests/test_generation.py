"""The transformers backend: token-budget batches, one BOS, and greedy outputs equal to plain ``generate``."""

import pytest

from peft_arena.evaluation.backends.common import encode_prompt, truncate_at_stop
from peft_arena.evaluation.backends.transformers import TransformersBackend, kv_bytes_per_token, token_budget_batches
from peft_arena.evaluation.generation import make_backend

PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Name the largest planet of the solar system and say one thing about it."}],
    "The capital of France is",
    [{"role": "user", "content": "Write the word 'blue' in capital letters."}],
]


def test_token_budget_batches_fill_by_tokens_longest_first():
    lengths = [10, 50, 30, 20, 40]
    # rows × (longest + 10 new) ≤ 130: [50,40] costs 2×60=120, adding 30 would cost 180
    batches = token_budget_batches(lengths, n=1, max_new_tokens=10, max_batch_tokens=130, max_batch_size=8)
    assert batches == [[1, 4], [2, 3, 0]]  # 3 × (30 + 10) = 120
    # the sequence cap binds before the budget; n samples count as rows
    assert token_budget_batches(lengths, 2, 0, 10_000, 4) == [[1, 4], [2, 3], [0]]
    # a prompt alone over budget still gets its own batch
    assert token_budget_batches([500, 5], 1, 10, 100, 8) == [[0], [1]]
    assert sorted(i for b in token_budget_batches(lengths, 3, 7, 90, 5) for i in b) == list(range(5))


def test_kv_budget_counts_grouped_kv_heads():
    from peft_arena.models import base_config

    cfg = base_config("qwen2.5-7b")  # 28 layers, 4 KV heads of 128
    assert kv_bytes_per_token(cfg, 2) == 2 * 28 * 4 * 128 * 2


def test_one_bos_never_two():
    from peft_arena.models import ensure_smollm2, load_tokenizer

    tok = load_tokenizer(str(ensure_smollm2()))
    assert encode_prompt(tok, "hi") == tok("hi", add_special_tokens=False)["input_ids"]  # SmolLM2 adds no BOS
    tok.add_bos_token = True  # a Llama-like tokenizer that puts BOS in front of text
    bos = tok.bos_token_id
    plain = encode_prompt(tok, "hi")
    chat = encode_prompt(tok, PROMPTS[0])  # the chat template already starts with the BOS token
    assert plain[0] == bos and plain[1] != bos
    assert chat[0] == bos and chat[1] != bos and chat.count(bos) == tok.apply_chat_template(
        PROMPTS[0], tokenize=False, add_generation_prompt=True).count(tok.bos_token)


@pytest.mark.slow
def test_greedy_outputs_equal_plain_generate_on_smollm2():
    import torch

    from peft_arena.models import ensure_smollm2

    source = str(ensure_smollm2())
    # budget 2 × (longest + 12): forces several batches of different sizes and padding
    ours = TransformersBackend(source, max_batch_tokens=140, progress=False)
    assert ours.describe()["dtype"] == "float32" and ours.describe()["device"] == "cpu"
    got = ours.generate(PROMPTS, max_new_tokens=12)
    assert ours.last_stats["batches"] >= 2

    static = TransformersBackend(model=ours.model, tokenizer=ours.tokenizer, static_cache="true", progress=False)
    got_static = static.generate(PROMPTS, max_new_tokens=12)
    # the arena's decode loop (static cache, 4-D masks, its own token picking; compiled on a GPU)
    loop = TransformersBackend(model=ours.model, tokenizer=ours.tokenizer, decode_loop="arena", max_batch_tokens=140,
                               attn_implementation="arena_sdpa", progress=False)  # the GPU defaults
    got_loop = loop.generate(PROMPTS, max_new_tokens=12)
    assert loop.last_stats["decode_loop"] == "arena" and loop.last_stats["batches"] >= 2

    want = []
    for prompt in PROMPTS:  # plain generate, one prompt at a time: no padding, no batching
        ids = torch.tensor([ours.encode(prompt)])
        out = ours.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  pad_token_id=ours.tokenizer.pad_token_id)
        want.append([ours.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)])
    assert got == want
    assert got_static == want
    assert got_loop == want
    assert any(len(w[0]) > 10 for w in want)

    # mean NLL does not depend on the batch a text lands in (left padding keeps positions)
    texts = ["The capital of France is Paris.", "2 + 3 = 5", "Jupiter is the largest planet in the solar system."]
    batched = ours.mean_nll(texts)
    single = [ours.mean_nll([t])[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-4)
    ours.close()


def test_stop_strings_and_sampling_reproducible(tiny_source):
    ours = make_backend(tiny_source, backend="transformers", progress=False)
    a = ours.generate(PROMPTS[:2], n=3, temperature=1.0, max_new_tokens=6, seed=7)
    b = ours.generate(PROMPTS[:2], n=3, temperature=1.0, max_new_tokens=6, seed=7)
    assert a == b and [len(x) for x in a] == [3, 3]
    loop = TransformersBackend(model=ours.model, tokenizer=ours.tokenizer, decode_loop="arena", progress=False)
    c = loop.generate(PROMPTS[:2], n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    assert c == loop.generate(PROMPTS[:2], n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    assert [len(x) for x in c] == [3, 3] and len({x for row in c for x in row}) > 1
    assert truncate_at_stop("answer: 4\nQ: next", ["\nQ:", "zzz"]) == "answer: 4"
    with pytest.raises(ValueError, match="compile=true needs a CUDA device"):
        TransformersBackend(model=ours.model, tokenizer=ours.tokenizer, compile="true")
    with pytest.raises(ValueError, match="base_url is only used by backend=openai"):
        make_backend(tiny_source, backend="transformers", base_url="http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="cannot reach the OpenAI-compatible server"):
        make_backend(tiny_source, backend="openai", base_url="http://127.0.0.1:9")
