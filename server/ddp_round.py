"""The server's round under distributed noise (``dp-noise = distributed``, docs/ddp.md).

Each round is one step of DP-SGD over the union of the sites' Poisson samples:

1. plan the round's encoding from public values only
   (:func:`fedseal.common.ddp_wire.plan_round`: the run's epsilon, delta,
   rounds, ``min-clients`` less ``max-colluders`` honest shares, the cohort) and
   send it with a fresh rotation seed in the ``train`` message's ``ddp`` record;
2. run SecAgg+ over the sites' encoded noisy shares
   (:func:`fedseal.server.secagg.masked_sum`): a share of the wrong length is
   dropped with its site at the masked-input stage;
3. decode the ring sum (:func:`fedseal.common.ddp.decode_sum`): a sum beyond what
   the survivors' honest shares reach (a site sent a share the protocol cannot
   produce) abandons the round, the model stays as it was;
4. step: the statistics round sets the feature mean and the head's log prior
   and remembers the noisy size of a step's sample; every later round is a
   heavy-ball SGD step, on the noisy sum of clipped gradients over that size
   (:class:`DistributedSgd`), of the head's weights, or under LP-FT's adapter
   rounds of the LoRA adapters and the head's weights together (at the adapter
   phase's learning rate and momentum, :mod:`fedseal.common.lora_rule`).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from fedseal.common import ddp, ddp_wire
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import FEATURE_MEAN_KEY, PRIOR_KEY, PROBE_MOMENTUM, prior_bias
from fedseal.common.lora_rule import LR as ADAPTER_LR
from fedseal.common.lora_rule import MOMENTUM as ADAPTER_MOMENTUM
from fedseal.common.vote import is_adapter_round
from fedseal.server.aggregate import RoundSums
from fedseal.server.identity import SiteNames
from fedseal.server.secagg import abandon, masked_sum

log = logging.getLogger("fedseal")

Weights = Mapping[str, np.ndarray]


class DistributedSgd:
    """The server's optimiser under distributed noise: it holds the step's sample size and
    the momentum of the weights it steps (both checkpointed with :meth:`state_dict`).

    ``lr`` and ``momentum`` are the head's; ``adapter_lr`` and
    ``adapter_momentum`` LP-FT's adapter rounds'. The momentum starts afresh
    when the stepped weights change (the first adapter round).
    """

    def __init__(
        self,
        lr: float,
        momentum: float = PROBE_MOMENTUM,
        adapter_lr: float = ADAPTER_LR,
        adapter_momentum: float = ADAPTER_MOMENTUM,
    ) -> None:
        self.lr, self.momentum = lr, momentum
        self.adapter_lr, self.adapter_momentum = adapter_lr, adapter_momentum
        self.batch = 0.0  # noisy size of a step's sample, from the statistics round
        self.velocity: np.ndarray | None = None

    def statistics(self, weights: Weights, noisy_sum: np.ndarray) -> OrderedDict[str, np.ndarray]:
        """Feature mean, log prior and sample size from the statistics round's noisy sum."""
        total = noisy_sum * math.sqrt(ddp_wire.STATISTICS_PARTS)
        features, labels = weights[FEATURE_MEAN_KEY].size, weights[PRIOR_KEY].size
        count = max(float(total[-1]), 1.0)
        counts = np.clip(total[features : features + labels], 0.0, None)
        proportions = counts / counts.sum() if counts.sum() > 0 else np.full(labels, 1.0 / labels)
        out = OrderedDict(weights)
        out[FEATURE_MEAN_KEY] = (total[:features] / count).astype(np.float32)
        out[PRIOR_KEY] = prior_bias(proportions)
        self.batch = count
        return out

    def step(
        self, weights: Weights, noisy_sum: np.ndarray, keys: list[str], *, adapters: bool = False
    ) -> OrderedDict[str, np.ndarray]:
        """One heavy-ball step of the weights ``keys`` on the noisy sum of clipped gradients.

        ``noisy_sum`` is their gradients flattened one after the other in the order of
        ``keys`` (:func:`fedseal.common.ddp_wire.step_keys`); ``adapters`` picks the
        adapter phase's learning rate and momentum.
        """
        lr, momentum = (self.adapter_lr, self.adapter_momentum) if adapters else (self.lr, self.momentum)
        gradient = np.asarray(noisy_sum, dtype=np.float64).reshape(-1) / self.batch
        size = sum(weights[key].size for key in keys)
        if size != gradient.size:
            raise ValueError(f"a step of {size} weights got a gradient of {gradient.size}")
        if self.velocity is None or self.velocity.shape != gradient.shape:
            self.velocity = gradient
        else:
            self.velocity = momentum * self.velocity + gradient
        out, start = OrderedDict(weights), 0
        for key in keys:
            end = start + weights[key].size
            delta = self.velocity[start:end].reshape(weights[key].shape)
            out[key] = (weights[key] - lr * delta).astype(np.float32)
            start = end
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The sample size and the momentum."""
        state = {"ddp/batch": np.array([self.batch])}
        if self.velocity is not None:
            state["ddp/velocity"] = self.velocity
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`."""
        self.batch = float(np.asarray(state.get("ddp/batch", [0.0])).reshape(-1)[0])
        velocity = state.get("ddp/velocity")
        self.velocity = None if velocity is None else np.asarray(velocity, dtype=np.float64)


def ddp_round(
    grid: Grid,
    nodes: list[int],
    content: RecordDict,
    weights: Weights,
    cfg: FedConfig,
    run_id: int,
    server_round: int,
    names: SiteNames,
    optimiser: DistributedSgd,
) -> tuple[OrderedDict[str, np.ndarray], RoundSums]:
    """One distributed-noise round; the next global weights and the round's sums (metadata).

    The weights are unchanged when the round is abandoned (``sums.abandoned`` says why).
    """
    sums = RoundSums()
    unchanged = OrderedDict(weights)
    statistics = ddp_wire.is_statistics_round(cfg, server_round)
    if not statistics and optimiser.batch <= 0:
        abandon(
            sums,
            server_round,
            "no statistics round completed, so a step's sample size is unknown; start the run afresh",
        )
        return unchanged, sums
    try:
        encoding = ddp_wire.plan_round(cfg, weights, server_round, len(nodes))
    except ddp.DdpError as exc:
        abandon(sums, server_round, f"no distributed-noise encoding fits: {exc}")
        return unchanged, sums
    seed = ddp_wire.fresh_seed()
    content[ddp_wire.RECORD] = ddp_wire.encoding_to_record(encoding, seed)
    summed = masked_sum(grid, nodes, content, encoding.padded_dim, cfg, run_id, server_round, sums, names)
    if summed is None:
        return unchanged, sums
    total, survivors = summed
    try:
        noisy = ddp.decode_sum(total, encoding, seed, len(survivors))
    except ddp.DdpError as exc:
        abandon(sums, server_round, f"the decoded sum is refused: {exc}")
        return unchanged, sums
    if statistics:
        return optimiser.statistics(weights, noisy), sums
    keys = ddp_wire.step_keys(weights, cfg, server_round)
    return optimiser.step(weights, noisy, keys, adapters=is_adapter_round(cfg, server_round)), sums


__all__ = ["DistributedSgd", "ddp_round"]
