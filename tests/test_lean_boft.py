"""Lean BOFT (peft_arena/training/lean/boft.py) against peft's own BOFT in fp32: permutations, loss, every gradient,
merge; and the arena's builder/loader never allocate peft's dense permutation stack, yet save what peft loads."""

from __future__ import annotations

import pytest
import torch
from adapter_checks import perturb_trainable

from peft_arena.methods import BuildContext, ops
from peft_arena.methods.boft import install_block_diag_kernel
from peft_arena.models import ensure_tiny, load_model
from peft_arena.training.lean import boft as lean_boft

BATCH = {"input_ids": torch.tensor([[5, 17, 99, 240, 7, 31, 3, 64]]),
         "labels": torch.tensor([[5, 17, 99, 240, 7, 31, 3, 64]])}


@pytest.fixture(autouse=True)
def _lean_installed_after():
    yield
    lean_boft.install()  # the state the arena's builder leaves (other tests build BOFT through it)


def _peft_boft(model, **config):
    """A BOFT model built by peft itself (dense permutation stack), with the block-diagonal kernel in its slot."""
    from peft import BOFTConfig, get_peft_model

    install_block_diag_kernel()
    return get_peft_model(model, BOFTConfig(**config))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _peft_then_lean(model, run, calls=None):
    """``run(model)`` with peft's BOFT forward, then with the lean one, which must really run (``calls`` times,
    default: once per BOFT layer at least)."""
    from unittest import mock

    out = []
    calls = calls or sum(1 for m in model.modules() if hasattr(m, "boft_R"))
    for patched in (False, True):
        lean_boft.uninstall()
        if patched:
            lean_boft.install()
        model.zero_grad()
        torch.manual_seed(0)  # the same multiplicative-dropout draws
        with mock.patch.object(lean_boft, "rotation_blocks", wraps=lean_boft.rotation_blocks) as spy:
            out.append(run(model))
        assert spy.call_count >= calls if patched else spy.call_count == 0
    return out


def _close(lean, ref, rel=1e-4):
    assert torch.allclose(lean, ref, rtol=rel, atol=rel * ref.abs().max().item()), (lean - ref).abs().max()


@pytest.mark.parametrize("n,blocks,size,factors", [(64, 8, 8, 2), (128, 16, 8, 2), (256, 16, 16, 3),
                                                   (512, 128, 4, 4), (96, 12, 8, 3), (3584, 448, 8, 2),
                                                   (64, 8, 8, 1)])
def test_butterfly_permutations_are_pefts(n, blocks, size, factors):
    from peft.tuners.boft.layer import BOFTLayer

    layer = BOFTLayer.__new__(BOFTLayer)
    for i in range(factors):
        ref = BOFTLayer.block_butterfly_perm(layer, n, int(blocks / 2 ** i), int(size / 2), factors - 1)
        assert torch.equal(lean_boft.butterfly_perm(n, blocks, size, factors, i), ref)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lean_boft_matches_peft_on_the_tiny_model(tiny_source, dropout):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_source, dtype=torch.float32)
    model = _peft_boft(base, boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=dropout,
                       target_modules="all-linear")
    perturb_trainable(model, 0.1)
    model.train()

    def loss_and_grads(m):
        loss = m(**BATCH, use_cache=False).loss
        loss.backward()
        return loss.detach(), _grads(m)

    (loss_peft, grad_peft), (loss_lean, grad_lean) = _peft_then_lean(model, loss_and_grads)
    assert loss_lean.item() == pytest.approx(loss_peft.item(), rel=1e-5)
    _close(grad_lean, grad_peft)
    assert (grad_peft != 0).float().mean() > 0.5  # the R and s gradients are there


@pytest.mark.parametrize("size,factors,bias", [(8, 2, True), (4, 3, False), (8, 1, True), (16, 2, True)])
def test_lean_boft_matches_peft_on_a_linear_stack(size, factors, bias):
    """Biased and unbiased linears, several factor counts (m=1 is OFT), two adapters active at once."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 96, bias=bias), torch.nn.Tanh(), torch.nn.Linear(96, 64))
    model = _peft_boft(net, boft_block_size=size, boft_n_butterfly_factor=factors, target_modules=["0", "2"],
                       init_weights=False)
    x = torch.randn(3, 5, 128)
    weights = torch.linspace(-1, 1, 64)

    def out_and_grads(m):
        y = m(x)
        (y * weights).sum().backward()
        return y.detach(), _grads(m)

    (y_peft, g_peft), (y_lean, g_lean) = _peft_then_lean(model, out_and_grads)
    _close(y_lean, y_peft, 1e-5)
    _close(g_lean, g_peft)

    # merge / unmerge go through get_delta_weight: the same dense rotation and the same merged weights
    layer = model.base_model.model[0]
    (r_peft, s_peft), (r_lean, s_lean) = _peft_then_lean(model, lambda m: layer.get_delta_weight("default"), 1)
    _close(r_lean.detach(), r_peft.detach(), 1e-6)
    assert torch.allclose(r_lean @ r_lean.T, torch.eye(128), atol=1e-5)

    # peft's merge and unmerge (TRL merges and unmerges at every vLLM weight sync): the same weights both ways
    def merged_then_unmerged(m):
        base = layer.get_base_layer().weight
        original = base.detach().clone()
        layer.merge(safe_merge=True)
        merged = base.detach().clone()
        layer.unmerge()
        restored = base.detach().clone()
        base.data = original
        return merged, restored

    with torch.no_grad():
        before = layer.get_base_layer().weight.detach().clone()
        (m_peft, u_peft), (m_lean, u_lean) = _peft_then_lean(model, merged_then_unmerged, 2)
    _close(m_lean, m_peft, 1e-6)
    _close(u_lean, u_peft, 1e-6)
    _close(u_lean, before, 1e-5)
    assert (m_lean - before).abs().max() > 1e-3

    # two adapters active together: peft composes rotations and scales
    from peft import BOFTConfig

    model.add_adapter("second", BOFTConfig(boft_block_size=size, boft_n_butterfly_factor=factors,
                                           target_modules=["0", "2"], init_weights=False))
    model.base_model.set_adapter(["default", "second"])
    (y_peft, g_peft), (y_lean, g_lean) = _peft_then_lean(model, out_and_grads)
    _close(y_lean, y_peft, 1e-5)
    _close(g_lean, g_peft)


def test_lean_boft_runs_in_bf16_under_autocast():
    """The trainers' setting in miniature: bf16 activations and base, fp32 adapter, autocast; close to fp32."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=True))
    model = _peft_boft(net, boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["0"], init_weights=False)
    lean_boft.install()
    x = torch.randn(2, 7, 128)
    ref = model(x)
    (ref * torch.linspace(-1, 1, 64)).sum().backward()
    ref_grad = _grads(model)
    model.zero_grad()
    model.base_model.model[0].base_layer.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x.to(torch.bfloat16))
        (y.float() * torch.linspace(-1, 1, 64)).sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.allclose(_grads(model), ref_grad, atol=0.05 * ref_grad.abs().max().item())


def test_builder_allocates_no_dense_permutations_and_peft_loads_what_it_saves(tmp_path, monkeypatch):
    from peft import PeftModel

    source = str(ensure_tiny())
    big = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.numel() >= 64 * 64 and t.dtype == torch.float32:
            big.append(tuple(t.shape))
        return t

    torch.manual_seed(0)
    base = load_model(source)
    monkeypatch.setattr(torch, "empty", recording_empty)
    model, options = ops.build(base, "boft", None, BuildContext())
    monkeypatch.setattr(torch, "empty", real_empty)
    assert not [s for s in big if len(s) == 3], big  # peft's (m, in, in) stack was never allocated
    layers = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "boft_R")]
    assert len(layers) == 2 * 7 and not any("boft_P" in m._buffers for m in layers)

    # train with the lean path, save, reload through plain peft (dense stack, peft's forward) and through ours
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**BATCH).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(**BATCH).logits
    out = ops.save_trained(model, "boft", options, tmp_path / "art", base_model="tiny", base_source=source)

    ours = ops.load_trained(None, out)
    lean_boft.uninstall()
    install_block_diag_kernel()
    theirs = PeftModel.from_pretrained(load_model(source), str(out))
    assert theirs.base_model.model.model.layers[0].mlp.down_proj.boft_P.shape == (2, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**BATCH).logits, trained, atol=2e-5, rtol=1e-4)
        merged_theirs = theirs.merge_and_unload().state_dict()
    lean_boft.install()
    with torch.no_grad():
        torch.testing.assert_close(ours(**BATCH).logits, trained, atol=2e-5, rtol=1e-4)
    merged_ours = ops.merge(ours).state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, atol=1e-6, rtol=1e-5)


def test_cayley_without_the_sync_is_pefts():
    from peft.tuners.boft.layer import BOFTLayer

    torch.manual_seed(0)
    data = torch.randn(12, 8, 8, requires_grad=True)
    ref = BOFTLayer.cayley_batch(None, data)
    ours = lean_boft.cayley_batch(data)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(ours @ ours.transpose(1, 2), torch.eye(8).expand(12, 8, 8), atol=1e-5, rtol=0)
    (g_ref,) = torch.autograd.grad((ref * torch.arange(64.).view(8, 8)).sum(), data)
    (g_ours,) = torch.autograd.grad((ours * torch.arange(64.).view(8, 8)).sum(), data)
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("checkpointing", [None, False, True])  # off, non-reentrant, reentrant
def test_prepared_model_stacks_every_layers_blocks(tiny_source, checkpointing):
    """``lean.prepare``: one Cayley/factor stack per layer shape per forward (not per layer), the same loss and
    gradients as peft, also under gradient checkpointing; stale blocks are never used."""
    from unittest import mock

    from transformers import AutoModelForCausalLM

    from peft_arena.training import lean

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_source, dtype=torch.float32)
    model = _peft_boft(base, boft_block_size=8, boft_n_butterfly_factor=2, target_modules="all-linear")
    perturb_trainable(model, 0.1)
    model.train()

    def loss_and_grads(m):
        m.zero_grad()
        loss = m(**BATCH, use_cache=False).loss
        loss.backward()
        return loss.detach(), _grads(m)

    lean_boft.uninstall()
    loss_peft, grad_peft = loss_and_grads(model)
    lean.prepare(model, torch.float32, cuda=False)
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing})
        if checkpointing:
            model.enable_input_require_grads()
    try:
        with mock.patch.object(lean_boft, "stacked_rotation_blocks", wraps=lean_boft.stacked_rotation_blocks) as stk, \
                mock.patch.object(lean_boft, "rotation_blocks", wraps=lean_boft.rotation_blocks) as per_layer:
            loss_lean, grad_lean = loss_and_grads(model)
        assert loss_lean.item() == pytest.approx(loss_peft.item(), rel=1e-5)
        _close(grad_lean, grad_peft)
        if checkpointing:  # reentrant recomputation would run a shared stack's backward per layer: per-layer blocks
            assert lean_boft._REENTRANT["seen"] and per_layer.call_count > 0
        else:  # two stacks (inputs of 64 and of 128 features), no layer computed its own blocks
            assert per_layer.call_count == 0
            assert [c.args[0].shape[:2] for c in stk.call_args_list] == [(12, 2), (2, 2)]

        if checkpointing is None:
            with torch.no_grad():  # a no-grad call of the training model outside its forward is not reentrancy
                model.base_model.model(**BATCH, use_cache=False)
            assert not lean_boft._REENTRANT["seen"]
            model.zero_grad()
            model(**BATCH, use_cache=False).loss.backward()  # blocks with a graph again
            with mock.patch.object(lean_boft, "stacked_rotation_blocks",
                                   wraps=lean_boft.stacked_rotation_blocks) as stk, torch.no_grad():
                a, b = model(**BATCH, use_cache=False).logits, model(**BATCH, use_cache=False).logits
            assert stk.call_count == 2 and torch.equal(a, b)  # generation-like: stacked once, then kept

        # after an optimizer step, a call that bypasses the model's forward (no precompute) must not reuse the
        # blocks of the old parameters
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        inner = model.base_model.model
        with mock.patch.object(lean_boft, "rotation_blocks", wraps=lean_boft.rotation_blocks) as per_layer:
            loss_inner = inner(**BATCH, use_cache=False).loss
        assert per_layer.call_count == 2 * 7
        lean_boft.uninstall()
        model.base_model.model.gradient_checkpointing_disable()
        assert loss_inner.item() == pytest.approx(inner(**BATCH, use_cache=False).loss.item(), rel=1e-5)
    finally:
        lean_boft._REENTRANT["seen"] = False


def test_train_sft_runs_lean_boft_with_checkpointing(tmp_path):
    """BOFT through train_sft as a user runs it (bf16 base, checkpointing on): the stacked blocks are used, the
    adapter moves, no dense permutation stack exists."""
    from unittest import mock

    from transformers import TrainerCallback

    from peft_arena.config import build_config
    from peft_arena.tracking.tracker import MemoryTracker
    from peft_arena.training import sft

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["r0"] = {n: p.detach().clone() for n, p in model.named_parameters() if "boft_R" in n}
            seen["stacks"] = [n for n, b in model.named_buffers() if "boft_P" in n]

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["r1"] = {n: p.detach().clone() for n, p in model.named_parameters() if "boft_R" in n}

    cfg = build_config("train_sft", None, {"base_model": "tiny", "adapter": "boft", "limit": "2", "max_steps": "2",
                                           "batch_size": "2", "warmup_ratio": "0", "precision": "bf16",
                                           "gradient_checkpointing": "on"})
    with mock.patch.object(lean_boft, "stacked_rotation_blocks", wraps=lean_boft.stacked_rotation_blocks) as stk, \
            mock.patch.object(lean_boft, "rotation_blocks", wraps=lean_boft.rotation_blocks) as per_layer:
        result = sft.train_sft(cfg, MemoryTracker(), tmp_path, extra_callbacks=[Probe()])
    assert stk.call_count >= 2 * 2 and per_layer.call_count == 0  # two shapes, every training forward
    assert seen["stacks"] == [] and len(seen["r0"]) == 2 * 7
    assert any((seen["r1"][n] != seen["r0"][n]).any() for n in seen["r0"])
    assert result["settings"]["train.gradient_checkpointing"] is True
    assert all(loss == loss for loss in result["losses"])


def test_blocks_made_without_grad_are_kept_until_the_parameters_change():
    """Generation: the blocks are computed once per layer, reused by later no-grad forwards, renewed after an
    update (and never reused by a forward that records a graph)."""
    from unittest import mock

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    model = _peft_boft(net, boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["0", "1"],
                       init_weights=False)
    lean_boft.install()
    x = torch.randn(2, 64)
    with mock.patch.object(lean_boft, "rotation_blocks", wraps=lean_boft.rotation_blocks) as spy:
        with torch.no_grad():
            first = model(x)
            assert torch.equal(model(x), first) and spy.call_count == 2
            model.base_model.model[0].boft_R["default"].mul_(0.5)
            changed = model(x)
            assert spy.call_count == 3 and not torch.allclose(changed, first)
        with_grad = model(x)
        assert spy.call_count == 5 and with_grad.grad_fn is not None
    lean_boft.uninstall()
    with torch.no_grad():
        torch.testing.assert_close(changed, model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factors", [1, 3])
def test_first_use_in_inference_mode_does_not_break_training(factors):
    """The cached permutations and identities are made as normal tensors even in inference mode."""
    lean_boft._gathers.cache_clear()
    lean_boft._identities.cache_clear()
    torch.manual_seed(0)
    model = _peft_boft(torch.nn.Sequential(torch.nn.Linear(96, 32)), boft_block_size=4, boft_n_butterfly_factor=factors,
                       target_modules=["0"], init_weights=False)
    lean_boft.install()
    x = torch.randn(2, 96)
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
