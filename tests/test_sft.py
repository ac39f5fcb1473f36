"""SFT as the paper builds it: chat-template prompt, answer + EOS target; KeepLoRA seeded by the trainer's first
shuffled micro-batch."""

from __future__ import annotations

import pytest

from peft_arena.config import SFTConfig
from peft_arena.data import load_records
from peft_arena.models import ensure_tiny, load_tokenizer
from peft_arena.tracking.tracker import MemoryTracker
from peft_arena.training import sft


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(ensure_tiny()))


def test_target_is_the_answer_and_eos_after_the_chat_prompt(tokenizer):
    records = load_records("math-sample", "math", limit=2)
    ds = sft.sft_token_dataset(records, tokenizer)
    row = ds[0]
    prompt_len = next(i for i, label in enumerate(row["labels"]) if label != -100)
    prompt = tokenizer.decode(row["input_ids"][:prompt_len])
    target = tokenizer.decode(row["input_ids"][prompt_len:])
    assert prompt.endswith("<|im_start|>assistant\n") and records[0]["question"] in prompt
    assert target == records[0]["answer"] + tokenizer.eos_token
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:] and set(row["labels"][:prompt_len]) == {-100}


def test_a_base_model_learns_to_stop_with_its_eos_not_the_chat_end_token(tokenizer):
    """A base tokenizer (EOS <|endoftext|>, as Qwen2.5-7B) with a ChatML template: the target ends with EOS and
    contains no <|im_end|> (TRL's conversational rendering would have ended it with the template's end token)."""
    base = load_tokenizer(str(ensure_tiny()))
    base.eos_token = "<|endoftext|>"
    record = load_records("math-sample", "math", limit=1)[0]
    prompt_ids, response_ids = sft.tokenize_example(base, record["question"], record["answer"])
    assert response_ids[-1] == base.convert_tokens_to_ids("<|endoftext|>")
    assert base.convert_tokens_to_ids("<|im_end|>") not in response_ids
    assert base.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    base.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        sft.tokenize_example(base, "q", "a")


def test_keeplora_calibrates_on_the_trainers_first_shuffled_micro_batch(tmp_path, monkeypatch):
    seen: dict[str, list] = {"calibration": [], "forwards": []}
    real_first = sft.first_micro_batch

    def recording_first(trainer):
        batch = real_first(trainer)
        seen["calibration"] = batch["input_ids"].tolist()
        trainer.model.register_forward_pre_hook(
            lambda module, args, kwargs: seen["forwards"].append(kwargs["input_ids"].tolist()), with_kwargs=True)
        return batch

    monkeypatch.setattr(sft, "first_micro_batch", recording_first)
    cfg = SFTConfig(base_model="tiny", adapter="keeplora", domain="math", limit=8, max_steps=1, batch_size=2,
                    max_length=512)
    tracker = MemoryTracker()
    sft.train_sft(cfg, tracker, tmp_path)
    # forward 1 is the calibration pass on the batch, forward 2 training's first micro-batch: the same sequences
    assert seen["forwards"][0] == seen["calibration"] and seen["forwards"][1] == seen["calibration"]
    # ... which the shuffled sampler drew, not the first records in file order
    tokenizer = load_tokenizer(str(ensure_tiny()))
    records = sft.drop_overlong(load_records("math-sample", "math", limit=8, seed=0), tokenizer, 512)
    file_order = [sum(sft.tokenize_example(tokenizer, r["question"], r["answer"]), []) for r in records[:2]]
    calibration = [[t for t in ids if t != tokenizer.pad_token_id] for ids in seen["calibration"]]
    assert sorted(calibration) != sorted([[t for t in ids if t != tokenizer.pad_token_id] for ids in file_order])
    assert tracker.params["calibration_examples"] == "2"
