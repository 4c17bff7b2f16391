"""One (DP-)SGD step over a Poisson batch processed in chunks, on Opacus's per-sample machinery.

A step of the sampled Gaussian mechanism: every example of the batch
contributes its own gradient clipped to norm ``clip``, the sum gets Gaussian
noise of standard deviation ``noise_multiplier * clip``, and the result is
divided by the *expected* batch size (so the step does not reveal the batch's
actual size). :class:`PrivateSteps` runs it with Opacus (``DPOptimizer`` or its
ghost-clipping variant) on any module and optimiser, with the batch given as
chunks of per-example losses: each example lies in one chunk, so clipping is
per example whatever the chunking (:meth:`DPOptimizer.signal_skip_step`
accumulates the chunks' clipped sums and adds the noise once).

Per-sample gradients come from one of Opacus's ``grad_sample_mode``\\ s:
``hooks`` (per-layer formulas), ``functorch`` (``vmap`` per layer) or ``ghost``
(per-example norms without per-example gradients, then a second backward
pass); ``simulations/bench/lora_speed.py`` measures them.

An empty Poisson batch is still a step: noise alone (:func:`noise_only_step`;
Opacus 1.6 raises "Per sample gradient is not initialized" on it otherwise).
Without a noise multiplier (``None``) the same chunks give a plain, non-private
step with the same normalisation, the baseline a DP step is compared to.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from fedseal.client.randomness import fresh_generator

CPU = torch.device("cpu")
"""The default device of a step (the noise is drawn where the gradients are)."""
MODES = ("hooks", "functorch", "ghost")

Chunk = Callable[[], torch.Tensor]
"""Computes one chunk's per-example losses (a vector) with autograd on."""


def noise_only_step(optimizer) -> None:
    """Take a DP step on an empty Poisson batch: zero clipped gradients, then noise and the update.

    ``optimizer`` is an Opacus ``DPOptimizer`` (per-sample gradients of no
    example) or ``DPOptimizerFastGradientClipping`` (a zero summed gradient).
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping

    for p in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


class PrivateSteps:
    """DP-SGD steps of ``optimizer`` on ``params`` of ``module``, batches given as chunks.

    Parameters
    ----------
    module
        The module whose forward the chunks call (Opacus's hooks attach to it).
    params
        The parameters trained; every other parameter of ``module`` must not
        require gradients while the steps run.
    optimizer
        A torch optimiser over ``params``; it sees the noisy mean gradient.
    noise_multiplier
        The Gaussian noise's multiplier, or None for non-private steps.
    clip
        Per-example clipping norm.
    expected_batch
        The Poisson batch's expected size (the divisor of every step).
    mode
        Opacus's ``grad_sample_mode``: one of :data:`MODES`.
    device
        Where the noise is drawn.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float | None,
        clip: float,
        expected_batch: float,
        mode: str = "hooks",
        device: torch.device = CPU,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"grad_sample_mode {mode!r} is not one of {MODES}")
        if expected_batch <= 0:
            raise ValueError(f"expected batch must be positive, got {expected_batch}")
        self.module, self.params, self.mode = module, list(params), mode
        self.expected_batch = expected_batch
        self.private = noise_multiplier is not None
        self.optimizer = optimizer
        self.hooks = None
        # Opacus records activations only in modules in training mode; the
        # modules that own trained parameters (linear layers: the same in both
        # modes) are put in it, the rest keep their mode (dropout stays off in
        # an evaluating module).
        trained = {id(p) for p in self.params}
        self._modes = [
            (m, m.training)
            for m in module.modules()
            if any(id(p) in trained for p in m.parameters(recurse=False))
        ]
        for m, _ in self._modes:
            m.train()
        if self.private:
            from opacus.grad_sample.utils import prepare_module
            from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

            extra = {"max_grad_norm": clip} if mode == "ghost" else {}
            self.hooks = prepare_module(
                module, mode, wrap_model=False, batch_first=True, loss_reduction="sum", strict=True, **extra
            )
            wrapper = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                self.optimizer = wrapper(
                    optimizer,
                    noise_multiplier=noise_multiplier,
                    max_grad_norm=clip,
                    expected_batch_size=expected_batch,
                    loss_reduction="mean",
                    generator=fresh_generator(device),
                )

    def step(self, chunks: Sequence[Chunk]) -> tuple[float, int]:
        """One step over the batch made of ``chunks``; (summed loss, examples) of the batch."""
        total, count = 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        if not chunks and self.private:
            noise_only_step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            return total, count
        with self._quiet():
            for i, chunk in enumerate(chunks):
                losses = chunk()
                total += float(losses.detach().sum())
                count += len(losses)
                if not self.private:
                    (losses.sum() / self.expected_batch).backward()
                    continue
                if self.mode == "ghost":
                    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

                    DPTensorFastGradientClipping(self.hooks, self.optimizer, losses, "sum").backward()
                else:
                    losses.sum().backward()
                if i < len(chunks) - 1:  # clip and accumulate; noise once, at the last chunk
                    cast(Any, self.optimizer).signal_skip_step(True)  # Opacus's DPOptimizer
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, count

    @staticmethod
    @contextlib.contextmanager
    def _quiet() -> Iterator[None]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample attributes from the module."""
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
        for m, mode in self._modes:
            m.train(mode)

    def __enter__(self) -> PrivateSteps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Chunk", "MODES", "PrivateSteps", "noise_only_step"]
