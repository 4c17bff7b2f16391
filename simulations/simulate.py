"""``fedseal simulate``: the whole federation on one machine.

The simulation does what real sites would: it splits one labelled file (or the
embedded synthetic task) into one file per site under ``<out>/sites/``, and the
virtual sites read those files exactly as a deployed client agent reads its
own. Flower's Simulation Engine (Ray) runs the ServerApp and the ClientApps.

The console shows a short header, one progress line per round and the
warnings a user can act on; every log line (fedseal's, Flower's, Ray's,
alembic's, transformers', Python warnings) goes to ``<out>/fedseal.log``, and
``-v`` puts all of it back on the console (:mod:`fedseal.common.console`).

Why ``flwr.simulation.run_simulation`` and not ``flwr run``: Flower 1.41
deprecates ``run_simulation`` in favour of ``flwr run`` against a local
simulation federation, but both end in the same Simulation Engine
(``flwr.simulation.app`` calls the same ``_run_simulation``); what ``flwr run``
adds does not fit a one-shot command:

* a local-simulation connection (``address = ":local:"``) makes the CLI start
  ``flower-superlink --simulation`` *detached* (``start_new_session``, output to
  ``/dev/null``) on the fixed ports 39091/39093 under ``$FLWR_HOME``, and leave it
  running after the run (``flwr/cli/local_superlink.py``): ``fedseal simulate``
  would leave a process behind, and two simulations at once (tests beside a
  benchmark) would share or fight over that one SuperLink;
* the run is submitted asynchronously; the ServerApp and ClientApps run in a
  ``flwr-simulation`` child of the SuperLink whose stdout and stderr (Ray's
  included) are mirrored into the SuperLink's log store; the console would
  only ever get that merged text back through ``flwr log``, so a quiet console
  would mean filtering printed text, and the log file could not be written
  with logging handlers;
* the federation config (``SimulationConfig``) carries only the number of
  SuperNodes, the resources and two Ray init args: no environment for the
  actors, and the app must be built into a FAB and installed under
  ``$FLWR_HOME`` on every run; ``flwr-simulation`` also logs a fixed
  warning about the default federation size on every run.

So this command keeps ``run_simulation`` (in-process, every process stopped
when it returns) and routes Flower's deprecation notice, like every other
library line, to the log file with handlers. A deployment (``fedseal server``)
already goes through the SuperLink and ``flwr run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from fedseal.client.site import simulation_key_file, simulation_roster_file, simulation_site_file
from fedseal.common.cli_args import add_config_options, config_from_args
from fedseal.common.config import AUTO, ConfigError, FedConfig
from fedseal.common.console import LOG_FILE, quiet_child_environment, setup_run_logging
from fedseal.common.data import Examples, label_sort_key, read_examples, write_examples
from fedseal.common.partition import dirichlet_partition, iid_partition, label_mix
from fedseal.common.secagg import generate_identity
from fedseal.common.synthetic import synthetic_examples
from fedseal.server.report import REPORT_FILE
from fedseal.simulations.engine import backend_config, indexed_sweep

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

log = logging.getLogger("fedseal")  # the console
detail = logging.getLogger("fedseal.simulate")  # the log file (-v: the console too)

SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 6000, 400
MIN_SITE_EXAMPLES = 16  # a Dirichlet site smaller than this is redrawn (Poisson needs room)


def prepare_sites(cfg: FedConfig) -> FedConfig:
    """Write one data file per site (and the synthetic task if no data was given).

    Returns the config with ``train``/``eval``/``labels`` filled in. Logs the
    label mix of every site (to ``<out>/fedseal.log``; ``-v``: on the console)
    so skew is visible before training starts.
    """
    if bool(cfg.train) != bool(cfg.eval):
        raise ConfigError(
            "give both --train and --eval (a held-out file for central evaluation), "
            "or neither to use the embedded synthetic task"
        )
    out = Path(cfg.out)
    if not cfg.train:
        data_dir = out / "data"
        synthetic_train = synthetic_examples(SYNTHETIC_TRAIN, seed=cfg.seed)
        held_out = synthetic_examples(SYNTHETIC_EVAL, seed=cfg.seed + 10_000)
        cfg = cfg.replace(
            train=str(write_examples(synthetic_train, data_dir / "train.jsonl")),
            eval=str(write_examples(held_out, data_dir / "eval.jsonl")),
            text_column="sentence",
            label_column="label",
        )
    labels = cfg.labels or None
    if labels is None:
        # The label set is the union of both files', fixed before any site reads.
        found = [
            read_examples(path, text_column=cfg.text_column, label_column=cfg.label_column)
            for path in (cfg.train, cfg.eval)
        ]
        counts = Counter(e.label_names[i] for e in found for i in e.labels)
        stray = stray_labels(counts)
        if stray:
            raise ConfigError(
                f"label(s) {', '.join(repr(s) for s in stray)} appear in only "
                f"{', '.join(str(counts[s]) for s in stray)} of {sum(counts.values())} examples "
                "(a typo would make an extra class): fix the file, or give --labels with every "
                "class in order (examples with other labels are then refused)"
            )
        cfg = cfg.replace(labels=sorted(counts, key=label_sort_key))
    train: Examples = read_examples(
        cfg.train, text_column=cfg.text_column, label_column=cfg.label_column, label_names=cfg.labels
    )
    if cfg.partition == "iid":
        parts = iid_partition(len(train), cfg.clients, cfg.seed)
    else:
        parts = dirichlet_partition(
            train.labels,
            cfg.clients,
            cfg.alpha,
            cfg.seed,
            min_size=MIN_SITE_EXAMPLES if cfg.batch_size == AUTO else int(cfg.batch_size) + 1,
        )
    mix = label_mix(train.labels, parts, len(cfg.labels))
    detail.info("%d training examples over %d sites (%s):", len(train), cfg.clients, cfg.partition)
    for pid, (part, counts) in enumerate(zip(parts, mix)):
        write_examples(
            train.subset(part),
            simulation_site_file(cfg.out, pid),
            text_column=cfg.text_column,
            label_column=cfg.label_column,
        )
        detail.info(
            "  site-%d: %5d examples  %s",
            pid,
            len(part),
            "  ".join(f"{name}={c}" for name, c in zip(cfg.labels, counts)),
        )
    write_site_keys(cfg.out, cfg.clients)
    return cfg


STRAY_FRACTION = 0.001
"""A label found without ``--labels`` on fewer than this fraction of examples (and at most
:data:`STRAY_MAX` of them) is taken for a typo."""
STRAY_MAX = 3


def stray_labels(counts: Counter) -> list[str]:
    """Labels of ``counts`` (label -> examples) too rare to be a class the user meant."""
    total = sum(counts.values())
    return sorted(label for label, n in counts.items() if n <= STRAY_MAX and n < STRAY_FRACTION * total)


def write_site_keys(out: str | Path, clients: int) -> Path:
    """A fresh signing key per virtual site, and the roster of all of them.

    Each site's key is ``<out>/sites/site-N.key`` (0600, OpenSSH, P-384 like the
    keys ``fedseal keys`` makes) with its ``.pub`` beside it; the roster
    ``<out>/sites/peers.pub`` is the concatenation of the ``.pub`` lines, so the
    simulation runs SecAgg+ against a lying server exactly as a deployment does.
    """
    lines = []
    for pid in range(clients):
        private, public = generate_identity(f"site-{pid}")
        path = simulation_key_file(out, pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
        path.with_suffix(".pub").write_text(public + "\n", encoding="ascii")
        lines.append(public)
    roster = simulation_roster_file(out)
    roster.write_text("".join(line + "\n" for line in lines), encoding="ascii")
    return roster


def header(cfg: FedConfig, log_file: Path) -> list[str]:
    """The console's first lines: what runs, under which privacy, where outputs go."""
    from fedseal.server.metrics import NON_PRIVATE

    data = cfg.train or "the embedded synthetic task"
    privacy = (
        f"DP-SGD at every site, epsilon {cfg.epsilon:g}, delta {cfg.delta:g} per site"
        if cfg.dp
        else NON_PRIVATE
    )
    secagg = (
        "secure aggregation (SecAgg+) on"
        if cfg.secagg
        else "secure aggregation OFF (--no-secagg): the server sees each site's update"
    )
    return [
        f"fedseal simulate: {cfg.model} ({cfg.finetune}), {cfg.clients} sites, {cfg.rounds} rounds, "
        f"data {data} ({cfg.partition})",
        f"  privacy  {privacy}; {secagg}",
        f"  outputs  {cfg.out}  (log: {log_file}; -v shows it here)",
    ]


def simulate(
    cfg: FedConfig,
    verbose: bool = False,
    client_app: ClientApp | None = None,
    *,
    ray_address: str | None = None,
    cpus_per_site: float = 1.0,
) -> dict:
    """Run a whole simulated federation; return the run summary.

    ``verbose`` forwards the virtual sites' (Ray actors') own output to the
    console; otherwise it stays in Ray's session logs, and the sites' libraries
    are kept quiet (:func:`fedseal.common.console.quiet_child_environment`).
    ``client_app`` replaces fedseal's ClientApp (a benchmark's instrumented one).
    ``ray_address`` joins a running Ray cluster instead of starting Ray here, and
    ``cpus_per_site`` is what Ray reserves for each virtual site's actor
    (:func:`fedseal.simulations.engine.backend_config`).
    """
    from flwr.simulation import run_simulation

    from fedseal.client.app import app as fedseal_client_app
    from fedseal.server.app import make_server_app

    cfg = prepare_sites(cfg)
    Path(cfg.out, "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
    import torch

    gpu = cfg.device != "cpu" and torch.cuda.is_available()
    backend = backend_config(ray_address=ray_address, cpus_per_site=cpus_per_site, gpu=gpu, verbose=verbose)
    # Ray's actors inherit this process's environment (Flower passes its own
    # runtime_env, so the variables are set here, before Ray starts); on a cluster
    # joined with ray_address they have the environment their node was started with.
    quiet_child_environment(verbose)
    # Opt in to Ray's coming default (it warns otherwise): an actor given no
    # GPU keeps CUDA_VISIBLE_DEVICES; fedseal's --device decides the device.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    started = time.monotonic()
    with indexed_sweep():
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=client_app or fedseal_client_app,
            num_supernodes=cfg.clients,
            backend_config=backend,
        )
    summary_path = Path(cfg.out) / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(
            f"the simulation ended without writing {summary_path}; see {Path(cfg.out) / LOG_FILE}"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


# The settings `flwr run .` can take from a prepared folder: exactly the keys of
# pyproject.toml's [tool.flwr.app.config] (Flower refuses any other override).
FLWR_RUN_KEYS = ("train", "eval", "out", "rounds", "clients", "epsilon", "delta")
FLWR_RUN_CONFIG = "flwr-run-config.toml"


def prepare_flwr_run(cfg: FedConfig) -> list[str]:
    """Prepare ``cfg.out`` for ``flwr run .`` and return the commands that run it.

    Writes what :func:`simulate` writes before it starts the federation (each
    site's data file, the sites' signing keys and roster) and
    ``<out>/flwr-run-config.toml`` with the run's :data:`FLWR_RUN_KEYS`, paths
    absolute, so Flower's own simulation runs the same federation.

    Raises
    ------
    ConfigError
        If a setting other than :data:`FLWR_RUN_KEYS` differs from its default:
        ``flwr run .`` would silently run without it.
    """
    defaults = FedConfig().to_dict()
    lost = sorted(
        key.replace("_", "-")
        for key, value in cfg.to_dict().items()
        if key not in FLWR_RUN_KEYS and value != defaults[key]
    )
    if lost:
        raise ConfigError(
            f"flwr run . takes only {', '.join(FLWR_RUN_KEYS)} from a prepared "
            f"folder (pyproject.toml's app config), not {', '.join(lost)}: run "
            "those settings with fedseal simulate, or drop them here"
        )
    cfg = prepare_sites(cfg.replace(out=str(Path(cfg.out).resolve())))
    settings = {key: value for key, value in cfg.to_run_config().items() if key in FLWR_RUN_KEYS}
    settings.update({key: str(Path(settings[key]).resolve()) for key in ("train", "eval")})
    path = Path(cfg.out) / FLWR_RUN_CONFIG
    path.write_text(tomli_w.dumps(settings), encoding="utf-8")
    return [
        f"flwr run . local --run-config {path} --federation-config 'num-supernodes={cfg.clients}' --stream"
    ]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of CPUs, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedseal simulate``: every run setting, ``--verbose``, the engine's
    ``--ray-address`` and ``--cpus-per-site``, and ``--prepare-only``."""
    add_config_options(parser)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every log line (Flower, Ray, the sites) on the console, at "
        "debug level; without it they go to <out>/fedseal.log only",
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="join this running Ray cluster (its head's address, or 'auto') "
        "instead of starting Ray on this machine: the virtual sites run on "
        "every node of the cluster; --out must be a folder every node sees "
        "at the same path (see docs/scale.md)",
    )
    parser.add_argument(
        "--cpus-per-site",
        type=_positive,
        default=1.0,
        metavar="CPUS",
        help="CPUs Ray reserves for each virtual site's actor, and the torch "
        "threads it gets (default 1): the engine runs cluster CPUs / this "
        "many sites at once",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the sites' data files, keys and roster and "
        f"<out>/{FLWR_RUN_CONFIG}, print the `flwr run .` command that runs "
        "this federation with Flower's own simulation (from the checkout), "
        "and stop; only the settings in pyproject.toml's "
        "[tool.flwr.app.config] carry over",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedseal simulate``."""
    from fedseal.common.cli import command_parser

    args = command_parser("simulate").parse_args(argv)
    cfg = config_from_args(args)
    log_file = setup_run_logging(Path(cfg.out) / LOG_FILE, args.verbose)
    if args.prepare_only:
        for command in prepare_flwr_run(cfg):
            print(command)
        return 0
    for line in header(cfg, log_file):
        log.info(line)
    summary = simulate(
        cfg, verbose=args.verbose, ray_address=args.ray_address, cpus_per_site=args.cpus_per_site
    )
    if summary.get("failed"):
        print(f"\nfedseal simulate: the run FAILED: {summary['failed']}")
    else:
        print(f"\nfedseal simulate finished in {summary['wall_seconds']}s")
    if not summary["private"]:
        print("WARNING: " + summary["privacy"])
    print(f"  final accuracy   {summary['final_accuracy']:.4f} (macro-F1 {summary['final_macro_f1']:.4f})")
    if summary["epsilon_max"] is not None:
        print(
            f"  epsilon spent    max {summary['epsilon_max']:.3f} per site (target {cfg.epsilon}, delta {cfg.delta})"
        )
    print(f"  metrics          {summary['metrics']}")
    print(f"  model            {summary['model_dir']}  (AutoModelForSequenceClassification.from_pretrained)")
    print(f"  summary          {Path(cfg.out) / 'summary.json'}")
    if (Path(cfg.out) / REPORT_FILE).is_file():
        print(f"  report           {Path(cfg.out) / REPORT_FILE}  (open in a browser)")
    run_problems(cfg, Path(summary["metrics"]))
    return 1 if summary.get("failed") else 0


def run_problems(cfg: FedConfig, metrics: Path) -> None:
    """Print what went wrong in the run's rounds.

    Sites that timed out are named with the hint to raise ``--timeout``; abandoned
    rounds with their reason. (Whether the run failed as a whole is the summary's
    ``failed``: :func:`fedseal.server.outcome.run_failure`.)
    """
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]
    late = sorted({site for row in rows for site in row.get("timed_out", [])})
    if late:
        print(
            f"WARNING: {len(late)} site(s) timed out (no answer within {cfg.timeout:g}s of a "
            f"stage's last answer): {', '.join(late[:10])}{', ...' if len(late) > 10 else ''}; "
            "raise --timeout if they are slow rather than gone"
        )
    for row in rows:
        if row["abandoned"]:
            print(
                f"WARNING: round {row['round']} was abandoned, the model unchanged by it: {row['abandoned']}"
            )


if __name__ == "__main__":
    sys.exit(main())
