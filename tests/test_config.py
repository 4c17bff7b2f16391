"""The one config object: typos and bad values are errors that say what to change."""

from __future__ import annotations

import pytest

from common.config import ConfigError, FedConfig, from_mapping, load_toml


def test_defaults_are_valid_and_private():
    cfg = FedConfig()
    assert cfg.dp and cfg.secagg and cfg.epsilon == 8.0


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown setting 'epsilion'.*did you mean 'epsilon'"):
        from_mapping({"epsilion": 3})


@pytest.mark.parametrize("key,value,match", [
    ("rounds", 0, "rounds must be at least 1"),
    ("delta", 2.0, "delta must be in"),
    ("partition", "noniid", "partition must be one of iid, dirichlet"),
    ("epsilon", "lots", "epsilon must be a float"),
    ("dp", "maybe", "dp must be a bool"),
    ("fraction", 0.0, "fraction must be in"),
])
def test_bad_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping({key: value})


def test_simulation_needs_train_and_eval_together(tmp_path):
    from simulations.simulate import prepare_sites

    with pytest.raises(ConfigError, match="give both --train and --eval"):
        prepare_sites(FedConfig(train="x.tsv", out=str(tmp_path)))


def test_run_config_round_trip():
    cfg = FedConfig(lora_targets=("query", "value"), labels=("a", "b"), rounds=7, dp=False)
    assert from_mapping(cfg.to_run_config()) == cfg


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 4\nlora-targets = ["query", "value"]\n', encoding="utf-8")
    cfg = from_mapping(load_toml(path))
    assert cfg.rounds == 4 and cfg.lora_targets == ("query", "value")
    path.write_text("rounds = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
