"""Why DP-SGD does or does not learn a task: three measurements at one site.

Usage::

    python -m simulations.bench.diagnose_dp --data ../shared/data/sst2 --json OUT

1. ``grad_norms``: median per-sample gradient norm of the head and of the
   adapters at the starting point, before clipping. Clipping bounds the norm of
   their concatenation and the noise is isotropic, so a part with a small share
   of the norm gets a small share of the signal and its full share of the noise.
2. ``linear_probe``: dev accuracy of a non-private logistic regression on frozen
   features: what the classifier sees (``head_input``), the first token's state
   (``cls``) and the mean of the token states (``mean``). This is the most that
   training the head alone can reach.
3. ``noise_sweep``: one site's dev accuracy after all the DP-SGD steps it took
   in the earlier LoRA utility benchmark's DP arm (25: 5 rounds x 5), in one go, at
   noise multiplier 0 (clipping only), at small multipliers, and at the one its
   epsilon needs. Where accuracy falls between 0 and a multiplier far below
   the planned one, noise, not clipping, is what stops learning.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedseal.common.batches import encode, evaluate, model_inputs
from fedseal.common.buckets import size_bucket
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples
from fedseal.common.dp_rule import recipe
from fedseal.common.model import build_model, load_tokenizer, pick_device
from fedseal.common.privacy import DPPlan, plan_site
from simulations.bench.report import emit_report, setup_bench_logging
from simulations.bench.utility import read_split

HEAD_NAMES = ("classifier", "score")


def grad_norms(model: nn.Module, data, samples: int, device: torch.device) -> dict[str, float]:
    """Median per-sample gradient norm of the head, the other trainable parameters, and all."""
    model.train()
    parts: dict[str, list[float]] = {"head": [], "adapters": [], "total": []}
    for i in range(min(samples, len(data))):
        ids, mask, label = (t[i : i + 1] for t in data.tensors)
        model.zero_grad(set_to_none=True)
        model(**model_inputs(model, ids, mask, device), labels=label.to(device)).loss.backward()
        sq = {"head": 0.0, "adapters": 0.0}
        for name, p in model.named_parameters():
            if p.grad is not None:
                part = "head" if any(f".{h}." in f".{name}." for h in HEAD_NAMES) else "adapters"
                sq[part] += float(p.grad.pow(2).sum())
        for part, value in sq.items():
            parts[part].append(value**0.5)
        parts["total"].append((sq["head"] + sq["adapters"]) ** 0.5)
    model.zero_grad(set_to_none=True)
    return {part: round(statistics.median(values), 5) for part, values in parts.items()}


@torch.no_grad()
def features(model: nn.Module, data, device: torch.device, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Frozen features per example: the head's input, the first token's state, the token mean."""
    model.eval()
    head = next((m for n, m in model.named_modules() if n.split(".")[-1] in HEAD_NAMES), None)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) if head else None
    out: dict[str, list[torch.Tensor]] = {"head_input": [], "cls": [], "mean": []}
    try:
        for start in range(0, len(data), batch_size):
            ids, mask, _ = (t[start : start + batch_size] for t in data.tensors)
            inputs = model_inputs(model, ids, mask, device)
            states = model(**inputs, output_hidden_states=True).hidden_states[-1]
            keep = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
            out["cls"].append(states[:, 0].cpu())
            out["mean"].append(((states * keep).sum(1) / keep.sum(1)).cpu())
            if seen:
                x = seen.pop()
                out["head_input"].append((x[:, 0] if x.dim() == 3 else x).cpu())
    finally:
        if hook is not None:
            hook.remove()
    return {k: torch.cat(v) for k, v in out.items() if v}


def probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor, num_labels: int
) -> float:
    """Dev accuracy of an L2-regularised logistic regression (standardised features, L-BFGS)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mu) / sd
    torch.manual_seed(0)
    linear = nn.Linear(x.shape[1], num_labels)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), train_y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear((dev_x - mu) / sd).argmax(1) == dev_y).float().mean())


def noise_sweep(
    cfg: FedConfig, train, dev, sigmas: Sequence[float], plan: DPPlan, num_labels: int, device: torch.device
) -> list[dict[str, float]]:
    """Dev accuracy of one site after the plan's steps at each of ``sigmas`` and the plan's own."""
    from fedseal.client.trainer import train_local

    rows = []
    for sigma in [*sigmas, plan.noise_multiplier]:
        model = build_model(cfg, cfg.labels)
        started = time.monotonic()
        train_local(
            model,
            train,
            cfg,
            recipe(cfg.replace(local_steps=plan.planned_steps), size_bucket(len(train))),
            dataclasses.replace(plan, noise_multiplier=sigma),
            device,
        )
        scores = evaluate(model, dev, batch_size=cfg.eval_batch_size, num_labels=num_labels, device=device)
        rows.append(
            {
                "noise_multiplier": round(sigma, 4),
                "accuracy": round(scores["accuracy"], 4),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the three measurements, write and print the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.diagnose_dp", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, required=True, help="SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--site-examples",
        type=int,
        default=1600,
        help="one site's share (the utility benchmark: 16,000 over 10 sites)",
    )
    parser.add_argument("--probe-examples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=25, help="the DP arm's steps per site")
    parser.add_argument(
        "--sigmas",
        type=lambda v: [float(s) for s in v.split(",")],
        default=[0.0, 0.01, 0.1],
        help="noise multipliers besides the planned one",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    setup_bench_logging(args.log_level)
    started = time.monotonic()
    torch.manual_seed(args.seed)
    train_all, dev_ex = read_split(args.data, "train"), read_split(args.data, "dev")
    order = np.random.default_rng(args.seed).permutation(len(train_all))
    cfg = FedConfig(
        model=args.model,
        finetune="lora",
        labels=train_all.label_names,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        max_grad_norm=args.max_grad_norm,
        accountant="rdp",
        seed=args.seed,
    )
    tokenizer = load_tokenizer(cfg)

    def encoded(examples: Examples, count: int):
        return encode(tokenizer, examples.subset(sorted(int(i) for i in order[:count])), cfg.max_length)

    site = encoded(train_all, args.site_examples)
    dev = encode(tokenizer, dev_ex, cfg.max_length)
    num_labels = len(cfg.labels)
    device = pick_device(cfg.device)
    model = build_model(cfg, cfg.labels).to(device)
    report: dict[str, Any] = {"grad_norms": grad_norms(model, site, samples=64, device=device)}
    probe_train = encoded(train_all, args.probe_examples)
    train_f, dev_f = features(model, probe_train, device), features(model, dev, device)
    report["linear_probe"] = {
        name: round(
            probe_accuracy(train_f[name], probe_train.tensors[2], dev_f[name], dev.tensors[2], num_labels), 4
        )
        for name in train_f
    }
    report["feature_std"] = {name: round(float(f.std(0).mean()), 4) for name, f in train_f.items()}
    planned = plan_site(
        size_bucket(len(site)),
        batch_size=cfg.batch_size,
        steps=args.steps,
        epsilon=cfg.epsilon,
        delta=cfg.delta,
        accountant=cfg.accountant,
    )
    report["noise_sweep"] = noise_sweep(cfg, site, dev, args.sigmas, planned, num_labels, device)
    report["settings"] = {
        **{k: v for k, v in vars(args).items() if k not in ("data", "json")},
        "epsilon": cfg.epsilon,
        "delta": cfg.delta,
        "accountant": cfg.accountant,
        "sample_rate": planned.sample_rate,
        "device": str(device),
        "planned_noise_multiplier": round(planned.noise_multiplier, 4),
    }
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
