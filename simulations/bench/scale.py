"""Where a simulated round's time goes, from 10 to 1,000 sites: seconds per round against sites.

Usage (from the checkout)::

    python -m simulations.bench.scale --sites 10,100 --engines local,ray \\
        --json docs/bench/scale.json --plot docs/bench/scale.png

Each run is a whole federation with the defaults a new user gets (the embedded
synthetic task of 6,000 sentences split IID, ``finetune = probe``, DP at epsilon
8 and SecAgg+ on, 3 rounds), through one of two engines:

* ``ray``: ``fedseal simulate``'s own path (:func:`fedseal.simulations.simulate.simulate`,
  Flower's Simulation Engine on Ray);
* ``local``: the same ServerApp and ClientApp over the in-process grid
  (:mod:`simulations.bench.local_grid`): no Ray, no transport, one thread.

The difference between the two is what the engine costs. Both run an
instrumented ClientApp (:class:`ProfiledClientApp`) that times every message
and, inside it, each phase named in :data:`CLIENT_PHASES` (exclusive times: a
phase's time excludes the phases called inside it); the server's phases
(:data:`SERVER_PHASES`) are timed the same way in the driver and cut per round.
The instrumentation wraps module attributes in the process that runs them (the
driver, or each Ray worker on its first message); fedseal's code is unchanged.

The report holds, per (engine, sites): every round's seconds (the metrics
line's), the wall time, the CPU seconds of the whole process tree (the driver
and every process it started, Ray's included) and of the driver alone, the peak
resident memory of that tree (shared pages count once per process, so it
overstates), the machine's load average before and after (the machine may be
shared: wall seconds follow the load, CPU seconds hardly do), and per round a
site's ``train`` phase by phase in wall and CPU seconds, the SecAgg+ cost per
site (its four stages plus the key advert in the ``train`` reply) and the
server's phases. Under SecAgg+ a site's cost grows with ``k``, which is
``2 ceil(log2 n)`` (:func:`fedseal.common.secagg.default_k`): ``secagg_per_site``
fits ``cpu seconds = a + b k`` over the runs and compares the growth with that
of ``log2 n``. The default task gives 1,000 sites 6 examples each, which the DP
rule accepts (a batch of 2, sampling rate 1/3).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from simulations.bench.report import emit_report, finish, setup_bench_logging

log = logging.getLogger("fedseal.bench.scale")

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("local", "ray")
SITES = (10, 100)
ROUNDS = 3

CLIENT_PHASES: tuple[tuple[str, str, str], ...] = (
    # (phase, module or module:Class, attribute). Exclusive times; nested phases subtract.
    ("read data", "fedseal.client.training", "examples_of"),
    ("model and tokenizer", "fedseal.client.training", "global_model"),
    ("dp plan", "fedseal.client.training", "_plan"),
    ("accounting", "fedseal.common.phases", "epsilon_spent"),
    ("calibration", "fedseal.common.privacy", "plan_site"),
    ("tokenise", "fedseal.common.batches", "encode"),
    ("features", "fedseal.client.probe", "features"),
    ("statistics release", "fedseal.client.probe", "release_statistics"),
    ("opacus set-up", "opacus:PrivacyEngine", "make_private"),
    ("dp steps", "fedseal.client.probe", "train_head"),
    ("commit spend", "fedseal.client.training", "commit_round"),
    ("secagg keys and encoding", "fedseal.client.secagg", "begin_round"),
    ("secagg masking", "fedseal.client.secagg", "masked_input"),
    ("reply records", "fedseal.client.app", "train_reply"),
    ("reply records", "fedseal.client.app", "advert_reply"),
    ("reply records", "fedseal.client.app", "masked_reply"),
)
"""What a site's round work is split into: the ``train`` message (all of it in a plain
round; the checks and the key advert in a secure one) and, in a secure round, the
``train.secagg_masked_input`` message, where it trains, masks and replies."""

SERVER_PHASES: tuple[tuple[str, str, str], ...] = (
    ("send and wait", "fedseal.server.app", "send"),
    ("send and wait", "fedseal.server.secagg", "send"),
    ("record encoding", "fedseal.server.app", "state_to_record"),
    ("reply parsing", "fedseal.server.secagg:_Round", "stage"),
    ("triage", "fedseal.server.secagg", "triage"),
    ("secagg adverts", "fedseal.common.secagg:ServerState", "collect_adverts"),
    ("secagg shares", "fedseal.common.secagg:ServerState", "collect_shares"),
    ("secagg masked", "fedseal.common.secagg:ServerState", "collect_masked"),
    ("secagg signatures", "fedseal.common.secagg:ServerState", "collect_signatures"),
    ("secagg finalize", "fedseal.common.secagg:ServerState", "finalize"),
    ("decode sum", "fedseal.server.secagg", "decode_sum"),
    ("central evaluation", "fedseal.server.app", "held_out_logits"),
    ("checkpoint", "fedseal.server.app", "save_checkpoint"),
)
"""What the server's round is split into (``send and wait`` excludes the sites' own work
when they run in the same thread, as under the local engine)."""

MASKED_INPUT = "train.secagg_masked_input"
SECAGG_STAGES = ("train.secagg_share_keys", MASKED_INPUT, "train.secagg_consistency", "train.secagg_unmask")


class PhaseTimer:
    """Exclusive wall and CPU seconds per phase, per thread's call stack.

    ``cpu`` is the CPU clock: ``time.process_time`` for a site's process (its torch
    threads included), ``time.thread_time`` for the server's thread (the driver's
    other threads, Flower's and Ray's, are counted apart). CPU seconds hardly
    depend on what else the shared machine runs; wall seconds do.
    """

    def __init__(self, cpu: Callable[[], float] = time.process_time) -> None:
        self.cpu = cpu
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._lock = threading.Lock()

    def wrap(self, phase: str, fn: Callable) -> Callable:
        """``fn``, timed as ``phase``."""
        timer = self

        def timed(*args, **kwargs):
            stack = timer._stack()
            stack.append([0.0, 0.0])  # wall and CPU seconds spent in nested phases
            wall, cpu = time.perf_counter(), timer.cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, timer.cpu() - cpu
                nested = stack.pop()
                with timer._lock:
                    timer.wall[phase] += wall - nested[0]
                    timer.cpu_seconds[phase] += cpu - nested[1]
                timer.add_nested(wall, cpu)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        timed.__name__ = getattr(fn, "__name__", phase)
        return timed

    def _stack(self) -> list[list[float]]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def add_nested(self, wall: float, cpu: float) -> None:
        """Count seconds spent elsewhere (a site's message) as nested in the current phase."""
        stack = self._stack()
        if stack:
            stack[-1][0] += wall
            stack[-1][1] += cpu

    def take(self) -> dict[str, dict[str, float]]:
        """``{"wall": {phase: s}, "cpu": {phase: s}}`` so far, then zero."""
        with self._lock:
            out = {
                "wall": {k: round(v, 6) for k, v in self.wall.items() if v},
                "cpu": {k: round(v, 6) for k, v in self.cpu_seconds.items() if v},
            }
            self.wall.clear()
            self.cpu_seconds.clear()
        return out


def _resolve(target: str) -> object:
    import importlib

    module, _, cls = target.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, cls) if cls else owner


def install(timer: PhaseTimer, phases: Sequence[tuple[str, str, str]]) -> None:
    """Wrap every phase's attribute with ``timer`` (a phase whose target is gone is logged)."""
    for phase, target, attribute in phases:
        try:
            owner = _resolve(target)
            fn = getattr(owner, attribute)
        except (ImportError, AttributeError):
            log.warning("phase %r not timed: %s.%s is gone", phase, target, attribute)
            continue
        if getattr(fn, "_fedseal_phase", None) == phase:
            continue  # installed before, in this process
        wrapped = timer.wrap(phase, fn)
        wrapped._fedseal_phase = phase  # type: ignore[attr-defined]
        setattr(owner, attribute, wrapped)
        _INSTALLED.append((owner, attribute, fn))


def uninstall() -> None:
    """Put back everything :func:`install` wrapped in this process, and forget the timers."""
    global _CLIENT_TIMER, _SERVER_TIMER
    while _INSTALLED:
        owner, attribute, original = _INSTALLED.pop()
        setattr(owner, attribute, original)
    _CLIENT_TIMER = _SERVER_TIMER = None


_INSTALLED: list[tuple[object, str, Callable]] = []
_CLIENT_TIMER: PhaseTimer | None = None
_SERVER_TIMER: PhaseTimer | None = None
_SERVER_ROUNDS: list[dict[str, dict[str, float]]] = []


def _client_timer() -> PhaseTimer:
    """This process's client timer, installed on first use."""
    global _CLIENT_TIMER
    if _CLIENT_TIMER is None:
        _CLIENT_TIMER = PhaseTimer()
        install(_CLIENT_TIMER, CLIENT_PHASES)
    return _CLIENT_TIMER


def _server_timer() -> PhaseTimer:
    """The driver's server timer, installed on first use; each checkpoint ends a round's cut."""
    global _SERVER_TIMER
    if _SERVER_TIMER is None:
        import fedseal.server.app as server_app

        _SERVER_TIMER = timer = PhaseTimer(cpu=time.thread_time)
        install(timer, SERVER_PHASES)
        timed_checkpoint = server_app.save_checkpoint

        def checkpoint_then_cut(*args, **kwargs):
            try:
                return timed_checkpoint(*args, **kwargs)
            finally:
                _SERVER_ROUNDS.append(timer.take())

        server_app.save_checkpoint = checkpoint_then_cut
        _INSTALLED.append((server_app, "save_checkpoint", timed_checkpoint))
    return _SERVER_TIMER


def _message_round(msg: Message) -> int | None:
    from fedseal.common.records import ROUND_KEY
    from fedseal.common.secagg_wire import RECORD, ROUND

    try:
        if msg.metadata.message_type.startswith("train.secagg"):
            value = msg.content[RECORD][ROUND]
        else:
            value = msg.content["config"][ROUND_KEY]
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


class ProfiledClientApp(ClientApp):
    """fedseal's ClientApp, each message timed phase by phase into ``<log_dir>/client-<pid>.jsonl``."""

    def __init__(self, log_dir: str) -> None:
        super().__init__()
        self.log_dir = log_dir

    def __call__(self, message: Message, context: Context) -> Message:
        """Run fedseal's ClientApp on ``message`` and log its timings."""
        import torch

        from fedseal.client.app import app

        timer = _client_timer()
        timer.take()
        wall, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
        reply = app(message, context)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if _SERVER_TIMER is not None:  # the local engine: the server's thread waited for this
            _SERVER_TIMER.add_nested(wall, time.thread_time() - own)
        phases = timer.take()
        row = {
            "pid": os.getpid(),
            "type": message.metadata.message_type,
            "round": _message_round(message),
            "node": context.node_id,
            "seconds": round(wall, 6),
            "cpu_seconds": round(cpu, 6),
            "phases": phases["wall"],
            "phases_cpu": phases["cpu"],
            "threads": torch.get_num_threads(),
        }
        with open(Path(self.log_dir) / f"client-{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        return reply


class ProcessTree:
    """Peak resident memory and CPU seconds of this process and all its descendants.

    Sampled every 0.5 s (a process's CPU is its last sample's; shared pages count
    once per process, so memory is overstated). ``driver_cpu`` is this process's
    own, its threads all together (the server's, Flower's engine and Ray's client).
    """

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self.peak = 0
        self._cpu: dict[int, float] = {}
        self._start = sum(self._me.cpu_times()[:2])
        self.driver_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = 0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak = max(self.peak, total)

    @property
    def cpu(self) -> float:
        """CPU seconds of the whole tree while it was watched."""
        return sum(self._cpu.values()) - self._start

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.5)

    def __enter__(self) -> ProcessTree:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.driver_cpu = sum(self._me.cpu_times()[:2]) - self._start


def run_one(
    engine: str, sites: int, work: Path, rounds: int, timeout: float | None, model: str = "default"
) -> dict[str, Any]:
    """One federation of ``sites`` sites through ``engine``; its timings."""
    from fedseal.common.config import FedConfig
    from fedseal.server.app import run_federation
    from fedseal.simulations.simulate import prepare_sites, simulate
    from simulations.bench.local_grid import RUN_ID, LocalGrid

    out = work / f"{engine}-{sites}"
    logs = out / "timings"
    logs.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "clients": sites,
        "min_clients": sites,
        "rounds": rounds,
        "model": model,
        "out": str(out),
    }
    if timeout:
        settings["timeout"] = timeout
    cfg = FedConfig(**settings)
    app = ProfiledClientApp(str(logs))
    _server_timer().take()
    _SERVER_ROUNDS.clear()
    load_before = os.getloadavg()
    started = time.monotonic()
    with ProcessTree() as tree:
        if engine == "local":
            import torch

            torch.set_num_threads(1)
            cfg = prepare_sites(cfg)
            run_federation(LocalGrid(sites, app=app), cfg, run_id=RUN_ID)
        else:
            simulate(cfg, client_app=app)
    wall = time.monotonic() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    client = [
        json.loads(line)
        for path in sorted(logs.glob("client-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    run = summarise_run(engine, sites, rows, client, list(_SERVER_ROUNDS))
    run.update(
        wall_seconds=round(wall, 1),
        cpu_seconds=round(tree.cpu, 1),
        driver_cpu_seconds=round(tree.driver_cpu, 1),
        peak_rss_mib=round(tree.peak / 2**20),
        load_before=[round(x, 2) for x in load_before],
        load_after=[round(x, 2) for x in os.getloadavg()],
    )
    return run


def _per_site(messages: list[dict], key: str, count: int) -> dict[str, float]:
    """Each phase's seconds (``phases`` or ``phases_cpu``) summed over ``messages``, per site;
    what the handlers spent outside every named phase is ``other``."""
    total_key = "seconds" if key == "phases" else "cpu_seconds"
    phases: dict[str, float] = defaultdict(float)
    for m in messages:
        for name, seconds in m[key].items():
            phases[name] += seconds
        phases["other"] += m[total_key] - sum(m[key].values())
    return {k: round(v / count, 5) for k, v in sorted(phases.items())}


def summarise_run(
    engine: str, sites: int, rows: list[dict], client: list[dict], server: list[dict[str, dict[str, float]]]
) -> dict[str, Any]:
    """Per round: the metrics line's time, a site's phases (wall and CPU), SecAgg+ per site,
    and the server's phases."""
    from fedseal.common.secagg import default_k

    by_round: dict[int, list[dict]] = defaultdict(list)
    for row in client:
        by_round[row["round"] or 0].append(row)
    rounds = []
    for row, server_phases in zip(rows, server):
        messages = by_round.get(row["round"], [])
        train = [m for m in messages if m["type"] == "train"]
        work = train + [m for m in messages if m["type"] == MASKED_INPUT]
        count = max(len(train), 1)
        secagg = {}
        for clock, total, phases in (("wall", "seconds", "phases"), ("cpu", "cpu_seconds", "phases_cpu")):
            stages = {
                t.split(".")[-1]: sum(m[total] for m in messages if m["type"] == t) / count
                for t in SECAGG_STAGES
                if t != MASKED_INPUT
            }
            # the masked-input message also trains: only its masking is SecAgg+'s cost
            stages[MASKED_INPUT.split(".")[-1]] = (
                sum(m[phases].get("secagg masking", 0.0) for m in work) / count
            )
            stages["advert (in train)"] = (
                sum(m[phases].get("secagg keys and encoding", 0.0) for m in train) / count
            )
            secagg[clock] = {
                "per_site": round(sum(stages.values()), 5),
                "stages": {k: round(v, 5) for k, v in stages.items()},
            }
        own = {
            clock: round(sum(v for k, v in server_phases[clock].items() if k != "send and wait"), 3)
            for clock in ("wall", "cpu")
        }
        rounds.append(
            {
                "round": row["round"],
                "seconds": row["seconds"],
                "contributors": len(row["contributors"]),
                "failed": len(row["failed"]),
                "timed_out": len(row.get("timed_out", [])),
                "abandoned": row["abandoned"],
                "accuracy": row["accuracy"],
                "site_messages": len(messages),
                "site_seconds": {
                    "wall": round(sum(m["seconds"] for m in messages), 3),
                    "cpu": round(sum(m["cpu_seconds"] for m in messages), 3),
                },
                "train_per_site": {
                    "wall": _per_site(work, "phases", count),
                    "cpu": _per_site(work, "phases_cpu", count),
                },
                "secagg": secagg,
                "server": {
                    **server_phases,
                    "own": own,
                    "send and wait": round(server_phases["wall"].get("send and wait", 0.0), 3),
                },
            }
        )
    return {
        "engine": engine,
        "sites": sites,
        "k": default_k(sites),
        "round_seconds": [r["seconds"] for r in rounds],
        "client_processes": len({m["pid"] for m in client}),
        "torch_threads_in_clients": sorted({m["threads"] for m in client}),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "rounds": rounds,
    }


def secagg_fit(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """SecAgg+ CPU seconds per site and round against ``k`` (= 2 ceil(log2 n)), per engine.

    Each run's point is the median over its rounds; with two ``k`` or more, the
    least-squares line ``a + b k`` and, between the smallest and the largest
    federation, how much the cost per site grew beside how much ``log2 n`` and
    ``n`` grew.
    """
    import numpy as np

    fits = {}
    for engine in sorted({r["engine"] for r in runs}):
        points = sorted(
            (r["sites"], r["k"], float(np.median([x["secagg"]["cpu"]["per_site"] for x in r["rounds"]])))
            for r in runs
            if r["engine"] == engine and r["rounds"]
        )
        entry: dict[str, Any] = {
            "points": [{"sites": n, "k": k, "cpu_seconds_per_site": round(y, 5)} for n, k, y in points]
        }
        if len({k for _, k, _ in points}) >= 2:
            ks = np.array([k for _, k, _ in points], dtype=float)
            ys = np.array([y for _, _, y in points])
            b, a = np.polyfit(ks, ys, 1)
            (n0, _, y0), (n1, _, y1) = points[0], points[-1]
            entry.update(
                a=round(float(a), 6),
                b_per_neighbour=round(float(b), 6),
                residuals=[round(float(y - (a + b * k)), 6) for k, y in zip(ks, ys)],
                growth={
                    "sites": n1 / n0,
                    "log2_sites": round(np.log2(n1) / np.log2(n0), 3),
                    "cpu_seconds_per_site": round(y1 / y0, 3),
                },
            )
        fits[engine] = entry
    return fits


def plot(report: dict[str, Any], path: Path) -> None:
    """Seconds per round against sites; per-site client phases; SecAgg+ per site against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = report["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for engine, marker in zip(ENGINES, ("o", "s")):
        mine = sorted((r for r in runs if r["engine"] == engine), key=lambda r: r["sites"])
        if not mine:
            continue
        ns = [r["sites"] for r in mine]
        for index, style in ((0, ":"), (-1, "-")):
            ax.plot(
                ns,
                [r["round_seconds"][index] if r["round_seconds"] else np.nan for r in mine],
                marker=marker,
                linestyle=style,
                label=f"{engine}, round {'1 (statistics)' if index == 0 else 'last (training)'}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sites")
    ax.set_ylabel("seconds per round")
    ax.set_title("round time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)

    ax = axes[1]
    labels, stacks = [], defaultdict(list)
    names = sorted({p for r in runs for x in r["rounds"][-1:] for p in x["train_per_site"]["cpu"]})
    for r in sorted(runs, key=lambda r: (r["engine"], r["sites"])):
        if not r["rounds"]:
            continue
        last = r["rounds"][-1]
        labels.append(f"{r['engine']}\n{r['sites']}")
        for name in names:
            stacks[name].append(last["train_per_site"]["cpu"].get(name, 0.0))
        stages = last["secagg"]["cpu"]["stages"]
        # the advert and the masking are phases of the site's work already stacked above
        stacks["secagg stages"].append(
            sum(v for k, v in stages.items() if k not in ("advert (in train)", MASKED_INPUT.split(".")[-1]))
        )
    bottom = np.zeros(len(labels))
    cmap = plt.get_cmap("tab20")
    for i, (name, values) in enumerate(stacks.items()):
        ax.bar(labels, values, bottom=bottom, label=name, color=cmap(i % 20))
        bottom += np.array(values)
    ax.set_ylabel("CPU seconds per site, last round")
    ax.set_title("a site's round, phase by phase")
    ax.legend(fontsize=6, ncol=2)

    ax = axes[2]
    for engine, fit in report["secagg_per_site"].items():
        ks = [p["k"] for p in fit["points"]]
        ax.plot(ks, [p["cpu_seconds_per_site"] * 1e3 for p in fit["points"]], "o", label=engine)
        for p in fit["points"]:
            ax.annotate(f"n={p['sites']}", (p["k"], p["cpu_seconds_per_site"] * 1e3), fontsize=7)
        if "a" in fit:
            grid = np.linspace(min(ks), max(ks), 20)
            ax.plot(grid, (fit["a"] + fit["b_per_neighbour"] * grid) * 1e3, "--")
    ax.set_xlabel("k = 2 ceil(log2 n) neighbours")
    ax.set_ylabel("CPU ms per site and round")
    ax.set_title("SecAgg+ cost per site (advert + 4 stages)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run every (engine, sites), write the JSON (and plot), print it."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sites", default=",".join(map(str, SITES)), help="comma-separated site counts (default 10,100)"
    )
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of local,ray (default both)"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--model", default="default", help="model path or hub name (default: the packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="the run's --timeout (default: fedseal's default)"
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--plot", type=Path, help="where to write the PNG (optional)")
    parser.add_argument(
        "--keep", type=Path, help="run in this folder and keep it (default: a temporary folder)"
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    sites = [int(s) for s in args.sites.split(",")]
    engines = args.engines.split(",")
    if set(engines) - set(ENGINES):
        parser.error(f"unknown engine(s) {sorted(set(engines) - set(ENGINES))}; use local and/or ray")
    setup_bench_logging(args.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "settings": {
            "sites": sites,
            "engines": engines,
            "rounds": args.rounds,
            "model": args.model,
            "cpus": os.cpu_count(),
        },
        "runs": [],
    }
    started = time.monotonic()
    try:
        _run_all(report, sites, engines, args)
    finally:
        uninstall()
    report["secagg_per_site"] = secagg_fit(report["runs"])
    return finish(report, started, args.json, args.plot, plot)


def _run_all(report: dict[str, Any], sites: list[int], engines: list[str], args: argparse.Namespace) -> None:
    """Every (sites, engine) run, in order, each added to ``report`` (and its partial JSON)."""
    with tempfile.TemporaryDirectory(prefix="fedseal-bench-scale-") as tmp:
        work = args.keep or Path(tmp)
        for n in sites:
            for engine in engines:
                log.warning("%s engine, %d sites ...", engine, n)
                run = run_one(engine, n, work, args.rounds, args.timeout, args.model)
                log.warning(
                    "%s engine, %d sites: rounds %s s, wall %.1f s, CPU %.1f s, peak %d MiB, load %s",
                    engine,
                    n,
                    run["round_seconds"],
                    run["wall_seconds"],
                    run["cpu_seconds"],
                    run["peak_rss_mib"],
                    run["load_before"],
                )
                report["runs"].append(run)
                report["secagg_per_site"] = secagg_fit(report["runs"])
                emit_report(report, args.json.with_name(args.json.name + ".partial"), quiet=True)


if __name__ == "__main__":
    # Run as the importable module, not as __main__: Ray pickles __main__'s classes by
    # value (with the timers' thread-locals), and workers must import this one by name.
    sys.path.insert(0, str(ROOT))
    from simulations.bench.scale import main as run

    sys.exit(run())
