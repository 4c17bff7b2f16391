"""What privacy costs in accuracy on SST-2: a privacy-utility curve, IID and label-skewed.

Usage::

    python -m simulations.bench.utility --data ../shared/data/sst2 --json OUT.json --plot OUT.png

Every arm is 10 sites sharing the whole SST-2 train split, the default settings
(``finetune = probe``; every training setting ``auto``: see
:mod:`fedseal.common.dp_rule`), secure aggregation on, the real ClientApp and ServerApp
over the in-process grid (:mod:`simulations.bench.local_grid`; only the transport is
missing), scored on the whole dev set. ``--data`` may be any folder in SST-2's GLUE layout
(``train.tsv`` and ``dev.tsv`` with ``sentence`` and ``label`` columns, or the same as
``.jsonl``): the labels are its train split's (``python -m simulations.bench.topics --out
DIR`` writes a six-class one). Arms, for each partition (``iid`` and
``dirichlet`` with alpha 0.5):

* ``fed``: non-private (the same sampling and steps without noise: the same compute);
* ``fed_dp_eps<E>``: DP at every site with ``(E, 1e-5)`` per site, E in 1, 2, 4, 8;
* ``fed_ddp_eps<E>`` (with ``--dp-noise local,distributed`` or ``distributed``): the same
  budget under ``dp-noise = distributed`` (docs/ddp.md), ``--ddp-rounds`` rounds (each
  one DP-SGD step over all sites; sites' policy: ``min-clients`` = the sites, one
  colluder).

With ``--finetune probe,lora`` (or ``lora``) every arm also runs as LP-FT (``finetune =
lora``: the probe's rounds, then adapter rounds, docs/lora.md), named ``lpft``,
``lpft_dp_eps<E>`` and ``lpft_ddp_eps<E>``, on the same partition in the same run.

The JSON holds ``fed_acc`` and ``fed_dp_acc`` (IID, epsilon 8), the targets of
issue 9 and whether each is met (for a folder of SST-2's labels only), and every
arm's per-round accuracy, macro-F1, largest epsilon and wall time. With ``--repeats N`` each arm runs N times on the
same partition (the DP noise and the sampling are fresh every run): the arm's
numbers are the runs' means, its ``runs`` every run, its ``spread`` the least
and the largest accuracy of each round. The SST-2 slice test's federation is
``--train-size 4000 --sites 4 --rounds 3 --epsilons 8 --accountant rdp``. The
plot is accuracy against epsilon, one line per partition, the non-private
accuracy as a dashed line of the same colour.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedseal.common.config import FedConfig
from fedseal.common.data import DataError, Examples, read_examples, write_examples
from fedseal.common.model import pick_device
from simulations.bench.report import emit_report, finish, setup_bench_logging

log = logging.getLogger("fedseal.bench.utility")

TARGETS = {"fed_dp_acc_min": 0.83, "dp_gap_max": 0.03}
DDP_TARGETS = {"ddp_gap_max_eps8": 0.01, "ddp_acc_min_eps1": 0.82}
"""Issue 20's targets for distributed noise (IID): within 0.01 of non-private at epsilon 8,
at least 0.82 at epsilon 1."""
NOISE_MODES = ("local", "distributed")
EPSILONS = (1.0, 2.0, 4.0, 8.0)
PARTITIONS = ("iid", "dirichlet")
ARM_PREFIX = {"probe": "fed", "lora": "lpft"}
"""An arm's name starts with its fine-tuning mode's prefix (``fed_dp_eps8``, ``lpft_dp_eps8``)."""


SST2_LABELS = ("0", "1")
"""The labels of SST-2's folder: the targets (:data:`TARGETS`, :data:`DDP_TARGETS`) are reported
only for a folder with these labels."""


@dataclass(frozen=True)
class Task:
    """What the arms train and score on: the train file written for them and the dev file."""

    train_file: Path
    dev_file: Path
    train_examples: int
    dev_examples: int
    labels: tuple[str, ...]


def split_path(data: Path, name: str) -> Path:
    """``<data>/<name>.tsv`` (the GLUE layout) or ``<data>/<name>.jsonl``; SystemExit naming the
    folder if neither is there."""
    for suffix in (".tsv", ".jsonl"):
        path = data / f"{name}{suffix}"
        if path.exists():
            return path
    raise SystemExit(
        f"neither {name}.tsv nor {name}.jsonl in {data}: --data must be the SST-2 folder holding "
        "train.tsv and dev.tsv (GLUE layout), or a folder of train.jsonl and dev.jsonl with sentence "
        "and label fields"
    )


def read_split(data: Path, name: str, labels: tuple[str, ...] | None = None) -> Examples:
    """The ``name`` split of ``data`` (:func:`split_path`), in ``labels``' order when given."""
    return read_examples(
        split_path(data, name), text_column="sentence", label_column="label", label_names=labels
    )


def prepare(data: Path, work: Path, train_size: int | None) -> Task:
    """The train split (or its first ``train_size`` examples) written for the arms, and the dev
    split, checked to hold only the train split's labels (SST-2's ``0`` and ``1``; any task's own)."""
    train = read_split(data, "train")
    try:
        dev = read_split(data, "dev", train.label_names)
    except DataError as exc:
        raise SystemExit(
            f"the dev split does not fit the train split's labels {list(train.label_names)}: {exc}"
        ) from None
    size = len(train) if not train_size else min(train_size, len(train))
    path = write_examples(
        train.subset(range(size)), work / "train.jsonl", text_column="sentence", label_column="label"
    )
    return Task(path, split_path(data, "dev"), size, len(dev), train.label_names)


def run_federated(cfg: FedConfig) -> dict[str, Any]:
    """One federated run over the in-process grid; accuracy curve and timings."""
    from fedseal.server.app import run_federation
    from fedseal.simulations.simulate import prepare_sites
    from simulations.bench.local_grid import RUN_ID, LocalGrid

    cfg = prepare_sites(cfg)
    started = time.monotonic()
    summary = run_federation(LocalGrid(cfg.clients), cfg, run_id=RUN_ID)
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    wall = time.monotonic() - started
    return {
        "accuracy": rows[-1]["accuracy"],
        "macro_f1": rows[-1]["macro_f1"],
        "accuracy_per_round": [round(r["accuracy"], 4) for r in rows],
        "held_out_loss_per_round": [None if r.get("loss") is None else round(r["loss"], 4) for r in rows],
        "epsilon_max": summary["epsilon_max"],
        "contributors_per_round": [len(r["contributors"]) for r in rows],
        "abandoned_rounds": sum(bool(r["abandoned"]) for r in rows),
        "rounds": len(rows),
        "seconds_per_round": round(sum(r["seconds"] for r in rows) / max(len(rows), 1), 3),
        "bytes_received_per_site_round": round(
            sum(r["bytes_received"] for r in rows) / max(len(rows), 1) / cfg.clients
        ),
        "wall_seconds": round(wall, 1),
    }


def pool_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's runs as one entry: the means, every run, and each round's least and largest."""
    if len(runs) == 1:
        return runs[0]
    rounds = list(zip(*(r["accuracy_per_round"] for r in runs)))
    return {
        "accuracy": round(sum(r["accuracy"] for r in runs) / len(runs), 4),
        "macro_f1": round(sum(r["macro_f1"] for r in runs) / len(runs), 4),
        "accuracy_per_round": [round(sum(a) / len(a), 4) for a in rounds],
        "spread": {"min": [min(a) for a in rounds], "max": [max(a) for a in rounds]},
        "epsilon_max": max((r["epsilon_max"] for r in runs if r["epsilon_max"] is not None), default=None),
        "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
        "runs": runs,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against epsilon, one line per partition; non-private as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for partition, colour in zip(PARTITIONS, ("tab:blue", "tab:orange")):
        arms = report["arms"].get(partition, {})
        eps = [e for e in EPSILONS if f"fed_dp_eps{e:g}" in arms]
        if eps:
            ax.plot(
                eps,
                [arms[f"fed_dp_eps{e:g}"]["accuracy"] for e in eps],
                "o-",
                color=colour,
                label=f"{partition}, DP",
            )
        if "fed" in arms:
            ax.axhline(
                arms["fed"]["accuracy"], color=colour, linestyle="--", label=f"{partition}, non-private"
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    ax.set_xlabel("epsilon per site (delta 1e-5)")
    ax.set_ylabel("dev accuracy")
    ax.set_title(f"fedseal, {report['settings']['sites']} sites, {report['settings']['rounds']} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """SST-2's targets (issues 9 and 20) and whether the IID arms run so far met them."""
    iid = arms.get("iid", {})
    fed_acc = iid.get("fed", {}).get("accuracy")
    fed_dp_acc = iid.get("fed_dp_eps8", {}).get("accuracy")
    out: dict[str, Any] = {"fed_acc": fed_acc, "fed_dp_acc": fed_dp_acc, "targets": dict(TARGETS)}
    if fed_dp_acc is not None:
        out["targets"]["fed_dp_acc_met"] = fed_dp_acc >= TARGETS["fed_dp_acc_min"]
        if fed_acc is not None:
            gap = fed_acc - fed_dp_acc
            out["targets"].update(dp_gap=round(gap, 4), dp_gap_met=gap <= TARGETS["dp_gap_max"])
    ddp_eps8, ddp_eps1 = (iid.get(f"fed_ddp_eps{e}", {}).get("accuracy") for e in (8, 1))
    if ddp_eps8 is not None or ddp_eps1 is not None:
        ddp_targets: dict[str, Any] = dict(DDP_TARGETS)
        if ddp_eps8 is not None and fed_acc is not None:
            gap = fed_acc - ddp_eps8
            ddp_targets.update(gap_eps8=round(gap, 4), gap_eps8_met=gap <= DDP_TARGETS["ddp_gap_max_eps8"])
        if ddp_eps1 is not None:
            ddp_targets.update(acc_eps1=ddp_eps1, acc_eps1_met=ddp_eps1 >= DDP_TARGETS["ddp_acc_min_eps1"])
        out["ddp_targets"] = ddp_targets
    return out


def summarise(
    arms: dict[str, dict[str, Any]], args: argparse.Namespace, task: Task, base: FedConfig
) -> dict[str, Any]:
    """The report of the arms run so far (SST-2's targets only for a folder of SST-2's labels)."""
    report: dict[str, Any] = targets(arms) if task.labels == SST2_LABELS else {}
    report["curve"] = {p: {name: a["accuracy"] for name, a in runs.items()} for p, runs in arms.items()}
    report["arms"] = arms
    report["settings"] = {
        "model": args.model,
        "data": str(args.data),
        "labels": list(task.labels),
        "train_examples": task.train_examples,
        "dev_examples": task.dev_examples,
        "sites": args.sites,
        "rounds": args.rounds,
        "partitions": list(args.partitions),
        "dirichlet_alpha": args.alpha,
        "epsilons": list(args.epsilons),
        "delta": args.delta,
        "accountant": args.accountant,
        "finetune": list(args.finetune),
        "training_settings": "auto (fedseal.common.dp_rule)",
        "secagg": base.secagg,
        "seed": args.seed,
        "repeats": args.repeats,
        "dp_noise": list(args.dp_noise),
        "ddp_rounds": args.ddp_rounds,
    }
    report["machine"] = {
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "device": str(pick_device(base.device)),
    }
    return report


def arm_configs(base: FedConfig, args: argparse.Namespace) -> list[tuple[str, FedConfig]]:
    """The arms of one partition and fine-tuning mode: non-private, distributed, local."""
    return (
        ([] if args.no_nonprivate else [("fed", base.replace(dp=False))])
        + [
            (f"fed_ddp_eps{e:g}", base.replace(epsilon=e, dp_noise="distributed", rounds=args.ddp_rounds))
            for e in args.epsilons
            if "distributed" in args.dp_noise
        ]
        + [(f"fed_dp_eps{e:g}", base.replace(epsilon=e)) for e in args.epsilons if "local" in args.dp_noise]
    )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every arm of every partition; the report as a dict (also written after each arm)."""
    torch.manual_seed(args.seed)
    arms: dict[str, dict[str, Any]] = {p: {} for p in args.partitions}
    with tempfile.TemporaryDirectory(prefix="fedseal-bench-utility-") as tmp:
        work = Path(tmp)
        task = prepare(args.data, work, args.train_size)
        base = FedConfig(
            model=args.model,
            train=str(task.train_file),
            eval=str(task.dev_file),
            labels=task.labels,
            clients=args.sites,
            min_clients=args.sites,
            rounds=args.rounds,
            delta=args.delta,
            alpha=args.alpha,
            seed=args.seed,
            accountant=args.accountant,
            out=str(work / "out"),
        )
        log.info(
            "%s: train of %d examples over %d sites, %d rounds, epsilons %s",
            args.data,
            task.train_examples,
            args.sites,
            args.rounds,
            list(args.epsilons),
        )
        for partition in args.partitions:
            runs = [
                (name.replace("fed", ARM_PREFIX[finetune], 1), cfg.replace(finetune=finetune))
                for finetune in args.finetune
                for name, cfg in arm_configs(base, args)
            ]
            for name, cfg in runs:
                log.info("%s arm %s ...", partition, name)
                arms[partition][name] = pool_runs(
                    [
                        run_federated(
                            cfg.replace(partition=partition, out=str(work / partition / name / str(i)))
                        )
                        for i in range(args.repeats)
                    ]
                )
                log.info(
                    "%s arm %s: accuracy %.4f by round %s",
                    partition,
                    name,
                    arms[partition][name]["accuracy"],
                    arms[partition][name]["accuracy_per_round"],
                )
                partial = args.json.with_name(args.json.name + ".partial")
                emit_report(summarise(arms, args, task, base), partial, quiet=True)
    return summarise(arms, args, task, base)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the benchmark, write the JSON (and plot), print the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.utility", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="SST-2 folder, or any in its layout (train.tsv, dev.tsv; or .jsonl)",
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--plot", type=Path, help="where to write the PNG curve (optional)")
    parser.add_argument("--model", default="default", help="model path or hub name")
    parser.add_argument(
        "--train-size", type=int, default=0, help="use only the first N training examples (default: all)"
    )
    parser.add_argument(
        "--finetune",
        type=lambda v: tuple(v.split(",")),
        default=("probe",),
        help="comma-separated subset of probe,lora (LP-FT): the modes every arm runs in (default probe)",
    )
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--epsilons",
        type=lambda v: tuple(float(e) for e in v.split(",")),
        default=EPSILONS,
        help="comma-separated (default 1,2,4,8)",
    )
    parser.add_argument(
        "--partitions",
        type=lambda v: tuple(v.split(",")),
        default=PARTITIONS,
        help="comma-separated subset of iid,dirichlet (default both)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--accountant", default="prv", choices=("prv", "rdp"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per arm, on the same partition with fresh noise (default 1)",
    )
    parser.add_argument(
        "--dp-noise",
        type=lambda v: tuple(v.split(",")),
        default=("local",),
        help="comma-separated subset of local,distributed: the DP arms to run (default local)",
    )
    parser.add_argument(
        "--ddp-rounds",
        type=int,
        default=101,
        help="rounds of the distributed arms: 1 statistics round, then one DP-SGD step a round (default 101)",
    )
    parser.add_argument(
        "--no-nonprivate",
        action="store_true",
        help="skip the non-private arms (the targets' gaps then need another run's)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    unknown = set(args.partitions) - set(PARTITIONS)
    if unknown:
        parser.error(f"unknown partition(s) {sorted(unknown)}; use iid and/or dirichlet")
    if set(args.dp_noise) - set(NOISE_MODES):
        parser.error(
            f"unknown --dp-noise {sorted(set(args.dp_noise) - set(NOISE_MODES))}; use "
            "local and/or distributed"
        )
    if set(args.finetune) - set(ARM_PREFIX):
        parser.error(
            f"unknown --finetune {sorted(set(args.finetune) - set(ARM_PREFIX))}; use probe and/or lora"
        )
    setup_bench_logging(args.log_level)
    started = time.monotonic()
    return finish(run_benchmark(args), started, args.json, args.plot, plot)


if __name__ == "__main__":
    sys.exit(main())
