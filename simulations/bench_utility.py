"""What privacy and federation cost in accuracy: one SST-2 budget trained three ways.

Usage::

    python -m simulations.bench_utility --data ../shared/data/sst2 --json OUT

In one process, on the same training subset and the same number of examples
processed (``rounds * sites * local_steps`` optimiser steps of ``batch_size``):

* ``central``: the pooled subset, plain AdamW, one model (non-private);
* ``fed``: 10 IID sites, FedAvg, secure aggregation, no DP (non-private);
* ``fed_dp``: the same federation with Opacus DP-SGD at every site,
  ``(epsilon, delta) = (8, 1e-5)`` per site over all rounds.

The federated arms run the real ClientApp and ServerApp over the in-process
grid (:mod:`simulations.local_grid`); only the transport is missing. Accuracy is
on the whole SST-2 dev set. ``dp_step_ratio`` is one DP-SGD step (Opacus
per-sample gradients, clipping, noise) over one plain step, same model and
same fixed batch, median of several repetitions.

The JSON holds ``central_acc``, ``fed_acc``, ``fed_dp_acc``, ``epsilon_max``,
``seconds_per_round`` (of the DP arm), ``dp_step_ratio``, the targets of issue 2
with whether each is met, every arm's per-round accuracy, and the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.batches import encode, evaluate, model_inputs
from common.config import FedConfig
from common.data import Examples, read_examples, write_examples
from common.model import build_model, load_tokenizer, pick_device
from common.privacy import plan_site
from simulations.report import emit_report, setup_bench_logging

log = logging.getLogger("fedseal.bench_utility")

TARGETS = {"fed_dp_acc_min": 0.83, "dp_gap_max": 0.04, "dp_step_ratio_max": 1.25}
STEP_REPS = 7


def read_split(data: Path, name: str) -> Examples:
    """``<data>/<name>.tsv`` in the GLUE layout; SystemExit naming the folder if it is absent."""
    path = data / f"{name}.tsv"
    if not path.exists():
        raise SystemExit(f"{path} not found: --data must be the SST-2 folder holding "
                         "train.tsv and dev.tsv (GLUE layout)")
    return read_examples(path, text_column="sentence", label_column="label")


def prepare(data: Path, work: Path, train_size: int, seed: int) -> tuple[Path, Path, int]:
    """Write a seeded random subset of SST-2 train; return it, the dev file and its size."""
    train = read_split(data, "train")
    dev = data / "dev.tsv"
    read_split(data, "dev")  # fail early on a broken dev file
    size = min(train_size, len(train))
    idx = np.random.default_rng(seed).permutation(len(train))[:size]
    subset = write_examples(train.subset(sorted(int(i) for i in idx)), work / "train-subset.jsonl",
                            text_column="sentence", label_column="label")
    return subset, dev, size


def run_central(cfg: FedConfig, steps: int) -> dict[str, Any]:
    """Non-private training on the pooled subset for ``steps`` steps; dev accuracy."""
    from client.trainer import train_local

    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg)
    train = read_examples(cfg.train, text_column=cfg.text_column, label_column=cfg.label_column,
                          label_names=cfg.labels)
    dev = read_examples(cfg.eval, text_column=cfg.text_column, label_column=cfg.label_column,
                        label_names=cfg.labels)
    model = build_model(cfg, cfg.labels)
    started = time.monotonic()
    result = train_local(model, encode(tokenizer, train, cfg.max_length),
                         cfg.replace(local_steps=steps), None, device)
    seconds = time.monotonic() - started
    scores = evaluate(model, encode(tokenizer, dev, cfg.max_length),
                      batch_size=cfg.eval_batch_size, num_labels=len(cfg.labels), device=device)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "steps": result.steps,
            "train_seconds": round(seconds, 1)}


def run_federated(cfg: FedConfig) -> dict[str, Any]:
    """One federated run over the in-process grid; accuracy curve and timings."""
    from server.app import run_federation
    from simulations.local_grid import RUN_ID, LocalGrid
    from simulations.simulate import prepare_sites

    cfg = prepare_sites(cfg)
    started = time.monotonic()
    summary = run_federation(LocalGrid(cfg.clients), cfg, run_id=RUN_ID)
    wall = time.monotonic() - started
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    return {
        "accuracy": rows[-1]["accuracy"],
        "macro_f1": rows[-1]["macro_f1"],
        "accuracy_per_round": [round(r["accuracy"], 4) for r in rows],
        "epsilon_max": summary["epsilon_max"],
        "contributors_per_round": [r["contributors"] for r in rows],
        "seconds_per_round": round(statistics.mean(r["seconds"] for r in rows), 1),
        "wall_seconds": round(wall, 1),
    }


def dp_step_ratio(cfg: FedConfig, train_file: Path, noise_multiplier: float,
                  reps: int = STEP_REPS) -> dict[str, float]:
    """Median DP-SGD step time over median plain step time, same model and fixed batch.

    Both sides run forward, backward and an AdamW step on the same
    ``batch_size`` examples. The DP side is Opacus's (per-sample gradients,
    per-sample clipping to ``max_grad_norm``, Gaussian noise), made private with
    a fixed-batch loader so batch size and sequence length are identical.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg)
    examples = read_examples(train_file, text_column=cfg.text_column,
                             label_column=cfg.label_column, label_names=cfg.labels)
    data = encode(tokenizer, examples.subset(range(cfg.batch_size)), cfg.max_length)
    batch = data.tensors

    def timed(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        times = []
        for i in range(reps + 1):  # the first repetition warms up and is dropped
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            out = model(**model_inputs(model, batch[0], batch[1], device), labels=batch[2].to(device))
            out.loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = build_model(cfg, cfg.labels).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=cfg.lr)

    plain = timed(*fresh())
    model, optimizer = fresh()
    loader = DataLoader(TensorDataset(*batch), batch_size=cfg.batch_size)
    model, optimizer, _ = PrivacyEngine(accountant="prv").make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm, poisson_sampling=False)
    private = timed(model, optimizer)
    return {"plain_step_s": round(plain, 4), "dp_step_s": round(private, 4),
            "dp_step_ratio": round(private / plain, 4)}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """All three arms and the step-time ratio; the report as a dict."""
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="fedseal-bench-utility-") as tmp:
        work = Path(tmp)
        train_file, dev_file, size = prepare(args.data, work, args.train_size, args.seed)
        base = FedConfig(model=args.model, train=str(train_file), eval=str(dev_file), labels=("0", "1"),
                         clients=args.sites, min_clients=args.sites, rounds=args.rounds,
                         local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                         max_length=args.max_length, max_grad_norm=args.max_grad_norm,
                         epsilon=args.epsilon, delta=args.delta, partition="iid", seed=args.seed,
                         out=str(work / "out"))
        total_steps = args.rounds * args.sites * args.local_steps
        log.info("SST-2 subset of %d examples, %d sites, %d rounds x %d local steps "
                 "(%d steps of batch %d per arm)", size, args.sites, args.rounds,
                 args.local_steps, total_steps, args.batch_size)
        timings: dict[str, float] = {}
        arms: dict[str, dict[str, Any]] = {}
        for name, run in (
            ("central", lambda: run_central(base.replace(out=str(work / "central")), total_steps)),
            ("fed", lambda: run_federated(base.replace(dp=False, out=str(work / "fed")))),
            ("fed_dp", lambda: run_federated(base.replace(out=str(work / "fed_dp")))),
        ):
            if name not in args.arms:
                continue
            log.info("arm %s ...", name)
            t0 = time.monotonic()
            arms[name] = run()
            timings[name] = round(time.monotonic() - t0, 1)
            log.info("arm %s: accuracy %.4f in %.0fs", name, arms[name]["accuracy"], timings[name])
        plan = plan_site(size // args.sites, batch_size=args.batch_size,
                         steps_per_round=args.local_steps, rounds=args.rounds,
                         epsilon=args.epsilon, delta=args.delta, accountant=base.accountant)
        steps = dp_step_ratio(base, train_file, plan.noise_multiplier)
    dp_arm = arms.get("fed_dp", {})
    report: dict[str, Any] = {
        "central_acc": arms.get("central", {}).get("accuracy"),
        "fed_acc": arms.get("fed", {}).get("accuracy"),
        "fed_dp_acc": dp_arm.get("accuracy"),
        "epsilon_max": dp_arm.get("epsilon_max"),
        "seconds_per_round": dp_arm.get("seconds_per_round"),
        "dp_step_ratio": steps["dp_step_ratio"],
    }
    report["targets"] = dict(TARGETS)
    report["targets"]["dp_step_ratio_met"] = report["dp_step_ratio"] <= TARGETS["dp_step_ratio_max"]
    if report["fed_dp_acc"] is not None:
        report["targets"]["fed_dp_acc_met"] = report["fed_dp_acc"] >= TARGETS["fed_dp_acc_min"]
    if report["fed_dp_acc"] is not None and report["fed_acc"] is not None:
        gap = report["fed_acc"] - report["fed_dp_acc"]
        report["targets"].update(dp_gap=round(gap, 4), dp_gap_met=gap <= TARGETS["dp_gap_max"])
    report["arms"] = arms
    report["step_times"] = steps
    report["noise_multiplier"] = plan.noise_multiplier
    report["arm_seconds"] = timings
    report["settings"] = {
        "model": args.model, "finetune": base.finetune, "lora_r": base.lora_r,
        "train_examples": size, "dev_examples": 872, "sites": args.sites, "partition": "iid",
        "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
        "steps_per_arm": total_steps, "lr": args.lr, "max_length": args.max_length,
        "max_grad_norm": args.max_grad_norm, "epsilon": args.epsilon, "delta": args.delta,
        "accountant": base.accountant, "secagg": True, "seed": args.seed,
    }
    report["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                         "device": str(pick_device(base.device))}
    return report


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, output, model and one site's training settings, with this benchmark's defaults."""
    parser.add_argument("--data", type=Path, required=True, help="SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the benchmark, write and print the JSON."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_utility",
                                     description=__doc__.split("\n\n")[0])
    add_site_arguments(parser)
    parser.add_argument("--train-size", type=int, default=16_000)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--arms", type=lambda v: set(v.split(",")), default={"central", "fed", "fed_dp"},
                        help="comma-separated subset of central,fed,fed_dp (default: all three)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_bench_logging(args.log_level)
    started = time.monotonic()
    report = run_benchmark(args)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
