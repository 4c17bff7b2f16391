"""`fedseal simulate --prepare-only`: a folder that `flwr run .` runs as Flower's own simulation.

Running the printed command itself (a local SuperLink, Ray, minutes) is checked by
hand and reported in the README; this checks what the command relies on.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedseal.client.site import simulation_key_file, simulation_roster_file, simulation_site_file
from fedseal.common.bundle import CLIENT_APP, SERVER_APP
from fedseal.common.config import ConfigError
from fedseal.simulations.simulate import FLWR_RUN_CONFIG, FLWR_RUN_KEYS, main

ROOT = Path(__file__).resolve().parents[1]


def test_the_prepared_config_overrides_only_keys_flower_accepts() -> None:
    """Flower refuses a --run-config key that pyproject.toml's app config does not have."""
    app = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    assert set(FLWR_RUN_KEYS) == set(app["config"])
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}


def test_a_setting_flwr_run_would_drop_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not model, text-column"):
        main(["--prepare-only", "--out", str(tmp_path / "out"), "--text-column", "text", "--model", "other"])
    assert not (tmp_path / "out" / FLWR_RUN_CONFIG).exists()


def test_prepare_only_writes_the_sites_and_prints_the_flwr_command(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        main(["--prepare-only", "--out", "relative-out", "--clients", "3", "--rounds", "2", "--epsilon", "4"])
        == 0
    )
    out = (tmp_path / "relative-out").resolve()
    config = tomllib.loads((out / FLWR_RUN_CONFIG).read_text(encoding="utf-8"))
    assert set(config) == set(FLWR_RUN_KEYS)
    assert (config["out"], config["clients"], config["rounds"], config["epsilon"]) == (str(out), 3, 2, 4.0)
    for key in ("train", "eval"):  # absolute: Flower runs the app from its own folder
        assert Path(config[key]).is_absolute() and Path(config[key]).is_file()
    for pid in range(3):
        assert simulation_site_file(out, pid).is_file() and simulation_key_file(out, pid).is_file()
    assert len(simulation_roster_file(out).read_text().splitlines()) == 3
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [
        f"flwr run . local --run-config {out / FLWR_RUN_CONFIG} "
        "--federation-config 'num-supernodes=3' --stream"
    ]
    assert not (out / "metrics.jsonl").exists()  # nothing ran
