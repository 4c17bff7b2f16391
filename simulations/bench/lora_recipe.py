"""LP-FT against the DP probe alone, on cached states: one site or several, DP and noise-free.

Usage (one thread; each arm a few minutes)::

    python -m simulations.bench.lora_recipe --data ../shared/data/sst2 --task sst2 \\
        --sites 1 --site-examples 6735 --epsilons 8,1 --json OUT.json

A federation of ``--sites`` equal sites (IID, or ``--partition dirichlet``) runs
in-process, each site on its own cached states (:mod:`fedseal.common.hidden_cache`),
the server's step a plain mean of the sites' results (only the transport,
secure aggregation and the scale-free vote of the real rounds are missing).
Every site adds its own noise (today's mode). Arms, per epsilon:

* ``probe``: the DP probe with the whole budget: the statistics round, then
  ``--probe-rounds`` rounds of DP head training (:mod:`fedseal.client.probe`,
  settings from :mod:`fedseal.common.dp_rule`);
* ``lpft``: the same probe phases, then ``--lora-rounds`` rounds of DP-SGD on the
  top-layer adapters and the head's weights (:func:`fedseal.client.lora_round.lora_round`)
  starting from the federation's head, the budget split by
  :func:`fedseal.common.lora_rule.calibrate` (``--ratio``);

and once per run ``probe_noise_free`` and ``lpft_noise_free``: the same
sampling, clipping and steps with noise multiplier 0 (the ceiling of this
recipe). Accuracy is on the task's dev set after every round. ``grad_norms``
gives the per-example gradient norms (adapters, head) at the start of the
adapter phase of the noise-free arm: the clip is chosen against them.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedseal.client.lora_round import lora_round, only_trained, trained_parameters
from fedseal.client.probe import release_statistics, train_head
from fedseal.common.batches import scores_of
from fedseal.common.buckets import size_bucket
from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import Recipe, prior_bias
from fedseal.common.dp_rule import recipe as probe_rule
from fedseal.common.hidden_cache import HiddenStates, hidden_states
from fedseal.common.lora_rule import LAYERS, LoraRecipe, Phase, calibrate, epsilon_of, lora_recipe
from fedseal.common.model import load_trainable, trainable_state
from fedseal.common.partition import dirichlet_partition, iid_partition
from fedseal.common.privacy import DPPlan, sample_rate_for
from fedseal.common.top_layers import TopStack, fedseal_of
from simulations.bench.lora_setup import (
    common_arguments,
    depth,
    encoded,
    load_task,
    lpft_model,
    run_and_report,
)
from simulations.bench.report import emit_report

log = logging.getLogger("fedseal.bench.lora_recipe")

CPU = torch.device("cpu")
FEATURE_BATCH = 512


@dataclass
class Site:
    """One site's cached states, labels and probe features (adapters at the identity)."""

    hidden: HiddenStates
    labels: torch.Tensor
    features: torch.Tensor


@torch.no_grad()
def stack_outputs(stack: TopStack, hidden: HiddenStates, logits: bool) -> torch.Tensor:
    """The stack's logits (or pooled features) of every cached example, in order."""
    out = []
    for start in range(0, len(hidden), FEATURE_BATCH):
        batch = hidden.batch(torch.arange(start, min(start + FEATURE_BATCH, len(hidden))), CPU)
        out.append(stack(*batch) if logits else stack.features(*batch))
    return torch.cat(out)


def scores(model: nn.Module, site: Site) -> dict[str, float]:
    """Accuracy, loss and macro-F1 on a cached set of examples."""
    logits = stack_outputs(TopStack(model, site.hidden.cut).eval(), site.hidden, logits=True)
    return {
        k: round(v, 4)
        for k, v in scores_of(logits, site.labels, fedseal_of(model).classifier.out_features).items()
    }


def round_scores(model: nn.Module, dev: Site, train: Site) -> dict[str, float]:
    """Dev accuracy and macro-F1 after a round, and the training loss of the first site."""
    dev_scores = scores(model, dev)
    return {
        "accuracy": dev_scores["accuracy"],
        "macro_f1": dev_scores["macro_f1"],
        "train_loss": scores(model, train)["loss"],
    }


def make_site(model: nn.Module, data: TensorDataset, cut: int, cache_dir: Path | None) -> Site:
    """Cache a site's states (in ``cache_dir`` too, if given) and its probe features."""
    hidden = hidden_states(model, data, cut, CPU, cache_dir)
    feats = stack_outputs(TopStack(model, cut).eval(), hidden, logits=False)
    return Site(hidden, data.tensors[2], feats)


def probe_plans(sites: list[Site], rounds: int, phase: Phase) -> list[tuple[Recipe, DPPlan]]:
    """Each site's probe rule (``dp_rule``) and its plan at the phase's noise (0: noise-free)."""
    plans = []
    for site in sites:
        rule = probe_rule(FedConfig(rounds=rounds), size_bucket(len(site.labels)))
        q = sample_rate_for(size_bucket(len(site.labels)), rule.batch_size)
        plans.append((rule, DPPlan(phase.noise_multiplier, q, rule.steps_through(rounds), 0.0, 0.0, "rdp")))
    return plans


def run_probe(
    model: nn.Module, sites: list[Site], dev: Site, rounds: int, phase: Phase
) -> list[dict[str, float]]:
    """The statistics round and ``rounds - 1`` head rounds; dev scores after each training round."""
    fedseal = fedseal_of(model)
    num_labels = fedseal.classifier.out_features
    plans = probe_plans(sites, rounds, phase)
    stats = [release_statistics(s.features, s.labels, num_labels, plan) for s, (_, plan) in zip(sites, plans)]
    counts = np.array([max(st.examples, 1.0) for st in stats])
    weights = counts / counts.sum()
    with torch.no_grad():
        fedseal.feature_mean.copy_(
            torch.from_numpy(sum(w * st.mean for w, st in zip(weights, stats)).astype(np.float32))
        )
        fedseal.classifier.bias.copy_(
            torch.from_numpy(prior_bias(sum(w * st.proportions for w, st in zip(weights, stats))))
        )
        fedseal.classifier.weight.zero_()
    curve = []
    for _ in range(rounds - 1):
        start = fedseal.classifier.weight.detach().clone()
        heads = []
        for site, (rule, plan) in zip(sites, plans):
            with torch.no_grad():
                fedseal.classifier.weight.copy_(start)
            train_head(fedseal, site.features, site.labels, rule, plan)
            heads.append(fedseal.classifier.weight.detach().clone())
        with torch.no_grad():
            fedseal.classifier.weight.copy_(torch.stack(heads).mean(dim=0))
        curve.append(round_scores(model, dev, sites[0]))
    return curve


def run_lora(
    model: nn.Module, sites: list[Site], dev: Site, recipes: list[LoraRecipe], rounds: int, sigma: float
) -> list[dict[str, float]]:
    """``rounds`` adapter rounds from the model's head; each round, the mean of the sites'."""
    curve = []
    for _ in range(rounds):
        start = trainable_state(model)
        results = []
        for site, rule in zip(sites, recipes):
            load_trainable(model, start)
            phase = Phase(sigma, rule.sample_rate, rule.steps_per_round * rounds)
            lora_round(model, site.hidden, site.labels, rule, phase, CPU)
            results.append(trainable_state(model))
        load_trainable(model, {k: torch.stack([r[k] for r in results]).mean(dim=0) for k in start})
        curve.append(round_scores(model, dev, sites[0]))
    return curve


def grad_norms(model: nn.Module, site: Site, sample: int) -> dict[str, float]:
    """Median and 90th percentile of per-example gradient norms, adapters and head apart."""
    stack = TopStack(model, site.hidden.cut).eval()
    params = trained_parameters(model)
    head = fedseal_of(model).classifier.weight
    norms: dict[str, list[float]] = {"adapters": [], "head": []}
    with only_trained(model, params):
        for i in range(min(sample, len(site.labels))):
            logits = stack(*site.hidden.batch(torch.tensor([i]), CPU))
            loss = nn.functional.cross_entropy(logits, site.labels[i : i + 1])
            grads = torch.autograd.grad(loss, params)
            norms["head"].append(float(grads[-1].norm()))
            norms["adapters"].append(
                float(torch.cat([g.flatten() for g, p in zip(grads, params) if p is not head]).norm())
            )
    return {
        f"{part}_{name}": round(float(np.percentile(v, pct)), 4)
        for part, v in norms.items()
        for name, pct in (("median", 50), ("p90", 90))
    }


def arm(
    model: nn.Module,
    initial: dict,
    sites: list[Site],
    dev: Site,
    args: argparse.Namespace,
    epsilon: float | None,
    with_lora: bool,
) -> dict[str, Any]:
    """One arm from the initial weights: its noise, its per-round scores, its epsilon."""
    load_trainable(model, initial)
    n = min(len(s.labels) for s in sites)
    rule = probe_rule(FedConfig(rounds=args.probe_rounds), size_bucket(n))
    probe_rate = sample_rate_for(size_bucket(n), rule.batch_size)
    probe_steps = rule.steps_through(args.probe_rounds)
    recipes = [lora_recipe(size_bucket(len(s.labels)), args.lora_rounds, **args.overrides) for s in sites]
    lora_rate = min(r.sample_rate for r in recipes)
    lora_steps = recipes[0].steps_per_round * args.lora_rounds if with_lora else 0
    started = time.process_time()
    if epsilon is None:
        probe, lora = Phase(0.0, probe_rate, probe_steps), Phase(0.0, lora_rate, lora_steps)
        spent = None
    else:
        probe, lora = calibrate(
            probe_rate, probe_steps, lora_rate, lora_steps, epsilon, args.delta, args.accountant, args.ratio
        )
        spent = round(epsilon_of([probe, lora], args.delta, args.accountant), 4)
    result: dict[str, Any] = {
        "probe_noise_multiplier": round(probe.noise_multiplier, 4),
        "probe_sample_rate": round(probe_rate, 5),
        "probe_steps": probe_steps,
    }
    curve = run_probe(model, sites, dev, args.probe_rounds, probe)
    if with_lora:
        if epsilon is None:
            result["grad_norms"] = grad_norms(model, sites[0], args.grad_sample)
        curve += run_lora(model, sites, dev, recipes, args.lora_rounds, lora.noise_multiplier)
        result.update(
            lora_noise_multiplier=round(lora.noise_multiplier, 4),
            lora_sample_rate=round(lora_rate, 5),
            lora_steps=lora_steps,
        )
    result.update(
        accuracy=curve[-1]["accuracy"],
        macro_f1=curve[-1]["macro_f1"],
        accuracy_per_round=[c["accuracy"] for c in curve],
        train_loss_per_round=[c["train_loss"] for c in curve],
        epsilon=spent,
        cpu_seconds=round(time.process_time() - started, 1),
    )
    log.info(
        "%s eps %s: accuracy %s, training loss %s",
        "lpft" if with_lora else "probe",
        epsilon,
        result["accuracy_per_round"],
        result["train_loss_per_round"],
    )
    return result


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one arm: the first run's settings, mean and every run's accuracy."""
    if len(runs) == 1:
        return runs[0]
    accs = [r["accuracy"] for r in runs]
    return {
        **runs[0],
        "accuracy": round(float(np.mean(accs)), 4),
        "runs": accs,
        "accuracy_per_round": [
            round(float(np.mean(a)), 4) for a in zip(*(r["accuracy_per_round"] for r in runs))
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every arm; the report."""
    torch.manual_seed(args.seed)
    train, dev_examples = load_task(args.task, args.data, args.sites * args.site_examples, args.seed)
    model = lpft_model(args.model, train.label_names, args.layers)
    cut = depth(model) - args.layers
    data, dev_data = encoded(args.model, train), encoded(args.model, dev_examples)
    parts = (
        iid_partition(len(train), args.sites, args.seed)
        if args.partition == "iid"
        else dirichlet_partition(list(train.labels), args.sites, args.alpha, args.seed)
    )
    started = time.process_time()
    sites = [
        make_site(model, TensorDataset(*(t[part] for t in data.tensors)), cut, args.cache_dir)
        for part in parts
    ]
    dev = make_site(model, dev_data, cut, args.cache_dir)
    cache_seconds = time.process_time() - started
    initial = copy.deepcopy(trainable_state(model))
    arms: dict[str, Any] = {}
    for name, with_lora in (("probe_noise_free", False), ("lpft_noise_free", True)):
        arms[name] = arm(model, initial, sites, dev, args, None, with_lora)
    for epsilon in args.epsilons:
        for name, with_lora in (("probe", False), ("lpft", True)):
            arms[f"{name}_eps{epsilon:g}"] = pooled(
                [arm(model, initial, sites, dev, args, epsilon, with_lora) for _ in range(args.repeats)]
            )
        gain = arms[f"lpft_eps{epsilon:g}"]["accuracy"] - arms[f"probe_eps{epsilon:g}"]["accuracy"]
        arms[f"gain_eps{epsilon:g}"] = round(gain, 4)
        emit_report({"arms": arms}, args.json.with_name(args.json.name + ".partial"), quiet=True)
    return {
        "arms": arms,
        "settings": {
            "task": args.task,
            "model": args.model,
            "sites": args.sites,
            "site_examples": [len(s.labels) for s in sites],
            "dev_examples": len(dev.labels),
            "partition": args.partition,
            "alpha": args.alpha,
            "layers": args.layers,
            "probe_rounds": args.probe_rounds,
            "lora_rounds": args.lora_rounds,
            "lora_recipe": vars(
                lora_recipe(size_bucket(len(sites[0].labels)), args.lora_rounds, **args.overrides)
            ),
            "ratio": args.ratio,
            "delta": args.delta,
            "accountant": args.accountant,
            "repeats": args.repeats,
            "seed": args.seed,
            "cache_cpu_seconds": round(cache_seconds, 1),
            "server_step": "plain mean of the sites' results (equal weights)",
        },
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the arms, write and print the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.lora_recipe", description=__doc__.split("\n\n")[0]
    )
    common_arguments(parser)
    parser.add_argument("--sites", type=int, default=1)
    parser.add_argument("--site-examples", type=int, default=6735)
    parser.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument(
        "--epsilons", type=lambda v: [float(e) for e in v.split(",") if e], default=[8.0, 1.0]
    )
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument(
        "--probe-rounds", type=int, default=3, help="the statistics round and the head rounds"
    )
    parser.add_argument("--lora-rounds", type=int, default=2)
    parser.add_argument(
        "--ratio", type=float, default=1.0, help="the adapter phase's noise multiplier over the probe's"
    )
    for field in ("steps_per_round", "sample_rate", "clip", "lr", "momentum", "floor"):
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=float, dest=field, help=f"override the rule's {field}"
        )
    parser.add_argument(
        "--optimizer", choices=("sgd", "adam_bc"), help="override the rule's optimiser (adam_bc: DP-AdamBC)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per DP arm")
    parser.add_argument("--grad-sample", type=int, default=128)
    parser.add_argument("--cache-dir", type=Path, help="keep the cached states here between runs")
    args = parser.parse_args(argv)
    args.overrides = {
        f: (int(v) if f == "steps_per_round" else v)
        for f in ("steps_per_round", "sample_rate", "clip", "lr", "momentum", "floor", "optimizer")
        if (v := getattr(args, f)) is not None
    }
    return run_and_report(args, run)


if __name__ == "__main__":
    sys.exit(main())
