"""The one config object: typos and bad values are errors that say what to change."""

from __future__ import annotations

import pytest

from fedseal.common.config import ConfigError, FedConfig, from_mapping, load_toml


def test_defaults_are_valid_and_private():
    cfg = FedConfig()
    assert cfg.dp and cfg.secagg and cfg.epsilon == 8.0


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown setting 'epsilion'.*did you mean 'epsilon'"):
        from_mapping({"epsilion": 3})


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("rounds", 0, "rounds must be at least 1"),
        ("delta", 2.0, "delta must be in"),
        ("partition", "noniid", "partition must be one of iid, dirichlet"),
        ("epsilon", "lots", "epsilon must be a number, got 'lots'"),
        ("dp", "maybe", "dp must be true or false, got 'maybe'"),
        ("rounds", "many", "rounds must be an integer, got 'many'"),
        ("lora_targets", 7, "lora-targets must be a comma-separated list, got 7"),
        ("fraction", 0.0, "fraction must be in"),
    ],
)
def test_bad_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping({key: value})


def test_simulation_needs_train_and_eval_together(tmp_path):
    from fedseal.simulations.simulate import prepare_sites

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


@pytest.mark.parametrize("key", ["server_lr", "secagg_k", "secagg_threshold"])
def test_automatic_settings_say_auto_and_zero_is_refused(tmp_path, key):
    assert getattr(FedConfig(), key) == "auto"
    path = tmp_path / "run.toml"
    path.write_text(f'{key.replace("_", "-")} = "AUTO"\n', encoding="utf-8")
    assert getattr(from_mapping(load_toml(path)), key) == "auto"
    # 0 meant "automatic" before; a config still written that way is told what to write.
    path.write_text(f"{key} = 0\n", encoding="utf-8")
    with pytest.raises(
        ConfigError,
        match=f"{key.replace('_', '-')} must be 'auto' or a positive "
        r".*got '?0'?; for the automatic choice write auto",
    ):
        from_mapping(load_toml(path))


def test_eval_max_examples_is_all_or_a_positive_count():
    assert FedConfig().eval_max_examples == "all"
    assert from_mapping({"eval-max-examples": "200"}).eval_max_examples == 200
    with pytest.raises(
        ConfigError,
        match="eval-max-examples must be 'all' or a positive integer, got 0; for no limit write all",
    ):
        FedConfig(eval_max_examples=0)


def test_server_lr_auto_is_the_strategys_and_a_number_wins():
    assert FedConfig(strategy="fedavg").effective_server_lr == 1.0
    assert FedConfig(strategy="fedadam").effective_server_lr == 0.01
    cfg = from_mapping({"strategy": "fedadam", "server-lr": "0.5"})
    assert cfg.server_lr == 0.5 and cfg.effective_server_lr == 0.5
    with pytest.raises(ConfigError, match="server-lr must be 'auto' or a positive number, got -1"):
        FedConfig(server_lr=-1.0)
    with pytest.raises(ConfigError, match="server-lr must be 'auto' or a positive number, got 'fast'"):
        from_mapping({"server-lr": "fast"})


def test_run_config_round_trip_keeps_auto_and_numbers():
    cfg = FedConfig(clients=10, secagg_k=4, secagg_threshold="auto", server_lr=0.3)
    run_config = cfg.to_run_config()
    assert run_config["secagg-threshold"] == "auto" and run_config["secagg-k"] == 4
    assert from_mapping(run_config) == cfg
