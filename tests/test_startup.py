"""Startup of a training run: the phase clock and its metrics, tokenising once, the base loaded in the background
while the data is tokenised (same training as a base loaded up front), the garbage collector's frozen block."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from peft_arena.config import SFTConfig
from peft_arena.data import load_records
from peft_arena.models import ensure_tiny, load_tokenizer
from peft_arena.tracking.tracker import MemoryTracker
from peft_arena.training import precision, sft, startup


def test_process_start_is_this_process_start():
    started = startup.process_start()
    assert started <= startup._IMPORTED <= time.time()  # the interpreter started before this module was imported
    clock = startup.StartupClock(t0=100.0)
    clock.mark("a")
    assert clock.phases()["a"] == pytest.approx(time.time() - 100.0, abs=1.0)
    later = startup.StartupClock()  # not the process's first clock: from its own creation
    assert later.t0 >= started and time.time() - later.t0 < 1.0


def test_background_returns_the_value_or_raises_the_error_and_records_its_time():
    clock = startup.StartupClock()
    assert startup.Background("work", lambda: (time.sleep(0.05), 7)[1], clock).result() == 7
    assert clock.background["work"] >= 0.05

    def fail():
        raise ValueError("no such folder")

    with pytest.raises(ValueError, match="no such folder"):
        startup.Background("broken", fail, clock).result()

    dropped = startup.Background("dropped", lambda: (time.sleep(0.05), object())[1])
    dropped.discard()  # the caller failed first: what the thread makes is not kept
    dropped._thread.join()
    assert dropped._value is None


def test_frozen_gc_is_undone_at_the_end_and_nests():
    assert gc.get_freeze_count() == 0
    with startup.frozen_gc():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with startup.frozen_gc():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0


def test_records_are_tokenised_once_with_the_same_ids():
    tokenizer = load_tokenizer(str(ensure_tiny()))
    records = load_records("math-sample", "math", limit=6, seed=0)
    one_by_one = [sft.tokenize_example(tokenizer, r["question"], r["answer"]) for r in records]
    assert sft.tokenize_examples(tokenizer, [(r["question"], r["answer"]) for r in records], chunk=4) == one_by_one

    lengths = sorted(len(p) + len(r) for p, r in one_by_one)
    tokens: dict = {}
    kept = sft.drop_overlong(records, tokenizer, lengths[3], tokens)
    assert len(kept) == 4 and set(tokens) == {id(r) for r in kept}  # over-long records dropped, not truncated
    calls = []
    original = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda *a, **k: calls.append(1) or original(*a, **k)
    dataset = sft.sft_token_dataset(kept, tokenizer, tokens)
    assert not calls  # the dataset reuses drop_overlong's ids
    fresh = sft.sft_token_dataset(kept, tokenizer)
    assert len(calls) == len(kept)
    assert dataset["input_ids"] == fresh["input_ids"] and dataset["labels"] == fresh["labels"]


def test_train_sft_times_its_startup_and_loads_the_base_in_the_background_to_the_same_result(tmp_path):
    cfg = SFTConfig(base_model="tiny", adapter="lora", domain="math", limit=4, max_steps=2, batch_size=2,
                    max_length=512)
    tracker = MemoryTracker()
    clock = startup.StartupClock(t0=time.time())
    clock.mark("caller")
    result = sft.train_sft(cfg, tracker, tmp_path / "bg", startup=clock)
    phases = clock.phases()
    assert list(phases) == ["caller", "before_call", "imports", "config", "tokenizer", "data", "weights", "kernels",
                            "adapter", "trainer", "train_begin", "first_step"]
    assert all(s >= 0 for s in phases.values()) and clock.background["weights"] > 0
    startup_metrics = result["startup"]
    assert startup_metrics["startup/to_first_step_s"] == pytest.approx(sum(phases.values()), abs=0.01)
    for key, value in startup_metrics.items():  # logged to the run under the same names
        assert tracker.last(key) == pytest.approx(value)

    # the same run on a base loaded up front (no background load): the same losses and adapter
    base = precision.load_base_for_training(str(ensure_tiny()), torch.float32)
    again = sft.train_sft(cfg, MemoryTracker(), tmp_path / "fg", base_model=base)
    assert again["losses"] == result["losses"]
    from safetensors.torch import load_file

    a = load_file(f"{result['adapter_dir']}/adapter_model.safetensors")
    b = load_file(f"{again['adapter_dir']}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "startup/weights_bg_s" not in again["startup"]  # nothing was loaded by that call


def test_bad_data_fails_with_its_own_error_while_the_base_loads(tmp_path):
    cfg = SFTConfig(base_model="tiny", adapter="lora", domain="math", limit=4, max_steps=1, max_length=8)
    with pytest.raises(ValueError, match="no training example fits max_length=8"):
        sft.train_sft(cfg, MemoryTracker(), tmp_path)
    assert gc.get_freeze_count() == 0


def test_prefetch_reads_a_cold_local_folder_into_the_page_cache(tmp_path):
    import os

    folder = tmp_path / "model"
    folder.mkdir()
    shard = folder / "model.safetensors"
    shard.write_bytes(os.urandom(4 << 20))
    with open(shard, "rb+") as fh:
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert startup.resident_fraction(shard) < 0.5
    thread = startup.prefetch_weights(str(folder), chunk=1 << 20)
    thread.join(10)
    assert startup.resident_fraction(shard) > 0.9
    stats = startup.PREFETCH_STATS[str(folder)]
    assert stats["done"] and stats["read_gib"] == pytest.approx(4 / 1024)
    assert startup.prefetch_weights(str(folder)) is None  # once per source and process
    assert startup.prefetch_base("Qwen/Qwen2.5-7B") is None and startup.prefetch_base("no such base") is None
    clock = startup.StartupClock()
    clock.prefetch(str(folder))  # already prefetched in this process: nothing started, nothing reported
    assert clock.prefetched == [] and "startup/prefetch_read_gib" not in clock.metrics()
