"""Lean VeRA and IA3 forwards (peft_arena/training/lean/vera.py, ia3.py): the same losses and gradients as peft's."""

import pytest
import torch
from adapter_checks import perturb_trainable, sharp_model

BATCH = {"input_ids": torch.tensor([[5, 17, 99, 240, 7, 31], [8, 3, 77, 120, 64, 9]]),
         "labels": torch.tensor([[5, 17, 99, 240, 7, 31], [-100, 3, 77, 120, 64, 9]])}
N_ADAPTED = 7 * 2  # all-linear on the tiny model's two decoder layers


def _model(source, method, options, dtype=torch.float32, sharp=0.3):
    """The tiny model with larger weights (std ``sharp``) and the adapter moved off its init, so that every term
    matters."""
    from peft_arena.methods import ops

    model = sharp_model(source, sharp).to(dtype)
    model, _ = ops.build(model, method, options)
    perturb_trainable(model, 0.2)
    model.train()
    return model


def _counted(monkeypatch, module, function):
    """Count the lean autograd function's calls, so that a test cannot pass on peft's forward."""
    calls = []
    apply = function.apply

    def counting(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(function, "apply", counting)
    return calls


def _run(model, module, lean, autocast=False, batch=BATCH):
    module.uninstall()
    if lean:
        module.install()
    try:
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads
    finally:
        module.uninstall()


def _lean_module(method):
    from peft_arena.training.lean import ia3, vera

    return (vera, vera._VeraDelta) if method == "vera" else (ia3, ia3._Scale)


CASES = [("vera", {"dropout": 0.0, "r": 16}), ("vera", {"dropout": 0.3, "r": 16}), ("vera", {"dropout": 0.0}),
         ("ia3", {}), ("ia3", {"feedforward_modules": "down_proj,up_proj"})]


@pytest.mark.parametrize("method,options", CASES)
def test_lean_matches_peft_in_fp32(tiny_source, monkeypatch, method, options):
    module, function = _lean_module(method)
    model = _model(tiny_source, method, options)
    loss_peft, grad_peft = _run(model, module, lean=False)
    calls = _counted(monkeypatch, module, function)
    loss_lean, grad_lean = _run(model, module, lean=True)
    assert len(calls) == N_ADAPTED
    assert loss_lean == pytest.approx(loss_peft, rel=1e-6)
    assert grad_lean.keys() == grad_peft.keys()
    scale = max(g.abs().max().item() for g in grad_peft.values())
    for name, g in grad_peft.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(grad_lean[name], g, rtol=1e-4, atol=1e-4 * scale), name


@pytest.mark.parametrize("method,options,casting", [
    ("vera", {"dropout": 0.0, "r": 16}, True), ("vera", {"dropout": 0.3, "r": 16}, False), ("ia3", {}, True),
    ("ia3", {"feedforward_modules": "down_proj,up_proj"}, True)])
def test_lean_is_as_accurate_as_peft_on_a_bf16_base_under_autocast(tiny_source, monkeypatch, method, options, casting):
    """bf16 base, fp32 adapter, bf16 autocast (peft's input casting on, and off as on the GPU): the two round at
    different places, so each is compared with the float64 gradient of the same (bf16-rounded) model."""
    import copy

    from peft_arena.training import lean

    module, function = _lean_module(method)
    model = _model(tiny_source, method, options, dtype=torch.bfloat16, sharp=0.05)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    if not casting:
        lean.disable_input_casting(model)
    ids = torch.randint(5, 400, (4, 32), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    loss_ref, grad_ref = _run(copy.deepcopy(model).double(), module, lean=False, batch=batch)
    loss_peft, grad_peft = _run(model, module, lean=False, autocast=True, batch=batch)
    calls = _counted(monkeypatch, module, function)
    loss_lean, grad_lean = _run(model, module, lean=True, autocast=True, batch=batch)
    assert len(calls) == N_ADAPTED
    assert loss_lean == pytest.approx(loss_ref, rel=2e-4) and loss_peft == pytest.approx(loss_ref, rel=2e-4)
    ref = torch.cat([grad_ref[n].flatten() for n in sorted(grad_ref)]).double()

    def error(grads):
        return ((torch.cat([grads[n].flatten() for n in sorted(grad_ref)]).double() - ref).norm() / ref.norm()).item()

    # measured: both ~1% off (bf16 autocast everywhere), lean/peft between 0.90 and 1.09
    assert error(grad_peft) < 0.03
    assert error(grad_lean) < 1.3 * error(grad_peft)


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``fn()``'s graph (views count once)."""
    kept = {}

    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


@pytest.mark.parametrize("method", ["vera", "ia3", "ia3-feedforward"])
def test_lean_layers_keep_less_for_backward_and_fall_back_when_merged(monkeypatch, method):
    """One wide linear on a bf16 base under autocast: the lean VeRA keeps no T×out tensor for the backward pass (T×r
    only), the lean IA3 no fp32 copy; merged and disabled adapters run peft's forward and agree with the lean one."""
    from peft import IA3Config, VeraConfig, get_peft_model

    module, function = _lean_module(method.split("-")[0])
    torch.manual_seed(0)
    tokens, d_in, d_out, r = 256, 32, 512, 8
    net = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=True)).to(torch.bfloat16)
    config = {"vera": VeraConfig(r=r, target_modules=["0"]),
              "ia3": IA3Config(target_modules=["0"], feedforward_modules=[]),
              "ia3-feedforward": IA3Config(target_modules=["0"], feedforward_modules=["0"])}[method]
    model = get_peft_model(net, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    module.uninstall()
    y_peft, peft_bytes = _saved_bytes(step)
    calls = _counted(monkeypatch, module, function)
    module.install()
    try:
        y_lean, lean_bytes = _saved_bytes(step)
        assert len(calls) == 1 and y_lean.dtype == y_peft.dtype == torch.bfloat16
        assert torch.allclose(y_lean.float(), y_peft.float(), rtol=2e-2, atol=2e-2 * y_peft.abs().max().item())
        if method == "vera":  # peft keeps B·hd (T×out bf16); the lean one T×r, views of A and B, the λ vectors
            assert peft_bytes >= tokens * d_out * 2 > lean_bytes
        elif method == "ia3":  # both keep the base output (bf16) for the vector's gradient
            assert lean_bytes <= peft_bytes
        else:  # peft keeps an fp32 copy of x, the lean one x itself
            assert peft_bytes - lean_bytes >= tokens * d_in * 2
        with torch.no_grad():
            model.merge_adapter()
            y_merged = model(x)
            model.unmerge_adapter()
            with model.disable_adapter():
                y_base = model(x)
        assert len(calls) == 1  # merged / disabled: peft's forward
        assert torch.allclose(y_merged.float(), y_lean.float(), rtol=5e-2, atol=5e-2 * y_lean.abs().max().item())
        assert not torch.allclose(y_base.float(), y_lean.float(), rtol=1e-2, atol=1e-2)
    finally:
        module.uninstall()
