"""Base model resolution, the tiny test model and the embedded SmolLM2 default."""

import pytest

from peft_arena.models import (KNOWN_BASES, ModelNotFoundError, base_config, load_model, load_tokenizer,
                               resolve_base, short_name)


def test_known_bases_resolve_to_short_names_and_sources():
    qwen = resolve_base("qwen2.5-7b")
    assert (qwen.short, qwen.source) == ("qwen2.5-7b", "Qwen/Qwen2.5-7B")
    assert resolve_base("meta-llama/Llama-3.2-3B-Instruct").short == "llama3.2-3b"
    assert resolve_base("org/Some_Model").short == "some-model"
    assert short_name("/models/My_Model/") == "my-model"


def test_unknown_names_and_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown base model 'gpt5'"):
        resolve_base("gpt5")
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_base(str(tmp_path))


def test_shipped_configs_match_the_paper_architectures():
    qwen, llama = base_config("qwen2.5-7b"), base_config("llama3.2-3b")
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_hidden_layers, qwen.num_key_value_heads) == (
        3584, 18944, 28, 4)
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers, llama.tie_word_embeddings) == (
        3072, 8192, 28, True)


def test_tiny_model_uses_the_real_tokenizer_and_chat_template(tiny_source):
    tok = load_tokenizer(tiny_source)
    model = load_model(tiny_source)
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok) == 49152
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n2+2?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_embedded_smollm2_is_a_real_pretrained_model():
    import torch

    spec = resolve_base("smollm2-135m")
    assert spec.display == KNOWN_BASES["smollm2-135m"].display
    tok, model = load_tokenizer(spec.source), load_model(spec.source)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
