"""Adapter folders → exact factors (checked against PEFT's own merge), whole-model analyze() and plots on the tiny model."""

import json

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, MissConfig, OFTConfig, VeraConfig, get_peft_model

from peft_arena.models import ensure_tiny, load_model
from peft_arena.spectral import plots
from peft_arena.spectral.analysis import analyze
from peft_arena.spectral.deltas import factor_deltas, finish_factors, has_factor_form, read_artifact
from peft_arena.spectral.profiles import matrix_profile


@pytest.fixture(scope="module")
def tiny():
    return str(ensure_tiny())


def _randomise(model, seed):
    """Make every adapter parameter non-trivial (PEFT initialises most updates to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _save_adapter(tiny, cfg, folder, seed=0, method=None):
    model = get_peft_model(load_model(tiny), cfg)
    _randomise(model, seed)
    model.save_pretrained(folder)
    if method:
        (folder / "arena_method.json").write_text(json.dumps(
            {"method": method, "options": {}, "base_model": "tiny", "base_source": tiny, "label": f"{method} test"}))
    merged = model.merge_and_unload().state_dict()
    return {k: v.detach().to(torch.float64) for k, v in merged.items()}


FACTOR_CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 5}),
    "adalora": AdaLoraConfig(init_r=6, lora_alpha=8, target_modules=["q_proj", "up_proj"], total_step=10),
    "vera": VeraConfig(r=8, target_modules=["q_proj", "down_proj", "k_proj"]),
    "miss": MissConfig(r=8, target_modules=["q_proj", "down_proj"]),
}


@pytest.mark.parametrize("method", list(FACTOR_CONFIGS))
def test_factors_equal_peft_merge(tiny, tmp_path, method):
    merged = _save_adapter(tiny, FACTOR_CONFIGS[method], tmp_path)
    base = {k: v.to(torch.float64) for k, v in load_model(tiny).state_dict().items()}
    info = read_artifact(tmp_path)
    assert has_factor_form(info)
    deltas = list(factor_deltas(info, dtype=torch.float64))
    assert deltas
    for d in deltas:
        d = finish_factors(d, tuple(base[d.name].shape))
        assert d.kind == "factors"
        want = merged[d.name] - base[d.name]
        assert want.abs().max() > 1e-3  # the update is real
        assert torch.allclose(d.B @ d.A, want, atol=1e-5), (method, d.name)


def test_dora_and_oft_take_the_dense_path(tiny, tmp_path):
    _save_adapter(tiny, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]), tmp_path / "dora")
    _save_adapter(tiny, OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj"]), tmp_path / "oft")
    assert not has_factor_form(read_artifact(tmp_path / "dora"))
    oft = read_artifact(tmp_path / "oft")
    assert not has_factor_form(oft) and oft.is_oft


def test_analyze_lora_adapter_end_to_end(tiny, tmp_path):
    merged = _save_adapter(tiny, FACTOR_CONFIGS["lora"], tmp_path / "lora", method="lora")
    cache = tmp_path / "cache"
    summary = analyze(tiny, str(tmp_path / "lora"), out_dir=str(tmp_path / "out"), cache_dir=str(cache),
                      device="cpu", top_k=8, progress=False)
    assert summary["paths"] == {"factors": 14} and summary["num_layers_analyzed"] == 2
    assert summary["method"] == "lora" and summary["label"] == "lora test"
    assert summary["svd_cache_hits"] == 0 and len(list(cache.iterdir())) == 14
    # One matrix against the dense profile of PEFT's merged weight.
    name = "model.layers.1.mlp.down_proj.weight"
    base = {k: v.to(torch.float64) for k, v in load_model(tiny).state_dict().items()}
    want = matrix_profile(base[name], merged[name], top_k=8)
    assert summary["per_layer"][name]["effective_rank"] == pytest.approx(want.summary["effective_rank"], rel=1e-5)
    assert summary["per_layer"][name]["intruders"] == want.summary["intruders"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "profiles" / "model_layers_1_mlp_down_proj_weight.safetensors"))
    assert torch.allclose(saved["E_delta"].double(), want.profiles["E_delta"], atol=1e-5)
    # Metric keys follow the project's naming, and aggregates are means over layers.
    per = [summary["per_layer"][f"model.layers.{i}.mlp.down_proj.weight"]["effective_rank"] for i in (0, 1)]
    assert summary["metrics"]["spectral/mlp.down_proj/eff_rank"] == pytest.approx(sum(per) / 2)
    rows = {(r["layer"], r["module"]): r for r in summary["per_matrix_rows"]}
    assert rows[(1, "mlp.down_proj")]["eff_rank"] == pytest.approx(per[1]) and len(rows) == 14
    assert 7 * 5 < len(summary["metrics"]) <= 13 + 7 * 6  # all metrics over every matrix + headline means per type
    assert not any(k.startswith("spectral/layers.") for k in summary["metrics"])
    assert all("@" not in k and "(" not in k for k in summary["metrics"])
    for f in ("spectral_summary.json", "norm_comparison.json", "norm_comparison.csv", "profiles/index.json"):
        assert (tmp_path / "out" / f).exists()
    norms = summary["norms"]
    assert norms["num_changed_tensors"] == 14
    assert norms["delta_l2"] == pytest.approx(
        sum(float((merged[k] - base[k]).norm()) ** 2 for k in base) ** 0.5, rel=1e-5)
    # Second run reuses every base SVD from the content-keyed cache and gives the same numbers.
    again = analyze(tiny, str(tmp_path / "lora"), out_dir=str(tmp_path / "out2"), cache_dir=str(cache),
                    device="cpu", top_k=8, progress=False, layers=[1], modules=["down_proj"])
    assert again["svd_cache_hits"] == 1 and again["num_matrices"] == 1
    assert again["per_layer"][name]["effective_rank"] == pytest.approx(summary["per_layer"][name]["effective_rank"])


def test_analyze_dense_full_model_and_plots(tiny, tmp_path):
    model = load_model(tiny)
    name = "model.layers.0.self_attn.o_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(tmp_path / "full")
    summary = analyze(tiny, str(tmp_path / "full"), out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"),
                      device="cpu", top_k=8, progress=False)
    assert summary["peft_type"] == "FULL" and summary["paths"] == {"dense": 14}
    assert summary["per_layer"][name]["effective_rank"] > 5  # a random dense update has a high stable rank
    other = summary["per_layer"]["model.layers.0.self_attn.q_proj.weight"]
    assert other["effective_rank"] == 0.0 and other["E_delta_max"] == 0.0
    assert summary["norms"]["num_changed_tensors"] == 1

    # OFT adapter for the method grid (dense path through PEFT's merge, with SVA).
    _save_adapter(tiny, OFTConfig(r=0, oft_block_size=16, target_modules="all-linear"), tmp_path / "oft",
                  method="oft")
    oft = analyze(tiny, str(tmp_path / "oft"), out_dir=str(tmp_path / "out_oft"), cache_dir=str(tmp_path / "c"),
                  device="cpu", top_k=8, progress=False)
    assert oft["paths"] == {"dense": 14} and "spectral/all/sva_mean" in oft["metrics"]

    figs = {
        "curves": plots.plot_layer_curves(tmp_path / "out", [name]),
        "erank": plots.plot_effective_rank(tmp_path / "out"),
        "dist": plots.plot_distributions(tmp_path / "out_oft"),
        "grid": plots.plot_method_grid([("full", str(tmp_path / "out")), ("OFT b16", str(tmp_path / "out_oft"))],
                                       name),
    }
    for key, fig in figs.items():
        fig.savefig(tmp_path / f"{key}.png")
        assert (tmp_path / f"{key}.png").stat().st_size > 10_000
    # series are named by method and configuration ("oft b16", never a bare "b16"), in the method's arena colour
    from peft_arena.plotting.style import method_color

    oft_curve = figs["grid"].axes[1].get_lines()[0]
    assert oft_curve.get_color() == method_color("oft")
    assert figs["curves"].axes[0].get_legend().get_texts()[0].get_text() == "full"
    label = json.loads((tmp_path / "out_oft" / "spectral_summary.json").read_text())["label"]
    assert figs["dist"]._suptitle.get_text() == (label if label.startswith("oft") else f"oft {label}")
    ticks = figs["dist"].axes[0].get_xticklabels()  # readable: horizontal, the module's own name
    assert [t.get_rotation() for t in ticks] == [0.0] * len(ticks) and "o_proj" in [t.get_text() for t in ticks]
    labels = [ax.get_ylabel() for ax in figs["curves"].axes]
    assert any("/ σ_1" in lab for lab in labels) and any("Σ_j" in lab for lab in labels)
