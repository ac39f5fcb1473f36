"""GRPO: recipe and backend logic, every registry method on the tiny model, MLflow artifacts, and learning."""

import json
import re
from pathlib import Path

import pytest
import torch

import peft_arena.methods  # noqa: F401  (fills the registry)
from peft_arena.data import grpo_dataset, load_records
from peft_arena.methods import METHODS, MethodError, get_method
from peft_arena.methods import ops
from peft_arena.models import ensure_tiny, load_model, load_tokenizer
from peft_arena.tracking.tracker import MemoryTracker
from peft_arena.training.grpo import (
    COMPLETIONS_TABLE,
    GRPORecipe,
    _plain_init_for_reference_copy,
    generation_backend,
    keeplora_calibration_batch,
    train_grpo,
    vllm_settings,
)
from peft_arena.training.rewards import completion_text


@pytest.fixture(scope="module")
def tiny():
    return str(ensure_tiny())


@pytest.fixture(scope="module")
def math_records():
    return load_records("math-sample", limit=4)


def char_length_reward(completions, **kwargs):
    """A reward that differs between random completions, so every group has a non-zero advantage."""
    return [min(len(completion_text(c)), 60) / 60 for c in completions]


# ------------------------------------------------------------------------------------------- recipe, backend


def test_recipe_defaults_are_the_papers():
    recipe = GRPORecipe()
    assert recipe.num_generations == 8 and recipe.epsilon == 0.2 and recipe.epsilon_high is None
    assert recipe.delta == 3.0 and recipe.beta == 0.0 and recipe.temperature == 1.0 and recipe.top_p == 1.0
    assert recipe.loss_type == "dapo" and recipe.scale_rewards == "group"
    assert recipe.learning_rate is None and recipe.lr_scheduler_type == "constant"
    assert get_method("lora").grpo_lr == 1e-5 and get_method("full").grpo_lr == 1e-6


def test_recipe_coerces_override_strings_and_validates():
    recipe = GRPORecipe(beta="0.04", num_generations="4", delta="none", learning_rate="1e-5", use_vllm="FALSE",
                        disable_dropout="false")
    assert recipe.beta == 0.04 and recipe.num_generations == 4 and recipe.delta is None
    assert recipe.learning_rate == 1e-5 and recipe.use_vllm == "false" and recipe.disable_dropout is False
    assert GRPORecipe(prompts_per_generation=4, num_generations=8, updates_per_generation=4).micro_batch_size == 8
    with pytest.raises(ValueError, match="split evenly"):
        GRPORecipe(prompts_per_generation=1, num_generations=3, updates_per_generation=2)
    with pytest.raises(ValueError, match="use_vllm"):
        GRPORecipe(use_vllm="maybe")
    with pytest.raises(ValueError, match="grpo.beta must be float"):
        GRPORecipe(beta="lots")
    with pytest.raises(ValueError, match="at least 2"):
        GRPORecipe(num_generations=1)


def test_generation_backend_selection():
    assert generation_backend("auto", vllm_installed=False) == "transformers"
    assert generation_backend("auto", vllm_installed=True) == "vllm"
    assert generation_backend("false", vllm_installed=True) == "transformers"
    assert generation_backend("true", vllm_installed=True) == "vllm"
    with pytest.raises(RuntimeError, match="not installed"):
        generation_backend("true", vllm_installed=False)
    # on this machine (no vLLM) auto means transformers
    assert generation_backend("auto") == "transformers"


def test_vllm_settings_colocate_or_server():
    assert vllm_settings(GRPORecipe(vllm_max_model_length="9216")) == {
        "use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
        "vllm_max_model_length": 9216, "vllm_tensor_parallel_size": 1}
    server = vllm_settings(GRPORecipe(vllm_server_base_url="http://gpu1:8000"), cuda=True)
    assert server == {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://gpu1:8000"}
    with pytest.raises(RuntimeError, match="needs the trainer on a CUDA GPU"):
        vllm_settings(GRPORecipe(vllm_server_base_url="http://gpu1:8000"), cuda=False)
    with pytest.raises(ValueError, match="vllm_server_base_url"):
        vllm_settings(GRPORecipe(vllm_mode="server"))


def test_keeplora_calibration_batch_labels_only_the_reference_answer(tiny, math_records):
    tokenizer = load_tokenizer(tiny)
    rows = list(grpo_dataset(math_records[:2], "math"))
    batch = keeplora_calibration_batch(rows, tokenizer)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 2
    for i, record in enumerate(math_records[:2]):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tokenizer.decode(labelled).startswith(record["answer"][:20])
    with pytest.raises(MethodError, match="reference answers"):
        keeplora_calibration_batch([{**rows[0], "answer": ""}], tokenizer)


def test_keeplora_calibrates_on_the_prompts_of_the_first_generation_round(tiny, math_records, tmp_path, monkeypatch):
    import peft_arena.training.grpo as grpo

    seen = {}
    real = grpo.first_generation_rows
    monkeypatch.setattr(grpo, "first_generation_rows",
                        lambda trainer: seen.setdefault("calibration", real(trainer)))

    def recording_reward(completions, prompts, **kwargs):
        seen.setdefault("rewarded", prompts)
        return char_length_reward(completions)

    recipe = GRPORecipe(num_generations=2, prompts_per_generation=2, max_steps=1, max_completion_length=4,
                        learning_rate=1e-2, seed=3)
    train_grpo(tiny, tiny, "keeplora", {}, math_records, "math", recipe, str(tmp_path), MemoryTracker(),
               reward_funcs=[recording_reward])
    calibrated = [row["prompt"] for row in seen["calibration"]]
    assert len(calibrated) == 2
    assert [p for i, p in enumerate(seen["rewarded"]) if i % 2 == 0] == calibrated  # the same prompts, same order


# ------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_under_grpo(method, tiny, math_records, tmp_path):
    tracker = MemoryTracker()
    recipe = GRPORecipe(num_generations=4, prompts_per_generation=1, max_steps=1, max_completion_length=6,
                        learning_rate=1e-2)
    result = train_grpo(tiny, tiny, method, {}, math_records, "math", recipe, str(tmp_path), tracker,
                        reward_funcs=[char_length_reward])

    # the update really happened: a gradient flowed and the saved artifact differs from the base
    assert result["history"][0]["train/grad_norm"] > 0
    adapter_dir = Path(result["adapter_dir"])
    assert json.loads((adapter_dir / "arena_method.json").read_text())["method"] == method
    assert 0 < result["trainable_params"] <= result["total_params"]
    ids = torch.tensor([[1, 400, 2000, 35, 90, 7]])
    base_logits = load_model(tiny)(ids).logits
    trained_logits = ops.load_trained(tiny, adapter_dir)(ids).logits
    assert (trained_logits - base_logits).abs().max() > 1e-6

    assert tracker.tags["arena.generation_backend"] == "transformers"
    assert tracker.params["grpo.num_generations"] == "4" and tracker.params["grpo.loss_aggregation"] == "token-mean"
    assert tracker.params["grpo.learning_rate"] == "0.01" and tracker.params["grpo.kl"] == "off"
    assert "train/reward" in tracker.metrics and "train/entropy" in tracker.metrics
    assert "adapter" in tracker.artifacts
    table = tracker.artifacts[COMPLETIONS_TABLE]
    assert set(table) == {"step", "prompt", "completion", "ground_truth", "reward_char_length_reward"}
    assert len(table["completion"]) == 4 and table["step"] == [1] * 4
    assert table["reward_char_length_reward"] == [char_length_reward([c])[0] for c in table["completion"]]


def test_default_rewards_and_lr_come_from_domain_and_method(tiny, tmp_path):
    tracker = MemoryTracker()
    records = load_records("med-sample", limit=2)
    recipe = GRPORecipe(num_generations=2, prompts_per_generation=1, max_steps=1, max_completion_length=4,
                        format_reward_weight=0.5)
    result = train_grpo(tiny, tiny, "lora", {}, records, "med", recipe, str(tmp_path), tracker)
    assert result["learning_rate"] == 1e-5 and tracker.params["grpo.learning_rate"] == "1e-05"
    table = tracker.artifacts[COMPLETIONS_TABLE]
    assert {"reward_med_mc_reward", "reward_format_reward"} <= set(table)
    assert table["ground_truth"][0] in "ABCD"
    assert "train/accuracy" in tracker.metrics  # the mean of med_mc_reward


def test_kl_term_with_a_base_rewriting_method_keeps_the_saved_adapter_exact(tiny):
    """PiSSA + KL: TRL copies the adapter through peft's add_adapter; that must not run the SVD init again,
    and the saved adapter (after dropping the reference copy) must still reproduce the model on the original base."""
    model = ops.build(load_model(tiny), "pissa")[0]
    _plain_init_for_reference_copy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.add_adapter("ref", model.peft_config["default"])  # what GRPOTrainer does when beta > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.add_(0.01 * torch.randn_like(param))
    model.delete_adapter("ref")
    model.eval()  # no dropout
    ids = torch.tensor([[1, 400, 2000, 35, 90, 7]])
    expected = model(ids).logits
    import tempfile
    out = ops.save_trained(model, "pissa", get_method("pissa").resolve({}), tempfile.mkdtemp() + "/a",
                           base_model="tiny", base_source=tiny)
    assert torch.allclose(ops.load_trained(tiny, out)(ids).logits, expected, atol=1e-4)


def test_kl_term_runs_and_is_logged(tiny, math_records, tmp_path):
    tracker = MemoryTracker()
    recipe = GRPORecipe(num_generations=2, prompts_per_generation=1, max_steps=2, max_completion_length=4,
                        beta=0.04, learning_rate=1e-2)
    train_grpo(tiny, tiny, "keeplora", {}, math_records, "math", recipe, str(tmp_path), tracker,
               reward_funcs=[char_length_reward])
    kl = [v for _, v in tracker.metrics["train/kl"]]
    assert kl[0] == pytest.approx(0.0, abs=1e-7)  # the reference is the initial policy
    assert tracker.params["grpo.kl"] == "on" and tracker.params["grpo.beta"] == "0.04"


def test_adalora_refuses_a_kl_term(tiny, math_records, tmp_path):
    with pytest.raises(MethodError, match="adalora cannot run GRPO with a KL term"):
        train_grpo(tiny, tiny, "adalora", {}, math_records, "math", GRPORecipe(beta=0.04), str(tmp_path),
                   MemoryTracker())


# ------------------------------------------------------------------------------------------- MLflow


def test_mlflow_run_gets_curves_table_and_adapter(tiny, math_records, tmp_path, monkeypatch):
    import mlflow

    from peft_arena.tracking.tracker import MlflowTracker

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("grpo-test", artifact_location=str(tmp_path / "artifacts"))
    recipe = GRPORecipe(num_generations=2, prompts_per_generation=1, max_steps=2, max_completion_length=4)
    with mlflow.start_run(experiment_id=experiment) as run:
        train_grpo(tiny, tiny, "lora", {}, math_records, "math", recipe, str(tmp_path / "out"),
                   MlflowTracker(run.info.run_id))
    client = mlflow.MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert data.tags["arena.generation_backend"] == "transformers"
    assert data.params["grpo.loss_type"] == "dapo"
    assert {"train/reward", "train/accuracy", "train/entropy", "train/completion_length", "train/loss"} <= set(data.metrics)
    # the arena's curve names only: no TRL duplicates, no TrainingArguments param dump, within the metrics budget
    assert not {"reward", "loss", "train_loss"} & set(data.metrics) and len(data.metrics) <= 100
    assert "per_device_train_batch_size" not in data.params and "hub_token" not in data.params
    assert len(client.get_metric_history(run.info.run_id, "train/reward")) == 2
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "grpo")}
    assert COMPLETIONS_TABLE in paths
    table = json.loads(Path(client.download_artifacts(run.info.run_id, COMPLETIONS_TABLE, str(tmp_path))).read_text())
    assert {"step", "prompt", "completion", "ground_truth", "reward_math_reward"} <= set(table["columns"])
    assert len(table["data"]) == 4  # two steps × two completions, appended
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/arena_method.json" in adapter and "adapter/adapter_model.safetensors" in adapter
    mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------------------- learning


def says_yes(completions, **kwargs):
    return [1.0 if re.match(r"\W*yes\b", completion_text(c), re.IGNORECASE) else 0.0 for c in completions]


def test_grpo_raises_the_reward_on_a_toy_verifiable_task(tmp_path):
    """SmolLM2-135M-Instruct, LoRA, 6 GRPO steps: answering "yes" is rewarded, and the policy learns it.

    (The tiny random model cannot show learning: its logits are too flat for any token to become likely.)
    """
    from peft_arena.models import ensure_smollm2

    source = str(ensure_smollm2())
    questions = ["Is the sky blue?", "Is water wet?", "Is fire cold?", "Is two larger than three?",
                 "Can fish fly?", "Is the earth flat?", "Do cats bark?", "Is ice hot?"]
    records = [{"question": f"{q} Answer yes or no.", "answer": "", "ground_truth": "yes", "domain": "math",
                "data_source": "toy"} for q in questions]
    recipe = GRPORecipe(num_generations=4, prompts_per_generation=2, max_steps=6, max_completion_length=3,
                        learning_rate=1e-3, max_prompt_length=256)
    result = train_grpo(source, source, "lora", {}, records, "math", recipe, str(tmp_path), MemoryTracker(),
                        reward_funcs=[says_yes])
    rewards = [h["train/reward"] for h in result["history"]]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last >= first + 0.3, f"mean reward did not rise: {rewards}"
    assert last >= 0.75, rewards


def test_completions_table_is_logged_once_per_generation_round(tiny, math_records, tmp_path):
    """Two optimizer steps share one generation round: the table is logged once, with the round's rows."""
    logged = []

    class CountingTracker(MemoryTracker):
        def log_table(self, data, name):
            logged.append((name, dict(data)))
            super().log_table(data, name)

    recipe = GRPORecipe(num_generations=2, prompts_per_generation=2, updates_per_generation=2, max_steps=2,
                        max_completion_length=4, learning_rate=1e-2)
    train_grpo(tiny, tiny, "lora", {}, math_records, "math", recipe, str(tmp_path), CountingTracker(),
               reward_funcs=[char_length_reward])
    assert len(logged) == 1 and logged[0][0] == COMPLETIONS_TABLE
    assert len(logged[0][1]["completion"]) == 4 and len(set(logged[0][1]["prompt"])) == 2
