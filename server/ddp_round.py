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
   and remembers the noisy size of a step's sample; every later round steps on
   the noisy sum of clipped gradients over that size
   (:class:`DistributedOptimiser`): a head round is a heavy-ball SGD step of the
   head's weights, an LP-FT adapter round a DP-AdamBC step of the LoRA adapters
   and the head's weights together, with the noise's variance known from the
   round's encoding (:func:`noise_variance`), at a rate that decays linearly
   over the adapter rounds (:func:`adapter_lr_scale`).
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
from fedseal.common.dp_rule import FEATURE_MEAN_KEY, PRIOR_KEY, PROBE_MOMENTUM, adapter_rounds, prior_bias
from fedseal.common.lora_rule import DISTRIBUTED_BETAS, DISTRIBUTED_LR
from fedseal.common.vote import is_adapter_round
from fedseal.server.aggregate import RoundSums
from fedseal.server.identity import SiteNames
from fedseal.server.secagg import abandon, masked_sum

log = logging.getLogger("fedseal")

ADAM_FLOOR = 1e-16
"""The floor under Adam's corrected second moment without noise (``eps`` 1e-8 under the root)."""

Weights = Mapping[str, np.ndarray]


class DistributedOptimiser:
    """The server's optimiser under distributed noise: it holds the step's sample size, the
    head rounds' momentum and the adapter rounds' Adam moments (all checkpointed with
    :meth:`state_dict`).

    Head rounds are heavy-ball SGD at ``lr`` and ``momentum``. LP-FT's adapter rounds
    are DP-AdamBC (Tang et al. 2024; :mod:`fedseal.client.dp_adam_bc` is the
    sites' version) at ``adapter_lr``: Adam whose second moment has the noise's
    known variance taken out and is floored at that variance, so a coordinate that
    holds only noise moves by about the rate times its momentum over the noise's
    standard deviation, not by the rate (after a single step its momentum is one
    noisy draw, which can exceed that deviation). The server knows the variance
    exactly from the round's public encoding and the number of shares in the sum
    (:func:`noise_variance`). Post-processing of the noisy sum, so the choice
    costs no privacy. The second moment averages the squared gradients of past
    rounds, whose noise differed when the survivors did, so what is taken out is
    the same average of each round's variance (``noise``: exact for any sequence
    of survivors, and the round's own variance while they stay the same); the floor
    is the larger of that average and the round's own variance.
    Without noise it is Adam (:data:`ADAM_FLOOR`). The sites' DP-AdamBC under
    their own noise is the same rule (:class:`fedseal.client.dp_adam_bc.DPAdamBC`).
    Each state starts afresh when the stepped weights change (the first adapter
    round).
    """

    def __init__(
        self,
        lr: float,
        momentum: float = PROBE_MOMENTUM,
        adapter_lr: float = DISTRIBUTED_LR,
        betas: tuple[float, float] = DISTRIBUTED_BETAS,
    ) -> None:
        self.lr, self.momentum = lr, momentum
        self.adapter_lr, self.betas = adapter_lr, betas
        self.batch = 0.0  # noisy size of a step's sample, from the statistics round
        self.velocity: np.ndarray | None = None
        self.moments: tuple[np.ndarray, np.ndarray] | None = None
        self.noise = 0.0  # the second moment's average of the rounds' noise variances
        self.adam_steps = 0

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
        self,
        weights: Weights,
        noisy_sum: np.ndarray,
        keys: list[str],
        *,
        adapters: bool = False,
        sum_variance: float = 0.0,
        lr_scale: float = 1.0,
    ) -> OrderedDict[str, np.ndarray]:
        """One step of the weights ``keys`` on the noisy sum of clipped gradients.

        ``noisy_sum`` is their gradients flattened one after the other in the order of
        ``keys`` (:func:`fedseal.common.ddp_wire.step_keys`); ``adapters`` picks the
        adapter rounds' DP-AdamBC over the head rounds' heavy-ball step;
        ``sum_variance`` is the noise's variance per coordinate of the sum
        (:func:`noise_variance`); ``lr_scale`` multiplies the rate (the adapter
        rounds' decay, :func:`adapter_lr_scale`).
        """
        gradient = np.asarray(noisy_sum, dtype=np.float64).reshape(-1) / self.batch
        size = sum(weights[key].size for key in keys)
        if size != gradient.size:
            raise ValueError(f"a step of {size} weights got a gradient of {gradient.size}")
        if adapters:
            lr, delta = self.adapter_lr, self._adam_bc(gradient, sum_variance / self.batch**2)
        else:
            lr, delta = self.lr, self._heavy_ball(gradient)
        lr *= lr_scale
        out, start = OrderedDict(weights), 0
        for key in keys:
            end = start + weights[key].size
            out[key] = (weights[key] - lr * delta[start:end].reshape(weights[key].shape)).astype(np.float32)
            start = end
        return out

    def _heavy_ball(self, gradient: np.ndarray) -> np.ndarray:
        if self.velocity is None or self.velocity.shape != gradient.shape:
            self.velocity = gradient
        else:
            self.velocity = self.momentum * self.velocity + gradient
        return self.velocity

    def _adam_bc(self, gradient: np.ndarray, variance: float) -> np.ndarray:
        beta1, beta2 = self.betas
        if self.moments is None or any(x.shape != gradient.shape for x in self.moments):
            self.moments = (np.zeros_like(gradient), np.zeros_like(gradient))
            self.noise, self.adam_steps = 0.0, 0
        m, v = self.moments
        m, v = beta1 * m + (1 - beta1) * gradient, beta2 * v + (1 - beta2) * gradient**2
        self.noise = beta2 * self.noise + (1 - beta2) * variance
        self.moments, self.adam_steps = (m, v), self.adam_steps + 1
        m_hat = m / (1 - beta1**self.adam_steps)
        v_hat = v / (1 - beta2**self.adam_steps)
        noise = self.noise / (1 - beta2**self.adam_steps)
        # floored at this round's variance too: after a rise, the momentum holds the larger noise
        return m_hat / np.sqrt(np.maximum(v_hat - noise, max(noise, variance, ADAM_FLOOR)))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The sample size, the momentum and the Adam moments (with their noise's average)."""
        state = {"ddp/batch": np.array([self.batch])}
        if self.velocity is not None:
            state["ddp/velocity"] = self.velocity
        if self.moments is not None:
            state["ddp/adam-m"], state["ddp/adam-v"] = self.moments
            state["ddp/adam-noise"] = np.array([self.noise])
            state["ddp/adam-steps"] = np.array([self.adam_steps])
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`.

        Raises
        ------
        ValueError
            If the state is not one :meth:`state_dict` writes: a value not finite, a
            sample size or a second moment below zero, moments of two shapes, a step
            count that is not a positive integer, or only part of the Adam state.
        """
        batch = _finite(state, "ddp/batch")
        if batch is not None and (batch.size != 1 or batch[0] < 0):
            raise ValueError("ddp/batch must be one sample size of at least 0")
        velocity = _finite(state, "ddp/velocity")
        m, v, noise, steps = (_finite(state, f"ddp/adam-{k}") for k in ("m", "v", "noise", "steps"))
        if len({x is None for x in (m, v, noise, steps)}) > 1:
            raise ValueError(
                "the Adam state needs all of ddp/adam-m, ddp/adam-v, ddp/adam-noise and ddp/adam-steps, or none"
            )
        if m is not None and v is not None and noise is not None and steps is not None:
            if m.shape != v.shape or np.any(v < 0):
                raise ValueError(
                    "ddp/adam-m and ddp/adam-v must have one shape, the second moment at least 0"
                )
            if noise.size != 1 or noise[0] < 0:
                raise ValueError("ddp/adam-noise must be one variance of at least 0")
            if steps.size != 1 or steps[0] < 1 or steps[0] != int(steps[0]):
                raise ValueError("ddp/adam-steps must be one positive integer")
        self.batch = 0.0 if batch is None else float(batch[0])
        self.velocity = velocity
        self.moments = None if m is None or v is None else (m, v)
        self.noise = 0.0 if noise is None else float(noise[0])
        self.adam_steps = 0 if steps is None else int(steps[0])


def _finite(state: Mapping[str, np.ndarray], key: str) -> np.ndarray | None:
    """``state[key]`` as a flat float64 vector (None when absent); ValueError unless finite."""
    if key not in state:
        return None
    value = np.asarray(state[key], dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{key} holds a value that is not finite")
    return value


def adapter_lr_scale(cfg: FedConfig, server_round: int) -> float:
    """The adapter rate's linear decay in run ``cfg``: 1 at the first of its ``A`` adapter
    rounds, ``1/A`` at the last (:mod:`fedseal.common.lora_rule`)."""
    return (cfg.rounds - server_round + 1) / adapter_rounds(cfg.rounds, cfg.dp_noise)


def noise_variance(encoding: ddp.Encoding, shares: int) -> float:
    """The noise's variance per coordinate of the decoded sum of ``shares`` shares (real units).

    Each share's discrete Gaussian of scale ``share_sigma`` (variance at most
    ``share_sigma**2``, within a relative 1e-7 of it) over ``scale`` squared, the
    rotation orthonormal; the rounding's own variance (at most 1/4 per share in
    ring units, far below ``share_sigma**2``) is left out.
    """
    return shares * (encoding.share_sigma / encoding.scale) ** 2


def ddp_round(
    grid: Grid,
    nodes: list[int],
    content: RecordDict,
    weights: Weights,
    cfg: FedConfig,
    run_id: int,
    server_round: int,
    names: SiteNames,
    optimiser: DistributedOptimiser,
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
    variance = noise_variance(encoding, len(survivors))
    adapters = is_adapter_round(cfg, server_round)
    scale = adapter_lr_scale(cfg, server_round) if adapters else 1.0
    return optimiser.step(
        weights, noisy, keys, adapters=adapters, sum_variance=variance, lr_scale=scale
    ), sums


__all__ = ["DistributedOptimiser", "adapter_lr_scale", "ddp_round", "noise_variance"]
