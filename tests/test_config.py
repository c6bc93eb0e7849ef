"""Config: YAML recipes, overrides, JSON round trip, validation."""
import pytest

from ddlm.config import RunConfig, make_config, parse_overrides
from ddlm.errors import ConfigError


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: mdlm\nmodel:\n  dim: 128\ntrain:\n  steps: 7\nmdlm:\n  schedule: cosine\n")
    run = make_config(recipe=str(recipe), overrides=parse_overrides(["--train.steps", "9", "--model.n_layers=2"]))
    assert (run.method, run.model.dim, run.model.n_layers, run.train.steps) == ("mdlm", 128, 2, 9)
    assert run.method_options.schedule == "cosine"
    assert RunConfig.from_dict(run.to_dict()) == run


def test_shipped_recipe_loads():
    from pathlib import Path

    run = make_config(recipe=str(Path(__file__).parents[1] / "recipes" / "austen_char_small.yaml"))
    assert run.data.seq_len == 256 and run.model.dim == 256


@pytest.mark.parametrize("overrides, message", [
    ({"train.ema": "1.5"}, "train.ema"),
    ({"model.dropout": "yes"}, "not a number"),
    ({"train.compile": "maybe"}, "not a boolean"),
    ({"foo.bar": "1"}, "unknown config section"),
    ({"mdlm.schedule": "cosine"}, "do not apply to method 'ar'"),
])
def test_bad_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(overrides=overrides)


def test_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        make_config(recipe=str(bad))
