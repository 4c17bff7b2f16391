"""The adapter phase of LP-FT (client/dp_step.py, client/lora_round.py, common/lora_rule.py):
Opacus's per-example clipping over chunks against a direct computation, noise-only steps on
empty Poisson batches, the accountant's total of mixed phases, the saved model."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from fedseal.client.dp_step import MODES, PrivateSteps
from fedseal.client.lora_round import (
    _losses,
    check_inputs,
    clipped_gradient_sum,
    lora_round,
    only_trained,
    trained_parameters,
)
from fedseal.common.config import FedConfig
from fedseal.common.hidden_cache import compute_hidden
from fedseal.common.lora_rule import LoraRecipe, Phase, calibrate, epsilon_of, lora_recipe
from fedseal.common.model import ModelError
from fedseal.common.top_layers import TopStack, fedseal_of

CPU = torch.device("cpu")


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trained_parameters(model)])


def _one_step(model, hidden, labels, index, *, mode, clip, max_tokens, lr=0.5):
    """One noise-free DP step (plain SGD) on ``index``; the parameters after it."""
    stack = TopStack(model, hidden.cut)
    params = trained_parameters(model)
    with only_trained(model, params):
        optimizer = torch.optim.SGD(params, lr=lr)
        with PrivateSteps(
            stack, params, optimizer, noise_multiplier=0.0, clip=clip, expected_batch=10.0, mode=mode
        ) as runner:
            runner.step(
                [
                    functools.partial(_losses, stack, hidden, labels, chunk, CPU)
                    for chunk in hidden.chunks(index, max_tokens)
                ]
            )
    return _params(model)


def _per_example_gradients(model, hidden, labels, params, examples) -> list[torch.Tensor]:
    """Each example's gradient on ``params`` by autograd alone, flattened in their order."""
    stack = TopStack(model, hidden.cut)
    with only_trained(model, params):
        return [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(
                        _losses(stack, hidden, labels, torch.tensor([i]), CPU).sum(), params
                    )
                ]
            )
            for i in examples
        ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_tokens", [1000, 6])
def test_a_step_clips_each_example_and_divides_by_the_expected_batch(tiny_lpft, mode, max_tokens):
    """Against a direct computation: each example's gradient by autograd alone, scaled to norm
    at most ``clip``, summed, divided by the expected batch (10), one SGD step. The same in
    every Opacus mode, whether the batch is one chunk or many."""
    model, data = tiny_lpft()
    hidden = compute_hidden(model, data, 1, CPU, torch.float32)
    labels, index, lr = data.tensors[2], torch.tensor([0, 1, 3, 5, 6]), 0.5
    grads = _per_example_gradients(model, hidden, labels, trained_parameters(model), index.tolist())
    clip = float(torch.stack([g.norm() for g in grads]).median())  # some clipped, some not
    clipped = sum(g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in grads)
    expected = _params(model) - lr * clipped / 10.0
    after = _one_step(model, hidden, labels, index, mode=mode, clip=clip, max_tokens=max_tokens, lr=lr)
    assert torch.allclose(after, expected, atol=1e-6), (after - expected).abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_a_distributed_adapter_vector_is_the_sum_of_clipped_per_record_gradients(tiny_lpft, mode):
    """Under distributed noise a site sends the sum of its records' clipped gradients, in the
    order of the names it is given (the server's, sorted), with no noise: against autograd per
    record (rate 1 samples every record), small chunks so the sum spans several; a rate of
    zero sends zeros, and a name the model lacks is refused."""
    model, data = tiny_lpft()
    hidden = compute_hidden(model, data, 1, CPU, torch.float32)
    labels = data.tensors[2]
    named = dict(model.named_parameters())
    keys = sorted(k for k in named if ".lora_" in k or k == "classifier.weight")
    params = [named[k] for k in keys]
    grads = _per_example_gradients(model, hidden, labels, params, range(len(labels)))
    clip = float(torch.stack([g.norm() for g in grads]).median())
    expected = sum(g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in grads)
    got = clipped_gradient_sum(model, hidden, labels, keys, clip, 1.0, CPU, max_tokens=6, mode=mode)
    assert got.shape == (sum(p.numel() for p in params),)
    assert torch.allclose(torch.from_numpy(got).float(), expected, atol=1e-5)
    assert not clipped_gradient_sum(model, hidden, labels, keys, clip, 0.0, CPU, mode=mode).any()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ModelError, match="no weights"):
        clipped_gradient_sum(model, hidden, labels, [*keys, "not.a.weight"], clip, 1.0, CPU)


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_lpft, mode):
    """At a sampling rate so small that every batch is empty, each step still adds noise of
    standard deviation sigma * clip / expected batch (times lr) to every trained coordinate,
    and nothing else moves."""
    model, data = tiny_lpft()
    hidden = compute_hidden(model, data, 1, CPU, torch.float32)
    rate = 1e-9
    recipe = LoraRecipe(sample_rate=rate, steps_per_round=1, clip=0.5, lr=1.0, momentum=0.0)
    fedseal = fedseal_of(model)
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" not in n and n != "classifier.weight"
    }
    before = _params(model)
    result = lora_round(model, hidden, data.tensors[2], recipe, Phase(1.0, rate, 1), CPU, mode=mode)
    assert result.steps == 1 and math.isnan(result.mean_loss)
    moved = _params(model) - before
    expected_std = 1.0 * 0.5 / recipe.expected_batch
    assert moved.std().item() == pytest.approx(expected_std, rel=0.15)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert fedseal.classifier.bias.requires_grad  # the flags are restored after the round


def test_the_trainers_empty_poisson_batch_is_a_noise_only_step(tiny_bert, monkeypatch):
    """client/trainer.py (full fine-tuning): Opacus 1.6 raised 'Per sample gradient is not
    initialized' on an empty batch. Three examples at one a batch (rate 1/3): about 30% of
    the 40 batches are empty (none empty: 0.7^40, under 1e-6)."""
    from fedseal.client import trainer
    from fedseal.common.batches import encode
    from fedseal.common.data import Examples
    from fedseal.common.dp_rule import recipe
    from fedseal.common.model import build_model, load_tokenizer
    from fedseal.common.privacy import DPPlan

    empty = []
    original = trainer.noise_only_step
    monkeypatch.setattr(trainer, "noise_only_step", lambda opt: (empty.append(1), original(opt)))
    cfg = FedConfig(
        model=tiny_bert, labels=("0", "1"), finetune="full", rounds=2, local_steps=40, batch_size=1
    )
    data = encode(load_tokenizer(cfg), Examples(["good", "bad", "fine"], [1, 0, 1], ("0", "1"), "t"), 8)
    model = build_model(cfg, cfg.labels)
    plan = DPPlan(1.0, 1 / 3, 40, 8.0, 1e-5, "rdp")
    result = trainer.train_local(model, data, cfg, recipe(cfg, 2), plan, CPU)
    assert result.steps == 40 and empty


def test_lora_round_refuses_a_cache_or_plan_that_does_not_fit(tiny_lpft):
    model, data = tiny_lpft()
    labels = data.tensors[2]
    with pytest.raises(ValueError, match="compute the cache at cut=1"):
        check_inputs(model, compute_hidden(model, data, 2, CPU), labels)
    hidden = compute_hidden(model, data, 1, CPU)
    with pytest.raises(ValueError, match="6 labels for 7"):
        check_inputs(model, hidden, labels[:6])
    with pytest.raises(ValueError, match="samples at 0.5, the recipe at 0.25"):
        lora_round(model, hidden, labels, LoraRecipe(sample_rate=0.25), Phase(1.0, 0.5, 1), CPU)


def test_noise_free_rounds_lower_the_training_loss(tiny_lpft):
    model, data = tiny_lpft()
    hidden = compute_hidden(model, data, 1, CPU)
    labels = data.tensors[2]
    recipe = LoraRecipe(sample_rate=0.9, expected_batch=0.9 * 7, steps_per_round=15, clip=1.0, lr=0.5)
    stack = TopStack(model, 1)

    def loss() -> float:
        with torch.no_grad():
            return float(_losses(stack, hidden, labels, torch.arange(len(labels)), CPU).mean())

    before = loss()
    lora_round(model, hidden, labels, recipe, Phase(0.0, 0.9, 15), CPU)
    assert loss() < 0.8 * before


def test_the_accountant_composes_phases_as_the_rdp_sum():
    """The total of mixed phases against a direct computation: RDP adds over phases at each
    order, then converts to (epsilon, delta) once."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    phases = [Phase(2.9, 0.25, 301), Phase(1.6, 0.15, 24)]
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        compute_rdp(q=p.sample_rate, noise_multiplier=p.noise_multiplier, steps=p.steps, orders=orders)
        for p in phases
    )
    direct, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert epsilon_of(phases, 1e-5, "rdp") == pytest.approx(direct, rel=1e-9)
    assert epsilon_of(phases, 1e-5, "rdp") > epsilon_of(phases[:1], 1e-5, "rdp")
    assert epsilon_of([Phase(1.0, 0.1, 0)], 1e-5) == 0.0


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_the_split_spends_the_budget_with_the_asked_noise_ratio(ratio):
    probe, adapters = calibrate(0.25, 301, 0.15, 24, 8.0, 1e-5, "rdp", ratio)
    assert adapters.noise_multiplier == pytest.approx(ratio * probe.noise_multiplier)
    assert (probe.steps, adapters.steps) == (301, 24)
    assert 7.9 <= epsilon_of([probe, adapters], 1e-5, "rdp") <= 8.0
    alone, _ = calibrate(0.25, 301, 0.15, 0, 8.0, 1e-5, "rdp")
    assert alone.noise_multiplier < probe.noise_multiplier  # the adapters' steps cost noise


def test_the_rule_samples_a_large_batch_but_at_most_a_quarter_of_a_site():
    assert lora_recipe(16_384, 2).expected_batch == pytest.approx(1024)
    assert lora_recipe(16_384, 2).sample_rate == pytest.approx(1 / 16)
    assert lora_recipe(1_024, 2).sample_rate == 0.25
    assert lora_recipe(16_384, 5).steps_per_round * 5 >= lora_recipe(16_384, 1).steps_per_round
    assert lora_recipe(16_384, 2, lr=0.1).lr == 0.1


def test_the_saved_lpft_model_loads_and_predicts_as_in_memory(tiny_bert, tiny_lpft, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fedseal.common.model import load_tokenizer, save_merged

    model, data = tiny_lpft()
    cfg = FedConfig(model=tiny_bert, labels=("negative", "positive", "neutral"))
    out = save_merged(model, load_tokenizer(cfg), tmp_path / "model")
    loaded = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    inputs = {"input_ids": data.tensors[0], "attention_mask": data.tensors[1]}
    with torch.no_grad():
        mine, theirs = model(**inputs).logits, loaded(**inputs).logits
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_dp_adam_bc_is_adam_without_noise_and_takes_the_noise_out_of_the_second_moment():
    from fedseal.client.dp_adam_bc import DPAdamBC

    torch.manual_seed(0)
    grads = [torch.randn(50) for _ in range(5)]
    mine, theirs = nn.Parameter(torch.zeros(50)), nn.Parameter(torch.zeros(50))
    ours = DPAdamBC([mine], lr=0.01, noise_variance=0.0, floor=1e-16)
    adam = torch.optim.Adam([theirs], lr=0.01, eps=0.0)
    for g in grads:
        mine.grad, theirs.grad = g.clone(), g.clone()
        ours.step()
        adam.step()
    assert torch.allclose(mine, theirs, atol=1e-6)
    # one step on a gradient of pure noise of known variance: plain Adam moves every
    # coordinate by lr; with the variance taken out, the floor (the noise's variance, or
    # ``floor`` where that is larger) bounds the step instead
    for variance, floor, denominator in ((400.0, 1.0, 20.0), (1e-4, 100.0, 10.0)):  # beyond every g^2
        noisy = nn.Parameter(torch.zeros(50))
        corrected = DPAdamBC([noisy], lr=0.01, noise_variance=variance, floor=floor)
        noisy.grad = grads[0].clone()
        corrected.step()
        assert torch.allclose(noisy.detach(), -0.01 * grads[0] / denominator, atol=1e-6)
    with pytest.raises(ValueError, match="floor > 0"):
        DPAdamBC([noisy], lr=0.01, noise_variance=0.0, floor=0.0)
