"""Recipe loading, dotted overrides and validation errors of the stage configs."""

import pytest

from peft_arena.config import (ConfigError, SFTConfig, build_config, config_params, pairs_to_overrides,
                               parse_assignments)


def test_defaults_run_on_the_embedded_model():
    cfg = build_config("train_sft")
    assert isinstance(cfg, SFTConfig)
    assert cfg.base_model == "smollm2-135m" and cfg.adapter == "lora" and cfg.domain == "math"


def test_recipe_then_overrides_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: oft\nlr: 1.0e-4\nmax_steps: 7\nmethod:\n  block_size: 16\n")
    cfg = build_config("train_sft", str(recipe), {"max_steps": "9", "method.block_size": "64"})
    assert cfg.adapter == "oft"
    assert cfg.lr == pytest.approx(1e-4)
    assert cfg.max_steps == 9
    assert cfg.method_options == {"block_size": 64}


def test_override_values_are_typed_like_yaml():
    cfg = build_config("train_grpo", None, {"method.r": "16", "grpo.beta": "0.04", "grpo.use_vllm": "false",
                                            "lr": "1e-5"})
    assert cfg.method_options == {"r": 16}
    assert cfg.grpo_options == {"beta": 0.04, "use_vllm": False}
    assert cfg.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": "abc"}, "max_steps must be int, got 'abc'"),
    ({"epochs": "x"}, "epochs must be float"),
    ({"adaptor": "lora"}, "unknown SFTConfig key 'adaptor'"),
    ({"max_steps": 2.5}, "max_steps must be int"),
])
def test_bad_values_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config("train_sft", None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("train_sft", str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config("train_sft", str(bad))


def test_assignments_and_passthrough_pairs():
    assert parse_assignments("lr=1e-4 'method.target_modules=q_proj,v_proj'") == {
        "lr": "1e-4", "method.target_modules": "q_proj,v_proj"}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_assignments("lr")
    # undeclared `mlflow run -P k=v` arrive as `--k v`
    assert pairs_to_overrides(["--max_steps", "5", "--method.r", "16", "--grpo.beta=0.1"]) == {
        "max_steps": "5", "method.r": "16", "grpo.beta": "0.1"}
    with pytest.raises(ConfigError, match="needs a value"):
        pairs_to_overrides(["--max_steps"])


def test_config_params_flatten_method_options():
    cfg = build_config("train_sft", None, {"method.r": "4"})
    params = config_params(cfg)
    assert params["method.r"] == 4 and "method_options" not in params
