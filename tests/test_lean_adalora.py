"""Lean AdaLoRA (training/lean/adalora.py, methods/adalora.py) against peft 0.21 on the tiny model, in fp32: the
forward's loss and gradients, the orthogonality penalty and its gradient, and the rank allocator's scores, masks and
rank patterns over a whole budget schedule."""

import copy

import pytest
import torch
from adapter_checks import perturb_trainable

from peft_arena.methods import ops
from peft_arena.methods.registry import BuildContext, MethodError
from peft_arena.training import lean
from peft_arena.training.lean import adalora as lean_adalora

BATCH = {"input_ids": torch.tensor([[5, 17, 99, 240, 7, 31, 8, 400]]),
         "labels": torch.tensor([[5, 17, 99, 240, 7, 31, 8, 400]])}


@pytest.fixture(autouse=True)
def _peft_code_back():
    lean_adalora.uninstall()
    yield
    lean_adalora.uninstall()


def _spy(monkeypatch, name: str) -> list:
    """Count the calls of one lean function (installed by ``install()`` after this), to prove the lean path ran."""
    calls, original = [], getattr(lean_adalora, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(lean_adalora, name, spy)
    return calls


def _model(tiny_source, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_source, dtype=dtype)
    options = {"dropout": 0.0, **overrides}
    model, options = ops.build(base, "adalora", options, BuildContext(total_steps=10, train="sft"))
    perturb_trainable(model, 0.05)  # off the init (E = 0), so that every factor gets a gradient
    return model, options


def _loss_and_grads(model, batch=BATCH):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _CountEye(torch.overrides.TorchFunctionMode):
    """Counts ``torch.eye`` calls: one per P/Q matrix where peft computes its regulariser."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.eye
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_forward_matches_peft(tiny_source, dropout, monkeypatch):
    lean_calls = _spy(monkeypatch, "_svd_linear_forward")
    model, _ = _model(tiny_source, dropout=dropout)
    model.train()
    results, eyes = [], []
    for patched in (False, True):
        lean_adalora.uninstall()
        if patched:
            lean.install()
        torch.manual_seed(0)  # the same dropout masks
        with _CountEye() as counter:
            results.append(_loss_and_grads(model))
        eyes.append(counter.calls)
    # orth_reg_weight is 0 (the callback owns the regulariser): peft still builds its 28 Gram matrices, we don't
    assert model.peft_config["default"].orth_reg_weight == 0 and eyes == [2 * 14, 0]
    assert len(lean_calls) == 14  # one lean forward per adapted linear, in the second pass only
    (loss_peft, grads_peft), (loss_lean, grads_lean) = results
    assert loss_lean == pytest.approx(loss_peft, rel=1e-6)
    assert grads_lean.keys() == grads_peft.keys() and len(grads_peft) == 3 * 14  # A, E, B of 2 layers × 7 linears
    scale = max(g.abs().max().item() for g in grads_peft.values())
    for name, grad in grads_peft.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_lean[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_lean_forward_on_a_bf16_base_keeps_no_full_width_tensor(tiny_source, monkeypatch):
    """bf16 base, fp32 adapter, autocast, no input casting (training on a GPU, here on the CPU): ranknum is frozen
    again, the output keeps the activation dtype and matches peft's, and the backward keeps no T×out tensor."""
    lean_calls = _spy(monkeypatch, "_svd_linear_forward")
    model, _ = _model(tiny_source, dtype=torch.bfloat16)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "ranknum" in n)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    lean.disable_input_casting(model)
    layer = model.base_model.model.model.layers[0].mlp.gate_proj  # 64 → 128
    x = torch.randn(3, 40, 64, dtype=torch.bfloat16, requires_grad=True)
    outputs = []
    for patched in (False, True):
        lean_adalora.uninstall()
        if patched:
            lean_adalora.install()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
        outputs.append((y, max(saved)))
    (y_peft, _), (y_lean, biggest) = outputs
    assert y_lean.dtype == y_peft.dtype == torch.bfloat16 and y_lean.shape == (3, 40, 128)
    torch.testing.assert_close(y_lean.float(), y_peft.float(), rtol=2e-2, atol=2e-2 * y_peft.abs().max().item())
    assert len(lean_calls) == 1 and biggest < 3 * 40 * 128  # the input (T×64) and T×r products only
    y_lean.float().sum().backward()
    assert layer.lora_E["default"].grad.abs().sum() > 0 and x.grad is not None


def test_orthogonality_penalty_equals_pefts(tiny_source):
    """Our grouped penalty against the one peft's AdaLoraModel.forward adds to the loss (orth_reg_weight > 0)."""
    from peft_arena.methods.adalora import orthogonality_penalty

    model, options = _model(tiny_source)
    model.train()
    weight = options["orth_reg_weight"]
    loss_plain, grads_plain = _loss_and_grads(model)
    model.peft_config["default"].orth_reg_weight = weight  # peft's own regulariser, added to outputs.loss
    loss_reg, grads_reg = _loss_and_grads(model)
    model.peft_config["default"].orth_reg_weight = 0.0
    model.zero_grad()
    penalty = orthogonality_penalty(model)
    (weight * penalty).backward()
    assert penalty.item() > 0.1  # far from orthogonal: the check below means something
    assert weight * penalty.item() == pytest.approx(loss_reg - loss_plain, rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected = grads_reg[name] - grads_plain[name]
            if ".lora_E." in name:
                assert p.grad is None or not p.grad.any()
                continue
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=name)
            assert expected.abs().sum() > 0


def test_rank_allocator_matches_peft_over_the_schedule(tiny_source, monkeypatch):
    """Two copies trained alike, one allocated by peft's RankAllocator, one by the lean one: the same importance
    scores (bitwise), masks, rank patterns and weights after every step of warm-up, pruning, final mask and fixed
    phase (total 10 steps, tinit 1, tfinal 2, a reallocation every step)."""
    calls = {name: _spy(monkeypatch, name) for name in ("_update_ipt", "_mask_to_budget", "_mask_using_rank_pattern")}
    model, _ = _model(tiny_source, delta_t=1)
    twins = [model, copy.deepcopy(model)]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in twins]
    gen = torch.Generator().manual_seed(3)
    patterns = []
    for step in range(10):
        ids = torch.randint(5, 400, (2, 9), generator=gen)
        for m, opt in zip(twins, opts):
            m.train()
            m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
        lean_adalora.uninstall()
        twins[0].base_model.update_and_allocate(step)  # peft's
        lean_adalora.install()
        twins[1].base_model.update_and_allocate(step)  # lean
        peft_alloc, lean_alloc = (m.base_model.rankallocator for m in twins)
        for stats in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            a, b = getattr(peft_alloc, stats), getattr(lean_alloc, stats)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (step, stats)
        pattern = [m.peft_config["default"].rank_pattern for m in twins]
        assert pattern[0] == pattern[1], step
        patterns.append(pattern[0])
        for (n, p), (_, q) in zip(*(m.named_parameters() for m in twins)):
            assert torch.equal(p, q), (step, n)
        for opt in opts:
            opt.zero_grad()
    assert peft_alloc.ipt == {}  # reset at the final mask (step 8), as peft does
    final = patterns[-1]
    kept = [sum(v) for v in final.values()]
    assert sum(kept) == 8 * len(final) and len(set(kept)) > 1  # an average of r = 8, reallocated across layers
    assert patterns[3] != patterns[5]  # the masks moved during the budget phase
    # A rank pattern read back from a saved config has the adapter name cut from its keys
    truncated = {k.replace(".default", ""): v for k, v in final.items()}
    for m in twins:
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    lean_adalora.uninstall()
    twins[0].base_model.rankallocator.mask_using_rank_pattern(twins[0].model, truncated)
    lean_adalora.install()
    twins[1].base_model.rankallocator.mask_using_rank_pattern(twins[1].model, truncated)
    # the lean allocator did the second twin's work: scores on steps 0-7, pruning on 2-8, fixed masks on 9 + above
    assert {name: len(c) for name, c in calls.items()} == {"_update_ipt": 8, "_mask_to_budget": 7,
                                                          "_mask_using_rank_pattern": 2}
    e_values = [torch.cat([p.view(-1) for n, p in m.named_parameters() if "lora_E" in n]) for m in twins]
    assert torch.equal(*e_values) and int((e_values[0] == 0).sum()) == sum(len(v) - sum(v) for v in final.values())


def test_reallocation_needs_r_below_init_r(tiny_source):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_source, dtype=torch.float32)
    with pytest.raises(MethodError, match=r"r \(16\) must be below init_r \(16\)"):
        ops.build(base, "adalora", {"r": 16, "init_r": 16}, BuildContext(total_steps=10))
    model, options = ops.build(base, "adalora", {"r": 16, "init_r": 16, "reallocate": False},
                               BuildContext(total_steps=10))  # fixed ranks: nothing to prune
    assert options["reallocate"] is False
