"""Server optimisers that work on the *mean update* only.

Secure aggregation gives the server ``sum_i w_i * update_i`` and ``sum_i w_i``,
never a single site's update, so a strategy here sees one vector per round:
the weighted mean update. FedAvg adds it (times a server learning rate);
FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization") treats it as a
pseudo-gradient for Adam. State is explicit so checkpoints can hold it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fedseal.common.config import FedConfig

Weights = Mapping[str, np.ndarray]


class Strategy(Protocol):
    """Turns the current global weights and the round's mean update into new ones.

    ``mean_update`` holds the weights the round moved (:func:`fedseal.common.vote.round_keys`);
    every other weight is returned as it was.
    """

    def step(self, weights: Weights, mean_update: Weights) -> OrderedDict[str, np.ndarray]:
        """Return the next global weights."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays needed to resume (empty for stateless strategies)."""

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`."""


class FedAvg:
    """``w <- w + server_lr * mean_update`` (server_lr 1.0 is McMahan et al.'s FedAvg)."""

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def step(self, weights: Weights, mean_update: Weights) -> OrderedDict[str, np.ndarray]:
        """Apply the mean update."""
        return OrderedDict(
            (k, (w + self.server_lr * mean_update[k]).astype(np.float32) if k in mean_update else w)
            for k, w in weights.items()
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """FedAvg keeps no state."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Nothing to restore."""


class FedAdam:
    """Adam on the server with the mean update as the (negative) gradient."""

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, weights: Weights, mean_update: Weights) -> OrderedDict[str, np.ndarray]:
        """One Adam step; moments start at zero (no bias correction, as in the paper)."""
        out = OrderedDict()
        for k, w in weights.items():
            if k not in mean_update:
                out[k] = w
                continue
            delta = mean_update[k].astype(np.float64)
            m = self.beta1 * self.m.get(k, np.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.beta2 * self.v.get(k, np.zeros_like(delta)) + (1 - self.beta2) * delta**2
            self.m[k], self.v[k] = m, v
            out[k] = (w + self.server_lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """First and second moments, keyed ``m/<name>`` and ``v/<name>``."""
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore both moments."""
        self.m = {k[2:]: np.asarray(v) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v) for k, v in state.items() if k.startswith("v/")}


def make_strategy(cfg: FedConfig) -> Strategy:
    """The strategy named by ``cfg.strategy`` (under distributed noise, the server's DP-SGD)."""
    if cfg.dp_noise == "distributed":
        from fedseal.common.ddp_wire import head_lr
        from fedseal.server.ddp_round import DistributedOptimiser

        return DistributedOptimiser(head_lr(cfg))
    if cfg.strategy == "fedadam":
        return FedAdam(cfg.effective_server_lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_tau)
    return FedAvg(cfg.effective_server_lr)
