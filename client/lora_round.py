"""One round of the LP-FT adapter phase at a site: DP-SGD on top-layer adapters and the head.

The site's model is the probe's (its head trained by the federation) with LoRA
adapters in its top layers (:func:`fedseal.common.top_layers.add_top_lora`). A
round runs ``recipe.steps_per_round`` steps of the sampled Gaussian mechanism on
the adapters and the head's weights, on the site's cached states below the
adapters (:mod:`fedseal.common.hidden_cache`), so a step runs only the adapted
layers, the pooling and the head:

* Poisson sampling at the phase's rate (Opacus's ``UniformWithReplacementSampler``,
  seeded from the OS's CSPRNG);
* each batch in length-sorted chunks (:meth:`HiddenStates.chunks`), per-example
  clipping to ``recipe.clip`` and noise of the phase's multiplier
  (:class:`fedseal.client.dp_step.PrivateSteps`); an empty batch is a noise-only step;
* SGD with heavy-ball momentum on the noisy mean gradient (see
  :mod:`fedseal.common.lora_rule` for each setting and its source).

The head's bias stays the federation's log label prior, as in the probe's
rounds; the feature mean stays the statistics round's. Dropout is off (the
encoder runs in eval mode): DP noise is the regulariser, and a step's
per-example gradients are then functions of the example alone. The forward runs
in float32 on every device: under bf16 autocast Opacus computes the per-example
gradients, their norms and the clip factor in bf16, and a clipped record can then
exceed the clip by about 1%, more than the accountant assumes.

What the accountant needs: the adapter phase is its own :class:`Phase`
``(phase.noise_multiplier, phase.sample_rate, steps)``, composed with the
probe's phases (:func:`fedseal.common.lora_rule.epsilon_of`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedseal.client.dp_adam_bc import DPAdamBC
from fedseal.client.dp_step import PrivateSteps
from fedseal.client.randomness import fresh_generator
from fedseal.client.trainer import LocalResult
from fedseal.common.hidden_cache import HiddenStates
from fedseal.common.lora_rule import MAX_TOKENS, LoraRecipe, Phase
from fedseal.common.model import ModelError
from fedseal.common.top_layers import TopStack, adapted_layers, encoder_layers, fedseal_of


def trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the adapter phase trains: every LoRA matrix and the head's weight matrix."""
    fedseal = fedseal_of(model)
    adapters = [p for name, p in fedseal.backbone.named_parameters() if "lora_" in name]
    if not adapters:
        raise ModelError("the model has no LoRA adapters: build it with add_top_lora first")
    return [*adapters, fedseal.classifier.weight]


@contextlib.contextmanager
def only_trained(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, only ``params`` require gradients; the flags are restored after."""
    chosen = {id(p) for p in params}
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def _losses(
    stack: TopStack, hidden: HiddenStates, labels: torch.Tensor, index: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Per-example cross-entropy of the examples ``index``, in float32 (no autocast: the
    per-example clipping must hold exactly, see the module docstring)."""
    states, mask, lower = hidden.batch(index, device)
    logits = stack(states, mask, lower)
    return nn.functional.cross_entropy(logits.float(), labels[index].to(device), reduction="none")


def _optimizer(
    params: list[nn.Parameter], recipe: LoraRecipe, phase: Phase | None, expected_batch: float
) -> torch.optim.Optimizer:
    """SGD with momentum, or DP-AdamBC told the noise's variance per coordinate."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)
    if recipe.optimizer != "adam_bc":
        raise ValueError(f"optimizer {recipe.optimizer!r} is not sgd or adam_bc")
    sigma = phase.noise_multiplier if phase is not None else 0.0
    noise_variance = (sigma * recipe.clip / expected_batch) ** 2
    return DPAdamBC(params, lr=recipe.lr, noise_variance=noise_variance, floor=recipe.floor)


def check_inputs(model: nn.Module, hidden: HiddenStates, labels: torch.Tensor) -> None:
    """Raise ValueError unless ``hidden`` holds the states below the adapters, one per label."""
    depth = len(encoder_layers(fedseal_of(model).backbone))
    below = depth - adapted_layers(model)
    if hidden.cut != below:
        raise ValueError(
            f"the cached states enter layer {hidden.cut}, the adapters start at "
            f"layer {below}: compute the cache at cut={below}"
        )
    if len(labels) != len(hidden):
        raise ValueError(f"{len(labels)} labels for {len(hidden)} cached examples")


def lora_round(
    model: nn.Module,
    hidden: HiddenStates,
    labels: torch.Tensor,
    recipe: LoraRecipe,
    phase: Phase | None,
    device: torch.device,
    *,
    mode: str = "hooks",
) -> LocalResult:
    """``recipe.steps_per_round`` adapter steps on ``model`` in place; mean loss and steps.

    With a ``phase``, each step is DP-SGD at ``phase.noise_multiplier`` and
    ``phase.sample_rate`` (which must be the recipe's: what is accounted is
    what runs); without one, the same sampling and steps without noise or
    clipping (not private). ``mode`` is Opacus's ``grad_sample_mode``.

    Raises
    ------
    ValueError
        If the cache does not fit the model or the labels, or the phase's
        sampling rate is not the recipe's.
    """
    check_inputs(model, hidden, labels)
    if phase is not None and abs(phase.sample_rate - recipe.sample_rate) > 1e-12:
        raise ValueError(
            f"the privacy plan samples at {phase.sample_rate}, the recipe at {recipe.sample_rate}"
        )
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    stack = TopStack(model, hidden.cut).to(device).eval()
    params = trained_parameters(model)
    sampler = UniformWithReplacementSampler(
        num_samples=len(hidden),
        sample_rate=recipe.sample_rate,
        generator=fresh_generator(torch.device("cpu")),
        steps=recipe.steps_per_round,
    )
    total, count, steps = 0.0, 0, 0
    with only_trained(model, params):
        optimizer = _optimizer(params, recipe, phase, recipe.expected_batch)
        with PrivateSteps(
            stack,
            params,
            optimizer,
            noise_multiplier=phase.noise_multiplier if phase else None,
            clip=recipe.clip,
            expected_batch=recipe.expected_batch,
            mode=mode,
            device=device,
        ) as runner:
            for indices in sampler:
                chunks = [
                    functools.partial(_losses, stack, hidden, labels, chunk, device)
                    for chunk in hidden.chunks(torch.tensor(indices, dtype=torch.long), recipe.max_tokens)
                ]
                batch_loss, batch_count = runner.step(chunks)
                total, count, steps = total + batch_loss, count + batch_count, steps + 1
    return LocalResult(mean_loss=total / count if count else float("nan"), steps=steps)


class _KeepGradients(torch.optim.Optimizer):
    """An optimiser that does not step: it keeps the gradients it is handed (Opacus's
    ``DPOptimizer`` hands it the clipped sum, with no noise and a divisor of one)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})
        self.kept: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.kept = [
            torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for group in self.param_groups
            for p in group["params"]
        ]


def clipped_gradient_sum(
    model: nn.Module,
    hidden: HiddenStates,
    labels: torch.Tensor,
    keys: list[str],
    clip: float,
    rate: float,
    device: torch.device,
    *,
    max_tokens: int = MAX_TOKENS,
    mode: str = "hooks",
) -> np.ndarray:
    """The sum over a fresh Poisson sample (rate ``rate``) of the records' gradients on the
    weights ``keys``, each record's clipped to L2 norm ``clip`` over all of them together,
    flattened one weight after the other in the order of ``keys``.

    This is a site's vector in an adapter round under distributed noise
    (:mod:`fedseal.client.ddp_round`): the noise is added to the federation's sum,
    not here. The per-example gradients and their clipping are Opacus's, as in
    :func:`lora_round` (:class:`fedseal.client.dp_step.PrivateSteps` with no noise
    and a divisor of one); the sample is drawn by torch's generator seeded from the
    OS's CSPRNG (:func:`fedseal.client.randomness.fresh_generator`).

    Raises
    ------
    fedseal.common.model.ModelError
        If a key is not one of the model's parameters.
    ValueError
        If the cache does not fit the model or the labels.
    """
    check_inputs(model, hidden, labels)
    named = dict(fedseal_of(model).named_parameters())
    missing = [k for k in keys if k not in named]
    if missing:
        raise ModelError(f"the model has no weights {missing[:3]}: server and site models differ")
    params = [named[k] for k in keys]
    gen = fresh_generator(torch.device("cpu"))
    sample = (torch.rand(len(hidden), generator=gen) < rate).nonzero().reshape(-1)
    stack = TopStack(model, hidden.cut).to(device).eval()
    keeper = _KeepGradients(params)
    with only_trained(model, params):
        with PrivateSteps(
            stack,
            params,
            keeper,
            noise_multiplier=0.0,
            clip=clip,
            expected_batch=1.0,
            mode=mode,
            device=device,
        ) as runner:
            chunks = [
                functools.partial(_losses, stack, hidden, labels, chunk, device)
                for chunk in hidden.chunks(sample, max_tokens)
            ]
            runner.step(chunks)
    return torch.cat([g.reshape(-1).double().cpu() for g in keeper.kept]).numpy()


__all__ = ["check_inputs", "clipped_gradient_sum", "lora_round", "only_trained", "trained_parameters"]
