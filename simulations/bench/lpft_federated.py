"""LP-FT against the probe in a real federation (the ClientApp on the local grid), on SST-2.

Arms, each a whole run of ``fedseal.server.app.run_federation`` on the same slice and
partition, every setting ``auto``:

* ``probe``: ``finetune = probe`` with the LP-FT run's probe rounds (statistics round
  and head rounds), at ``--epsilon``;
* ``lpft``: ``finetune = lora``: the same probe rounds, then the adapter rounds, all
  phases in the same ``--epsilon``;
* ``lora_nodp``: the LP-FT run without DP (the ceiling; not private).

Prints and writes JSON: per arm the final dev accuracy of every repeat, the largest
site epsilon, and the run's wall seconds. ``tests/test_lpft.py`` runs :func:`run_arm`
on its slice; its floor comes from this benchmark's repeats (``docs/lora.md``)::

    nice -n 10 python -m simulations.bench.lpft_federated --data ../shared/data/sst2 \\
        --examples 2000 --sites 4 --repeats 10 --json docs/bench/2026-12-04-lpft-slice.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseal.common.config import FedConfig
from fedseal.common.dp_rule import adapter_rounds
from simulations.bench.report import emit_report, setup_bench_logging

log = logging.getLogger("fedseal.bench.lpft_federated")

ARMS = ("probe", "lpft", "lora_nodp")


def arm_config(arm: str, rounds: int, **settings: Any) -> FedConfig:
    """The run ``arm`` makes: LP-FT's ``rounds``, or the probe with LP-FT's probe rounds."""
    if arm == "probe":
        return FedConfig(
            finetune="probe",
            rounds=rounds - adapter_rounds(rounds, settings.get("dp_noise", "local")),
            **settings,
        )
    return FedConfig(finetune="lora", rounds=rounds, dp=arm == "lpft", **settings)


def run_arm(
    arm: str,
    data: Path,
    out: Path,
    *,
    examples: int,
    sites: int,
    rounds: int,
    epsilon: float,
    partition: str = "iid",
    seed: int = 0,
    model: str = "default",
    device: str = "auto",
) -> dict[str, Any]:
    """One run of ``arm`` on the first ``examples`` SST-2 training sentences over ``sites`` sites.

    Returns the final dev accuracy, the rounds' accuracies, the largest site
    epsilon (None without DP) and the wall seconds.
    """
    from fedseal.common.data import read_examples, write_examples
    from fedseal.server.app import run_federation
    from fedseal.simulations.simulate import prepare_sites
    from simulations.bench.local_grid import RUN_ID, LocalGrid

    train = read_examples(data / "train.tsv")
    out.mkdir(parents=True, exist_ok=True)
    write_examples(train.subset(range(examples)), out / "train.jsonl")
    cfg = prepare_sites(
        arm_config(
            arm,
            rounds,
            model=model,
            train=str(out / "train.jsonl"),
            eval=str(data / "dev.tsv"),
            labels=("0", "1"),
            clients=sites,
            min_clients=sites,
            partition=partition,
            epsilon=epsilon,
            accountant="rdp",
            secagg=False,
            seed=seed,
            device=device,
            out=str(out / arm),
        )
    )
    started = time.monotonic()
    summary = run_federation(LocalGrid(cfg.clients), cfg, run_id=RUN_ID)
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    return {
        "accuracy": summary["final_accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rows],
        "epsilon": summary["epsilon_max"],
        "seconds": round(time.monotonic() - started, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every arm ``args.repeats`` times (arms interleaved, so load drifts hit them alike).

    Repeats differ only in the DP noise (and the noise-free arm in its sampling):
    the slice, its partition and the initial weights are the same, so each site's
    features and cached states are computed once (the runs share one folder).
    """
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory(prefix="lpft-bench-") as tmp:
        for repeat in range(args.repeats):
            for arm in args.arms:
                result = run_arm(
                    arm,
                    args.data,
                    Path(tmp),
                    examples=args.examples,
                    sites=args.sites,
                    rounds=args.rounds,
                    epsilon=args.epsilon,
                    partition=args.partition,
                    seed=args.seed,
                    model=args.model,
                )
                log.info("repeat %d, %s: %s", repeat, arm, result)
                results[arm].append(result)
                if args.json:  # what finished so far, should the run be cut short
                    emit_report(report(args, results), args.json, quiet=True)
    return report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The JSON: settings, and per arm each repeat's result and its accuracies in a list."""
    arms: dict[str, Any] = {
        arm: {"accuracy": [r["accuracy"] for r in runs], "runs": runs} for arm, runs in results.items()
    }
    if "probe" in results and "lpft" in results:
        arms["lpft_minus_probe"] = [
            round(a["accuracy"] - b["accuracy"], 4) for a, b in zip(results["lpft"], results["probe"])
        ]
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "arms": arms,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.lpft_federated", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, required=True, help="SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("--json", type=Path, help="where to write the JSON")
    parser.add_argument("--model", default="default")
    parser.add_argument("--examples", type=int, default=2000, help="training sentences used")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="LP-FT's rounds (>= 3)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument("--arms", type=lambda v: v.split(","), default=list(ARMS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms {unknown} are not among {ARMS}")
    setup_bench_logging(args.log_level)
    import torch

    torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        emit_report(result, args.json)
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
