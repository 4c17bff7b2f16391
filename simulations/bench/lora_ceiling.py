"""How far LoRA in the top layers gets on a task without privacy: the ceiling that LP-FT's
DP rule is held against.

Usage (one thread by default; at full SST-2 about 5 CPU-minutes of caching, then about
4 CPU-minutes an epoch)::

    python -m simulations.bench.lora_ceiling --data ../shared/data/sst2 --json OUT.json

One holder of ``--examples`` training sentences (all of SST-2's by default), no DP, no
federation, the states below the adapters cached (:mod:`fedseal.common.hidden_cache`).
First the noise-free probe (the probe rule's statistics round and head rounds at noise
multiplier 0, as :mod:`simulations.bench.lora_recipe` runs them); then, each from that
head, ``--epochs`` of ordinary fine-tuning with AdamW (minibatches of ``--batch-size``,
learning rate ``--lr``, no clipping, no weight decay, dropout off as in the DP steps):

* ``head``: the head's weights alone, on the frozen features (what more head training buys);
* ``lora``: LoRA in the top ``--layers`` layers (the rule's rank, alpha and targets) and the
  head's weights (what the adapters buy).

The difference between the two is what moving the encoder can add on this task at this
size, with no privacy and far more steps than the DP rule takes (24 to 50). Dev accuracy
every ``--eval-every`` steps and after each epoch.
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedseal.client.lora_round import only_trained, trained_parameters
from fedseal.common.batches import scores_of
from fedseal.common.lora_rule import LAYERS, Phase
from fedseal.common.model import load_trainable, trainable_state
from fedseal.common.top_layers import TopStack, fedseal_of
from simulations.bench.lora_recipe import CPU, Site, make_site, run_probe, scores
from simulations.bench.lora_setup import (
    common_arguments,
    depth,
    encoded,
    load_task,
    lpft_model,
    run_and_report,
)

log = logging.getLogger("fedseal.bench.lora_ceiling")

FULL_SST2 = 67349


def fine_tune(
    params: list[nn.Parameter],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    evaluate: Callable[[], float],
    args: argparse.Namespace,
) -> list[dict[str, float]]:
    """``args.epochs`` of AdamW minibatch steps on ``params``; dev accuracy along the way."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    curve, step = [], 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            loss = nn.functional.cross_entropy(logits_of(index), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.eval_every == 0 or start + args.batch_size >= len(order):
                curve.append({"epoch": epoch + 1, "step": step, "accuracy": evaluate()})
                log.info("epoch %d step %d: dev accuracy %.4f", epoch + 1, step, curve[-1]["accuracy"])
    return curve


def head_arm(model: nn.Module, train: Site, dev: Site, args: argparse.Namespace) -> list[dict[str, float]]:
    """AdamW on the head's weights alone, on the frozen (cached) features."""
    stack = TopStack(model, train.hidden.cut).eval()
    head = fedseal_of(model).classifier
    scale, shift = stack.scale, stack.shift

    def logits_of(index: torch.Tensor) -> torch.Tensor:
        return head(train.features[index] * scale + shift)

    def evaluate() -> float:
        with torch.no_grad():
            logits = head(dev.features * scale + shift)
        return round(scores_of(logits, dev.labels, head.out_features)["accuracy"], 4)

    with only_trained(model, [head.weight]):
        return fine_tune([head.weight], logits_of, train.labels, evaluate, args)


def lora_arm(model: nn.Module, train: Site, dev: Site, args: argparse.Namespace) -> list[dict[str, float]]:
    """AdamW on the top layers' adapters and the head's weights, through the cached states."""
    stack = TopStack(model, train.hidden.cut).eval()
    params = trained_parameters(model)

    def logits_of(index: torch.Tensor) -> torch.Tensor:
        return stack(*train.hidden.batch(index, CPU))

    def evaluate() -> float:
        return scores(model, dev)["accuracy"]

    with only_trained(model, params):
        return fine_tune(params, logits_of, train.labels, evaluate, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The noise-free probe, then each arm from its head; the report."""
    torch.manual_seed(args.seed)
    train_examples, dev_examples = load_task(args.task, args.data, args.examples, args.seed)
    model = lpft_model(args.model, train_examples.label_names, args.layers)
    cut = depth(model) - args.layers
    started = time.process_time()
    train = make_site(model, encoded(args.model, train_examples), cut, args.cache_dir)
    dev = make_site(model, encoded(args.model, dev_examples), cut, args.cache_dir)
    cache_seconds = time.process_time() - started
    probe_curve = run_probe(model, [train], dev, args.probe_rounds, Phase(0.0, 1.0, 0))
    after_probe = copy.deepcopy(trainable_state(model))
    arms: dict[str, Any] = {"probe_noise_free": {"accuracy_per_round": [c["accuracy"] for c in probe_curve]}}
    for name, arm in (("head", head_arm), ("lora", lora_arm)):
        load_trainable(model, after_probe)
        started = time.process_time()
        curve = arm(model, train, dev, args)
        arms[name] = {
            "accuracy": curve[-1]["accuracy"],
            "best_accuracy": max(c["accuracy"] for c in curve),
            "curve": curve,
            "cpu_seconds": round(time.process_time() - started, 1),
        }
    return {
        "arms": arms,
        "gain_lora_over_head": round(arms["lora"]["accuracy"] - arms["head"]["accuracy"], 4),
        "settings": {
            "task": args.task,
            "model": args.model,
            "train_examples": len(train.labels),
            "dev_examples": len(dev.labels),
            "layers": args.layers,
            "probe_rounds": args.probe_rounds,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "optimizer": "AdamW, no weight decay, no clipping, no noise",
            "seed": args.seed,
            "cache_cpu_seconds": round(cache_seconds, 1),
        },
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run both arms, write and print the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.lora_ceiling", description=__doc__.split("\n\n")[0]
    )
    common_arguments(parser)
    parser.add_argument("--examples", type=int, default=FULL_SST2, help="training sentences (default all)")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument(
        "--probe-rounds", type=int, default=3, help="the statistics round and the head rounds"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between dev evaluations")
    parser.add_argument("--cache-dir", type=Path, help="keep the cached states here")
    return run_and_report(parser.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
