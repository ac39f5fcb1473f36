"""Every method on the tiny model: build, train a step, save, reload on a fresh base, merge; plus the paper's
parameter counts on the 7B/3B configs (meta device) and the methods' own mechanics (KeepLoRA, AdaLoRA, LoRA+,
PiSSA/MiLoRA)."""

from __future__ import annotations

import json

import pytest
import torch

import peft_arena.methods as methods
from peft_arena.methods import BuildContext, MergeError, MethodError, get_method, ops
from peft_arena.models import ensure_tiny, load_model

PAPER_METHODS = {"full", "lora", "dora", "rslora", "loraplus", "adalora", "pissa", "milora", "keeplora", "miss",
                 "vera", "ia3", "oft"}


@pytest.fixture(scope="module")
def tiny_path():
    return str(ensure_tiny())


@pytest.fixture
def tiny(tiny_path):
    torch.manual_seed(0)
    return load_model(tiny_path)


def make_batch(vocab: int = 49152, batch: int = 2, length: int = 12, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # prompt tokens carry no loss, as in SFT
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train_steps(model, batch, steps: int = 2, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build(model, method, overrides=None, **ctx):
    ctx.setdefault("calibration_batch", make_batch(seed=1))
    ctx.setdefault("total_steps", 20)
    return ops.build(model, method, overrides, BuildContext(**ctx))


def test_registry_holds_every_paper_method():
    assert set(methods.METHODS) == PAPER_METHODS
    rows = methods.describe_methods()
    assert [r["name"] for r in rows] == sorted(PAPER_METHODS)
    for row in rows:
        assert set(row["option_help"]) == set(row["defaults"]), row["name"]  # every option documents itself
    assert get_method("loraplus").make_optimizer is not None
    assert get_method("keeplora").needs_calibration


def test_options_coerce_and_reject():
    spec = get_method("oft")
    assert spec.resolve({"block_size": "16", "coft": "true"})["block_size"] == 16
    assert spec.resolve({"coft": "true"})["coft"] is True
    assert spec.resolve({"target_modules": ["q_proj", "v_proj"]})["target_modules"] == "q_proj,v_proj"
    with pytest.raises(MethodError, match="takes no option 'rank'"):
        spec.resolve({"rank": 8})
    with pytest.raises(MethodError, match="not one of"):
        get_method("miss").resolve({"init": "random"})
    with pytest.raises(MethodError, match="unknown method 'qlora'"):
        get_method("qlora")


# The paper's trainable-parameter table (poster, §6.1 of the reference), millions, two decimals.
PAPER_COUNTS = [
    ("qwen2.5-7b", "lora", {}, 20.19), ("qwen2.5-7b", "lora", {"r": 32, "alpha": 64}, 80.74),
    ("qwen2.5-7b", "dora", {}, 21.58), ("qwen2.5-7b", "adalora", {}, 30.28),
    ("qwen2.5-7b", "pissa", {}, 20.19), ("qwen2.5-7b", "oft", {"block_size": 16}, 8.49),
    ("qwen2.5-7b", "oft", {}, 17.55), ("qwen2.5-7b", "oft", {"block_size": 128}, 71.92),
    ("qwen2.5-7b", "miss", {}, 11.12), ("qwen2.5-7b", "miss", {"r": 64}, 89.00),
    ("qwen2.5-7b", "vera", {}, 1.44), ("qwen2.5-7b", "ia3", {}, 1.82),
    ("llama3.2-3b", "lora", {}, 12.16), ("llama3.2-3b", "oft", {}, 11.55), ("llama3.2-3b", "vera", {}, 0.82),
]


@pytest.mark.parametrize("base,method,overrides,millions", PAPER_COUNTS)
def test_trainable_counts_match_the_paper(base, method, overrides, millions):
    count = ops.count_params(base, method, overrides)
    assert round(count["trainable"] / 1e6, 2) == millions
    json.dumps(count)  # the CLI prints it as JSON


def test_full_ft_count_without_embeddings_matches_the_paper():
    count = ops.count_params("qwen2.5-7b", "full")
    assert count["trainable"] == count["base_total"] == count["total"]
    assert round((count["trainable"] - count["embedding"]) / 1e9, 2) == 6.53  # the paper's 6.53B of 7.61B


@pytest.mark.parametrize("method", sorted(PAPER_METHODS))
def test_train_save_load_merge_roundtrip(method, tiny, tiny_path, tmp_path):
    batch = make_batch()
    before = logits(tiny, batch)
    model, options = build(tiny, method)
    trainable, total = ops.count_parameters(model)
    assert 0 < trainable <= total
    train_steps(model, batch)
    trained = logits(model, batch)
    assert (trained - before).abs().max() > 1e-4, "training changed nothing"

    out = ops.save_trained(model, method, options, tmp_path / "art", base_model="tiny", base_source=tiny_path)
    record = json.loads((out / ops.ARENA_FILE).read_text())
    assert record == {"method": method, "options": options, "base_model": "tiny", "base_source": tiny_path,
                      "label": get_method(method).label(options)}
    assert (out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).exists()

    reloaded = ops.load_trained(None, out)  # on a fresh copy of the original base
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=2e-5, rtol=1e-4)

    merged = ops.merge(reloaded)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged, batch), trained, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_svd_inits_start_at_the_base_and_save_as_a_plain_lora(method, tiny, tiny_path, tmp_path):
    batch = make_batch()
    before = logits(tiny, batch)
    original = tiny.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model, options = build(tiny, method)
    torch.testing.assert_close(logits(model, batch), before, atol=1e-4, rtol=1e-4)  # W_res + s·B·A = W

    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    s = torch.linalg.svdvals(original)
    kept = s[:8] if method == "pissa" else s[-8:]  # the triplets moved into the adapter
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:8], kept, atol=1e-4, rtol=1e-4)

    train_steps(model, batch)
    out = ops.save_trained(model, method, options, tmp_path / "art", base_model="tiny", base_source=tiny_path)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 * options["r"] and saved["init_lora_weights"] is True  # ΔW = B·A − B₀·A₀


def test_keeplora_update_avoids_the_principal_subspace(tiny):
    reference = load_model(str(ensure_tiny()))
    calib = make_batch(seed=1)
    reference.zero_grad()
    reference(**calib).loss.backward()
    weight = reference.model.layers[1].mlp.down_proj.weight.detach()
    grad = reference.model.layers[1].mlp.down_proj.weight.grad

    model, options = build(tiny, "keeplora", calibration_batch=calib)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert not lora_a.requires_grad and lora_b.requires_grad
    r, k = options["r"], 4 * options["r"]

    v_k = torch.linalg.svd(weight, full_matrices=False)[2][:k]
    assert (lora_a @ v_k.T).abs().max() < 1e-4  # A's rows are orthogonal to W's top-k input directions
    torch.testing.assert_close(lora_a @ lora_a.T, torch.eye(r), atol=1e-4, rtol=0)

    g_res = grad - grad @ v_k.T @ v_k
    u, s, vh = torch.linalg.svd(g_res, full_matrices=False)
    torch.testing.assert_close(lora_b @ lora_a, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5, rtol=1e-3)

    train_steps(model, make_batch())
    assert torch.equal(layer.lora_A["default"].weight, lora_a)  # frozen through training


def test_keeplora_zero_b_starts_at_the_base_and_needs_a_batch(tiny):
    batch = make_batch()
    before = logits(tiny, batch)
    model, _ = build(tiny, "keeplora", {"b_init": "zero"})
    torch.testing.assert_close(logits(model, batch), before, atol=0, rtol=0)
    with pytest.raises(MethodError, match="calibration_batch"):
        build(load_model(str(ensure_tiny())), "keeplora", calibration_batch=None)


def active_ranks(model) -> int:
    return sum(int((m.lora_E["default"] != 0).sum()) for m in model.modules() if hasattr(m, "lora_E"))


def adalora_layers(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "lora_E"))


def test_adalora_callback_regularises_and_prunes_ranks(tiny):
    model, options = build(tiny, "adalora", {"delta_t": 1}, total_steps=10)
    assert model.peft_config["default"].orth_reg_weight == 0.0  # the callback owns the regulariser
    (callback,) = get_method("adalora").callbacks(model, options, BuildContext(total_steps=10))
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()

    class State:
        global_step = 0

    # on_step_begin adds the gradient of w·mean(‖A·Aᵀ − I‖_F, ‖Bᵀ·B − I‖_F) over all adapted layers
    a_b = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    leaves = [p.detach().clone().requires_grad_(True) for _, p in a_b]
    penalty = torch.stack([torch.linalg.matrix_norm((p @ p.T if ".lora_A." in n else p.T @ p) - torch.eye(
        p.shape[0] if ".lora_A." in n else p.shape[1])) for (n, _), p in zip(a_b, leaves)]).mean()
    (options["orth_reg_weight"] * penalty).backward()
    callback.on_step_begin(None, State, None)
    for (_, param), leaf in zip(a_b, leaves):
        torch.testing.assert_close(param.grad, leaf.grad)
    opt.zero_grad()

    for step in range(10):
        State.global_step = step
        callback.on_step_begin(None, State, None)
        model(**batch).loss.backward()
        opt.step()
        callback.on_optimizer_step(None, State, None)
        opt.zero_grad()
    assert active_ranks(model) == options["r"] * adalora_layers(model)  # pruned from init_r=12 to r=8 on average

    fixed, fixed_options = build(load_model(str(ensure_tiny())), "adalora", {"reallocate": False}, total_steps=10)
    (callback,) = get_method("adalora").callbacks(fixed, fixed_options, BuildContext(total_steps=10))
    train_steps(fixed, batch, steps=3)
    for step in range(10):
        State.global_step = step
        callback.on_optimizer_step(None, State, None)
    assert active_ranks(fixed) == fixed_options["init_r"] * adalora_layers(fixed)  # the paper's code: no pruning

    with pytest.raises(MethodError, match="no budget steps"):
        build(load_model(str(ensure_tiny())), "adalora", {"tinit_ratio": 0.5, "tfinal_ratio": 0.5}, total_steps=10)


def test_loraplus_gives_b_a_larger_learning_rate(tiny):
    spec = get_method("loraplus")
    model, options = build(tiny, "loraplus")
    opt = spec.make_optimizer(model, options, 1e-4, 0.01, (0.9, 0.95))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if "lora_A" in name:
            assert lrs[id(param)] == pytest.approx(1e-4)
        elif "lora_B" in name:
            assert lrs[id(param)] == pytest.approx(1.6e-3)


def test_oft_refuses_a_block_size_that_does_not_divide(tiny):
    with pytest.raises(MethodError, match="block_size 48 does not divide"):
        build(tiny, "oft", {"block_size": 48})


def test_merge_refuses_what_cannot_merge(tiny):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    prefix = get_peft_model(tiny, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2))
    with pytest.raises(MergeError, match="PREFIX_TUNING"):
        ops.merge(prefix)


def test_load_trained_needs_an_arena_artifact(tmp_path):
    with pytest.raises(MethodError, match="arena_method.json"):
        ops.load_trained(None, tmp_path)


def test_target_modules_list_restricts_the_adapter(tiny):
    model, _ = build(tiny, "lora", {"target_modules": "q_proj,v_proj"})
    # per layer: q 8·(64+64) + v 8·(64+32) (2 KV heads of 16), two layers
    assert ops.count_parameters(model)[0] == 2 * (8 * 128 + 8 * 96)
