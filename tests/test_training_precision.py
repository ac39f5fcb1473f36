"""Training options on the tiny model: padding-free packing, bf16 base with fp32 adapters, checkpointing, auto rules."""

import pytest
from unittest import mock
import torch
from adapter_checks import perturb_trainable, sharp_model

from peft_arena.training import precision


def _examples(n=3):
    g = torch.Generator().manual_seed(1)
    out = []
    for length in (7, 12, 5)[:n]:
        ids = torch.randint(5, 400, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})  # prompt of 2 tokens, then the completion
    return out


def test_padding_free_loss_equals_padded_loss_and_needs_position_resets(tiny_source):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = sharp_model(tiny_source)
    examples = _examples()
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))  # no pad token computed
    assert packed["position_ids"][0].tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]  # positions restart per example
    # use_cache=False as TRL's SFTTrainer passes it: with a cache, transformers does not detect packed sequences
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**{k: v for k, v in packed.items() if k in ("input_ids", "labels", "position_ids")},
                            use_cache=False).loss
        leaked = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss  # cross-talk
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5, abs=1e-5)
    assert abs(leaked.item() - loss_padded.item()) > 1e-3  # the check above can fail: attention matters here


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_source):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from peft_arena.methods import ops

    losses, grads = [], []
    for checkpointing in (False, True):
        model, _ = ops.build(sharp_model(tiny_source), "lora", {"dropout": 0.0, "r": 4})
        with torch.no_grad():  # a non-zero B so that A's gradient is not zero either
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = DataCollatorForLanguageModeling(pad_token_id=0)(_examples())
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7) and grads[0].abs().sum() > 0


def test_bf16_base_trains_fp32_adapters(tiny_source, tmp_path):
    from peft_arena.config import build_config
    from peft_arena.tracking.tracker import MemoryTracker
    from peft_arena.training import sft

    seen = {}

    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
            seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["b0"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["b1"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    cfg = build_config("train_sft", None, {"base_model": "tiny", "limit": "2", "max_steps": "1", "batch_size": "2", "warmup_ratio": "0",
                                           "precision": "bf16", "padding_free": "on"})
    result = sft.train_sft(cfg, MemoryTracker(), tmp_path, extra_callbacks=[Probe()])
    assert seen["frozen"] == {torch.bfloat16} and seen["trainable"] == {torch.float32}
    assert any((seen["b1"][n] != seen["b0"][n]).any() for n in seen["b0"])  # the adapter moved
    assert result["settings"]["train.dtype"] == "bfloat16" and result["settings"]["train.padding_free"] is True
    assert all(l == l for l in result["losses"])  # finite


def test_option_rules_and_memory_estimate():
    from peft_arena.models import base_config

    assert precision.resolve_dtype("auto", cuda=False) is torch.float32
    assert precision.resolve_dtype("bf16", cuda=False) is torch.bfloat16
    assert precision.resolve_padding_free("auto", cuda=False) is False
    assert precision.resolve_padding_free("on", cuda=False) is True
    assert precision.resolve_liger("auto", cuda=False) is False
    assert precision.resolve_checkpointing("auto", None, 1, "lora", torch.bfloat16, 0.0, cuda=False) == (False, None)
    with pytest.raises(precision.PrecisionError, match="liger=on needs a CUDA GPU"):
        precision.resolve_liger("on", cuda=False)
    with pytest.raises(precision.PrecisionError, match="gradient_checkpointing must be one of"):
        precision.resolve_checkpointing("sometimes", None, 1, "lora", torch.bfloat16, 0.0, cuda=False)
    with pytest.raises(precision.PrecisionError, match="precision must be one of"):
        precision.resolve_dtype("fp8", cuda=False)
    # Qwen2.5-7B in bf16 on a 139.8 GiB H200: 4 x 2048 tokens fit without checkpointing, 2 x 8192 do not,
    # and DoRA's fp32 intermediates need more than LoRA's
    qwen = base_config("qwen2.5-7b")
    short = precision.activation_estimate(qwen, 4 * 2048, "lora", torch.bfloat16, 0.0, 139.8)
    long = precision.activation_estimate(qwen, 2 * 8192, "lora", torch.bfloat16, 0.0, 139.8)
    dora = precision.activation_estimate(qwen, 4 * 2048, "dora", torch.bfloat16, 0.0, 139.8)
    assert 14 < short.weights_gib < 15.5
    assert short.fits_without_checkpointing and not long.fits_without_checkpointing
    assert dora.activations_gib > short.activations_gib
    assert long.weights_gib + long.checkpointed_gib < 0.85 * 139.8


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_dora_matches_peft(tiny_source, dropout):
    from peft_arena.methods import ops
    from peft_arena.training import lean
    from peft_arena.training.lean import dora

    model, _ = ops.build(sharp_model(tiny_source), "dora", {"dropout": dropout})
    perturb_trainable(model, 0.05)
    model.train()
    batch = {"input_ids": torch.tensor([[5, 17, 99, 240, 7, 31]]), "labels": torch.tensor([[5, 17, 99, 240, 7, 31]])}
    results = []
    for patched in (False, True):
        dora.uninstall()
        if patched:
            lean.install()
        torch.manual_seed(0)  # the same dropout masks
        with mock.patch.object(dora, "weight_row_norm", wraps=dora.weight_row_norm) as norm, \
                mock.patch.object(dora._DoraCombine, "apply", wraps=dora._DoraCombine.apply) as combine:
            results.append(_loss_and_grads(model, batch))
        # the lean path really ran: the Gram norm on every layer, the fused combination only without dropout
        assert norm.call_count == (14 if patched else 0)
        assert combine.call_count == (14 if patched and dropout == 0 else 0)
    (loss_peft, grad_peft), (loss_lean, grad_lean) = results
    assert loss_lean == pytest.approx(loss_peft, rel=1e-5)
    # fp32 rounding differs (the Gram norm sums in another order): compare at 1e-4 of the largest gradient
    assert torch.allclose(grad_lean, grad_peft, rtol=1e-4, atol=1e-4 * grad_peft.abs().max().item())
    assert grad_lean.abs().sum() > 0
    # with input casting off (as on a bf16 base under autocast) the layers see the activation dtype
    assert lean.disable_input_casting(model) == 2 * 7


def test_lean_dora_bias_and_row_norm():
    """A biased linear (Qwen's q/k/v): output and gradients equal peft's; the Gram row norm equals the direct one."""
    from peft import LoraConfig, get_peft_model

    from peft_arena.training.lean import dora

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=True))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0"]))
    perturb_trainable(model, 0.2)
    x = torch.randn(3, 5, 24)
    outs = []
    for patched in (False, True):
        dora.uninstall()
        if patched:
            dora.install()
        model.zero_grad()
        y = model(x)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        outs.append((y.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4 * outs[0][1].abs().max().item())
    layer = model.base_model.model[0]
    A, B, W = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight
    direct = torch.linalg.norm(W + 2.0 * (B @ A), dim=1)
    assert torch.allclose(dora.weight_row_norm(torch.nn.Module(), W, A, B, 2.0), direct, rtol=1e-5)
    dora.uninstall()


RECIPES = sorted((__import__("pathlib").Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_the_papers_and_name_their_runs(tmp_path):
    from peft_arena.config import build_config
    from peft_arena.stages.train import _prepare
    from peft_arena.tracking.tracker import MemoryTracker
    from peft_arena.training.grpo import GRPORecipe

    names = {p.stem for p in RECIPES}
    assert names == {f"{t}-{d}-{b}" for t in ("sft", "grpo") for d in ("math", "med")
                     for b in ("qwen2.5-7b", "llama3.2-3b")}
    for path in RECIPES:
        stage = "train_sft" if path.stem.startswith("sft") else "train_grpo"
        cfg = build_config(stage, str(path), {"output_dir": str(tmp_path)})
        assert cfg.recipe == path.stem and cfg.base_model in path.stem and cfg.domain in path.stem
        if stage == "train_sft":
            assert (cfg.max_length, cfg.batch_size * cfg.grad_accum, cfg.epochs, cfg.warmup_ratio) == (8192, 256, 4, 0.1)
            assert (cfg.adam_beta2, cfg.weight_decay, cfg.lr) == (0.95, 0.01, 0.0)  # lr 0: the method's 2e-4
        else:
            recipe = GRPORecipe(**cfg.grpo_options, max_steps=cfg.max_steps)  # splits evenly into micro-batches
            assert (recipe.num_generations, recipe.prompts_per_generation, recipe.updates_per_generation) == (8, 256, 4)
            assert (recipe.max_completion_length, recipe.beta, recipe.epsilon, recipe.lr_scheduler_type) == (
                8192, 0.0, 0.2, "constant")
    cfg = build_config("train_sft", str(RECIPES[-1]), {"data": "/data/math_sft.parquet", "adapter": "dora"})
    tracker = MemoryTracker()
    _prepare(cfg, "train_sft", "sft", tracker)
    assert tracker.tags["arena.recipe"] == cfg.recipe and tracker.tags["arena.data"] == "/data/math_sft.parquet"
    assert tracker.tags["mlflow.runName"] == f"sft-dora-r8a16-{cfg.domain}-{cfg.base_model}-math_sft-{cfg.recipe}"


def test_merge_placement_rules():
    from peft_arena.config import PromoteConfig
    from peft_arena.stages.promote import _merge_placement

    assert _merge_placement(PromoteConfig()) == ("float32", "cpu")  # no GPU here: fp32 on the CPU
    assert _merge_placement(PromoteConfig(merge_dtype="bfloat16")) == ("bfloat16", "cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        _merge_placement(PromoteConfig(device="cuda"))
    with pytest.raises(ValueError, match="merge_dtype must be"):
        _merge_placement(PromoteConfig(merge_dtype="int8"))


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_gram_svd_matches_lapack(shape):
    from peft_arena.methods.gram_svd import truncated_svd

    torch.manual_seed(0)
    w = torch.randn(*shape) @ torch.diag(torch.logspace(0, -3, shape[1])) if shape[0] >= shape[1] else \
        torch.diag(torch.logspace(0, -3, shape[0])) @ torch.randn(*shape)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for largest, sl in ((True, slice(0, 4)), (False, slice(-4, None))):
        gu, gs, gvh = truncated_svd(w, 4, largest=largest)
        assert torch.allclose(gs, s[sl], rtol=1e-4)
        assert torch.allclose(gu @ torch.diag(gs) @ gvh, u[:, sl] @ torch.diag(s[sl]) @ vh[sl], atol=1e-5)


@pytest.mark.parametrize("method", ["pissa", "milora", "keeplora"])
def test_gpu_svd_path_builds_the_same_adapter(tiny_source, method, monkeypatch):
    """The Gram-matrix path the GPU takes (forced here on the CPU) gives the CPU path's adapter and residual base."""
    from peft_arena.methods import gram_svd, keeplora, ops, svd_init
    from peft_arena.methods.registry import BuildContext

    batch = {"input_ids": torch.tensor([[5, 17, 99, 240, 7, 31]]), "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 99, 240, 7, 31]])}
    states = []
    for gram in (False, True):
        for module in (svd_init, keeplora):
            monkeypatch.setattr(module, "use_gram_svd", (lambda t: True) if gram else gram_svd.use_gram_svd)
        model, _ = ops.build(sharp_model(tiny_source), method, {"r": 4}, BuildContext(calibration_batch=batch))
        layer = model.get_base_model().model.layers[1].mlp.down_proj
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        states.append((delta, layer.get_base_layer().weight.detach().clone()))
    (d_cpu, w_cpu), (d_gpu, w_gpu) = states
    assert d_cpu.abs().max() > 0
    assert torch.allclose(d_gpu, d_cpu, atol=2e-4 * d_cpu.abs().max().item())
    assert torch.allclose(w_gpu, w_cpu, atol=1e-4)
