"""Strategies on the mean update."""

from __future__ import annotations

import numpy as np

from fedseal.server.strategy import FedAdam, FedAvg


def test_fedavg_adds_scaled_mean():
    w = {"a": np.ones(3, dtype=np.float32)}
    out = FedAvg(0.5).step(w, {"a": np.array([2.0, -2.0, 0.0])})
    np.testing.assert_allclose(out["a"], [2.0, 0.0, 1.0])


def test_fedadam_moves_along_sign_and_resumes_from_state():
    w = {"a": np.zeros(2, dtype=np.float32)}
    upd = {"a": np.array([1e-3, -5.0])}
    opt = FedAdam(0.1, 0.9, 0.99, 1e-6)
    first = opt.step(w, upd)
    assert first["a"][0] > 0 > first["a"][1]
    # Adaptive: step sizes are similar despite a 5000x difference in update size.
    assert abs(first["a"][1]) / first["a"][0] < 5
    twin = FedAdam(0.1, 0.9, 0.99, 1e-6)
    twin.load_state_dict(opt.state_dict())
    np.testing.assert_array_equal(twin.step(first, upd)["a"], opt.step(first, upd)["a"])
