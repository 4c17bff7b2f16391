"""Server checkpoints: round trip, a crash between the two writes, corruption detected."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseal.common.config import FedConfig
from fedseal.common.vote import round_phase
from fedseal.server import checkpoint as ckpt_mod
from fedseal.server.checkpoint import (
    CheckpointError,
    check_resume_config,
    check_resume_phases,
    load_checkpoint,
    save_checkpoint,
)


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.layer.0.lora_A": rng.normal(size=(4, 8)).astype(np.float32),
        "classifier.bias": rng.normal(size=(2,)).astype(np.float32),
    }


def _state(seed: int) -> dict[str, np.ndarray]:
    return {"m/classifier.bias": np.full(2, seed, np.float64), "t": np.array([seed], np.int64)}


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_no_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "missing") is None
    assert load_checkpoint(tmp_path) is None


def test_round_trip(tmp_path):
    cfg = FedConfig().to_dict()
    rows = [{"round": 1, "accuracy": 0.5, "epsilon": {"a": 1.0}}]
    save_checkpoint(tmp_path, 1, _weights(1), _state(1), rows, cfg)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 1
    _assert_same(loaded.weights, _weights(1))
    _assert_same(loaded.strategy_state, _state(1))
    assert loaded.metrics == rows and loaded.config == cfg
    save_checkpoint(tmp_path, 2, _weights(2), {}, rows * 2, cfg)  # FedAvg: no strategy state
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.strategy_state == {}
    _assert_same(loaded.weights, _weights(2))
    # Only the current tensors remain, no temporary files.
    assert len([n for n in _files(tmp_path) if n.endswith(".safetensors")]) == 1
    assert not [n for n in _files(tmp_path) if n.endswith(".tmp")]
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["weights_file"].startswith("weights-round-0002-")


def test_crash_between_tensors_and_manifest_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 3, _weights(3), _state(3), [{"round": 3}], {"lr": 0.1})
    real_replace = ckpt_mod.os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("checkpoint.json"):
            raise KeyboardInterrupt("power cut")  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, _weights(4), _state(4), [{"round": 4}], {"lr": 0.1})
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    # Round 4's tensors reached the disk but were never committed: round 3 loads, intact.
    assert len([n for n in _files(tmp_path) if n.endswith(".safetensors")]) == 2
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 3 and loaded.metrics == [{"round": 3}]
    _assert_same(loaded.weights, _weights(3))
    # Resuming and saving round 4 again cleans up the orphan.
    save_checkpoint(tmp_path, 4, _weights(4), _state(4), [{"round": 4}], {"lr": 0.1})
    assert load_checkpoint(tmp_path).round == 4
    assert len([n for n in _files(tmp_path) if n.endswith(".safetensors")]) == 1


def test_crash_before_first_manifest_means_no_checkpoint(tmp_path, monkeypatch):
    def crash(src, dst):
        if str(dst).endswith("checkpoint.json"):
            raise OSError("disk full")
        return real(src, dst)

    real = ckpt_mod.os.replace
    monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 1, _weights(1), {}, [], {})
    assert load_checkpoint(tmp_path) is None


def test_resaving_the_same_round_never_breaks_the_current_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 5, _weights(5), {}, [], {})
    save_checkpoint(tmp_path, 5, _weights(6), {}, [], {})
    _assert_same(load_checkpoint(tmp_path).weights, _weights(6))


def test_corrupted_tensors_are_detected(tmp_path):
    save_checkpoint(tmp_path, 1, _weights(1), _state(1), [], {})
    name = json.loads((tmp_path / "checkpoint.json").read_text())["weights_file"]
    raw = bytearray((tmp_path / name).read_bytes())
    raw[-1] ^= 0x01  # one bit in the last tensor's data
    (tmp_path / name).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_checkpoint(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_non_numeric_or_unserialisable_input_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="not a numeric array"):
        save_checkpoint(tmp_path, 1, {"x": np.array([object()])}, {}, [], {})
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, _weights(1), {}, [{"bad": object()}], {})
    assert _files(tmp_path) == [] and load_checkpoint(tmp_path) is None


def test_check_resume_config():
    saved = FedConfig(rounds=5, lr=0.005).to_dict()
    check_resume_config(saved, FedConfig(rounds=5, lr=0.005).to_dict())
    check_resume_config(
        saved, FedConfig(rounds=8, lr=0.005, out="elsewhere", timeout=5.0, tensorboard="tb").to_dict()
    )
    dashed = {k.replace("_", "-"): v for k, v in FedConfig(rounds=5, lr=0.005).to_dict().items()}
    check_resume_config(saved, dashed)
    with pytest.raises(CheckpointError, match=r"lr: saved 0.005, now 0.01.*strategy: saved 'fedavg'"):
        check_resume_config(saved, FedConfig(rounds=5, lr=0.01, strategy="fedadam").to_dict())
    with pytest.raises(CheckpointError, match=r"rounds \(may grow, not shrink\): saved 5, now 3"):
        check_resume_config(saved, FedConfig(rounds=3, lr=0.005).to_dict())
    with pytest.raises(CheckpointError, match="epsilon: saved 8.0, now <absent>"):
        check_resume_config({"epsilon": 8.0}, {})
    check_resume_config({"epsilon": 8.0, "lr": 1.0}, {"epsilon": 8.0, "lr": 2.0}, keys=("epsilon",))


def test_a_checkpoint_from_before_the_vote_resumes_as_the_plain_mean_it_ran():
    """A checkpoint saved before ``aggregation`` existed ran the plain mean: resuming it
    names that value (one the user can set), and resumes with it."""
    saved = {k: v for k, v in FedConfig(rounds=5).to_dict().items() if k != "aggregation"}
    with pytest.raises(CheckpointError, match="aggregation: saved 'mean', now 'auto'"):
        check_resume_config(saved, FedConfig(rounds=5).to_dict())
    check_resume_config(saved, FedConfig(rounds=5, aggregation="mean").to_dict())


def test_completed_rounds_must_keep_the_phase_they_trained():
    """A resumed run's schedule must put every completed round in the phase its row
    recorded; a row without one (written before phases were recorded) passes unless the
    run's schedule is one the rule split differently then; the rows must be those of the
    completed rounds, and a malformed one is a CheckpointError."""
    cfg = FedConfig(finetune="lora", rounds=7, dp_noise="distributed", clients=4, min_clients=3)

    def check(rows, completed=6, run=cfg, required=True):
        check_resume_phases(
            rows, completed, lambda r: round_phase(run, r), require_recorded=required, saved_rounds=7
        )

    rows = [{"round": r, "phase": round_phase(cfg, r)} for r in range(1, 7)]
    assert [r["phase"] for r in rows] == ["statistics", "head", "head", "head", "head", "adapters"]
    check(rows)
    check(list(reversed(rows)))
    earlier = [dict(r, phase="adapters") if r["round"] == 5 else r for r in rows]
    with pytest.raises(CheckpointError, match="round 5 of the checkpoint trained 'adapters'.*rounds: 7"):
        check(earlier, required=False)
    unrecorded = [{"round": r["round"]} for r in rows]
    check(unrecorded, required=False)
    with pytest.raises(CheckpointError, match="did not record each round's phase"):
        check(unrecorded)
    for bad, match in [
        (rows[:5], r"completed 6 round\(s\) but its metrics hold rows of rounds \[1, 2, 3, 4, 5\]"),
        ([*rows, rows[-1]], "rows of rounds"),
        ([], "rows of rounds"),
        ([*rows[:5], {"round": "6", "phase": "adapters"}], "no round number"),
        ([*rows[:5], {"phase": "adapters"}], "no round number"),
        ([*rows[:5], ["round", 6]], "no round number"),
        ([*rows[:5], {"round": True}], "no round number"),
        ([*rows[:5], {"round": 6, "phase": 3}], "trained 3"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            check(bad)
    # Without DP the rounds may grow, and LP-FT's split moves with them: rounds 5 and 6 of a
    # non-private 7-round run trained adapters, which 11 rounds would train as head rounds.
    plain = FedConfig(finetune="lora", rounds=7, dp=False, lora_targets=("query",), labels=("a", "b"))
    done = [{"round": r, "phase": round_phase(plain, r)} for r in range(1, 7)]
    with pytest.raises(CheckpointError, match="round 5 .*'adapters'.*trains 'head'.*saved rounds"):
        check(done, run=plain.replace(rounds=11))
    probe = FedConfig(finetune="probe", rounds=7)
    assert [round_phase(probe, r) for r in (1, 2, 7)] == ["statistics", "head", "head"]
    assert round_phase(FedConfig(finetune="full", rounds=7), 1) == "all weights"
