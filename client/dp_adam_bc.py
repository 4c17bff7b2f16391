"""Adam for DP-SGD's noisy gradients, with the noise's variance taken out of the second moment.

DP-AdamBC (Tang, Panda, Sankararaman, Wang, Mittal 2024, "DP-AdamBC: Your DP-Adam Is
Actually DP-SGD (Unless You Apply Bias Correction)", AAAI): the privatised mean
gradient is the true mean plus Gaussian noise of known variance
``noise_variance = (sigma * clip / expected batch)^2`` per coordinate, so Adam's
second moment estimates ``E[g^2] + noise_variance``. Where the noise dominates,
plain Adam divides each coordinate by its own noise level and every coordinate
moves by about the learning rate, signal or not (DP-Adam behaves like sign-SGD
on noise). DP-AdamBC subtracts the known variance before the square root::

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
    p -= lr * m_hat / sqrt(max(v_hat - noise_variance, noise_variance, floor))

The floor bounds the step of a coordinate whose corrected second moment is
near zero (the paper's gamma'): at the noise's own variance, a coordinate that
holds only noise moves by at most ``lr`` times its momentum over the noise's
standard deviation, not by ``lr`` times that over ``sqrt(floor)``. Without noise
(``noise_variance = 0``) it is Adam with ``eps = sqrt(floor)`` under the root.
The server's step under the sum's noise is the same rule
(:class:`fedseal.server.ddp_round.DistributedOptimiser`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DPAdamBC(torch.optim.Optimizer):
    """Adam with the DP noise's variance subtracted from the second moment (see the module)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        noise_variance: float,
        floor: float,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        if lr <= 0 or noise_variance < 0 or floor <= 0:
            raise ValueError(
                f"need lr > 0, noise_variance >= 0 and floor > 0; got {lr}, {noise_variance}, {floor}"
            )
        super().__init__(params, {"lr": lr, "betas": betas, "noise_variance": noise_variance, "floor": floor})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["m"] / (1 - beta1**t)
                v_hat = state["v"] / (1 - beta2**t)
                floor = max(group["noise_variance"], group["floor"])
                denom = (v_hat - group["noise_variance"]).clamp(min=floor).sqrt()
                p.addcdiv_(m_hat, denom, value=-group["lr"])
        return loss


__all__ = ["DPAdamBC"]
