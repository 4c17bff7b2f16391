"""The ServerApp: one federated fine-tuning run, round by round.

One round, seen from the server:

1. sample sites and send each the global trainable weights and the run's config;
2. sites train with DP-SGD and answer; with secure aggregation (default) the
   server only ever recovers ``sum_i w_i * update_i`` and ``sum_i w_i``
   (:mod:`server.secagg`), otherwise it adds plain replies (:mod:`server.aggregate`);
3. the strategy (FedAvg or FedAdam, :mod:`server.strategy`) turns the weighted
   mean update into the next global weights;
4. central evaluation on the held-out file, one JSON line in
   ``<out>/metrics.jsonl``, a progress line on screen.

At the end the global model is saved with LoRA merged in ``<out>/model/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.batches import encode, evaluate
from common.config import ConfigError, FedConfig, from_mapping
from common.data import read_examples
from common.model import (build_model, count_parameters, load_tokenizer, load_trainable,
                          pick_device, save_merged, trainable_state)
from common.records import config_to_record, state_to_record, to_numpy_state
from server.aggregate import RoundSums, send, site_of, sum_plain
from server.metrics import NON_PRIVATE, MetricsLog, progress_line
from server.strategy import make_strategy

log = logging.getLogger("fedseal")

ROUND_KEY = "server-round"


def wait_for_sites(grid: Grid, cfg: FedConfig) -> list[int]:
    """Block until ``cfg.min_clients`` sites are connected (or ``cfg.timeout`` passes)."""
    deadline = time.monotonic() + cfg.timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.min_clients:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} site(s) connected after {cfg.timeout:.0f}s, "
                f"{cfg.min_clients} needed (min-clients); start more client agents"
            )
        time.sleep(1.0)


def sample_sites(nodes: list[int], cfg: FedConfig, server_round: int) -> list[int]:
    """Seeded choice of this round's sites."""
    k = min(len(nodes), max(cfg.min_clients, int(np.ceil(cfg.fraction * len(nodes)))))
    rng = np.random.default_rng([cfg.seed, server_round])
    # Choose positions, not ids: node ids use all 64 bits and numpy would round them.
    return sorted(nodes[i] for i in rng.choice(len(nodes), size=k, replace=False))


def run_federation(grid: Grid, cfg: FedConfig, run_id: int = 0) -> dict:
    """Run all rounds; return the summary that is also written to ``<out>/summary.json``."""
    if not cfg.eval:
        raise ConfigError("the server needs a held-out file for central evaluation: set --eval")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_examples = read_examples(cfg.eval, text_column=cfg.text_column,
                                  label_column=cfg.label_column, label_names=cfg.labels or None)
    if not cfg.labels:
        cfg = cfg.replace(labels=list(eval_examples.label_names))
    if cfg.eval_max_examples:
        eval_examples = eval_examples.subset(range(min(cfg.eval_max_examples, len(eval_examples))))
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, cfg.labels)
    eval_data = encode(tokenizer, eval_examples, cfg.max_length)
    weights = to_numpy_state(trainable_state(model))
    strategy = make_strategy(cfg)
    metrics = MetricsLog(out / "metrics.jsonl")
    trainable, total = count_parameters(model)
    log.info("model %s: %d of %d parameters trainable (%s); labels %s", cfg.model, trainable,
             total, cfg.finetune, list(cfg.labels))
    if not cfg.dp:
        log.warning(NON_PRIVATE)
    if not cfg.secagg:
        log.warning("secure aggregation is OFF (--no-secagg): the server sees each site's update")
    log.info("watch progress in %s", metrics.path)

    for server_round in range(1, cfg.rounds + 1):
        started = time.monotonic()
        nodes = sample_sites(wait_for_sites(grid, cfg), cfg, server_round)
        log.info("round %d/%d: %d site(s) training", server_round, cfg.rounds, len(nodes))
        content = RecordDict({"global": state_to_record(weights),
                              "config": config_to_record(cfg, **{ROUND_KEY: server_round})})
        if cfg.secagg:
            from server.secagg import secure_round

            sums = secure_round(grid, nodes, content, weights, cfg, run_id, server_round)
        else:
            replies, sent = send(grid, nodes, content, "train", cfg.timeout)
            sums = sum_plain(replies, weights, RoundSums(bytes_sent=sent))
        mean = sums.mean_update()
        if mean is None:
            log.warning("round %d: no site contributed; the global model is unchanged", server_round)
        else:
            weights = strategy.step(weights, mean)
        load_trainable(model, weights)
        model.to(device)
        scores = evaluate(model, eval_data, batch_size=cfg.eval_batch_size,
                          num_labels=len(cfg.labels), device=device)
        row = {
            "round": server_round,
            **scores,
            "epsilon": sums.epsilons if cfg.dp else {},
            "private": cfg.dp,
            "secagg": cfg.secagg,
            "contributors": sums.contributors,
            "refused": sums.refused,
            "failed": sums.failed,
            "abandoned": sums.abandoned,
            "bytes_sent": sums.bytes_sent,
            "bytes_received": sums.bytes_received,
            "seconds": round(time.monotonic() - started, 3),
        }
        if not cfg.dp:
            row["privacy"] = NON_PRIVATE
        if cfg.federated_eval:
            row["federated_eval"] = federated_evaluate(grid, nodes, weights, cfg)
        metrics.append(row)
        log.info(progress_line(row, cfg.rounds, cfg.epsilon, cfg.dp))

    model_dir = save_merged(model, tokenizer, out / "model")
    rows = metrics.rows()
    summary = {
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "final_macro_f1": rows[-1]["macro_f1"] if rows else None,
        "rounds": len(rows),
        "epsilon_max": max((max(r["epsilon"].values()) for r in rows if r["epsilon"]), default=None),
        "private": cfg.dp,
        "secagg": cfg.secagg,
        "model_dir": str(model_dir),
        "metrics": str(metrics.path),
        "config": cfg.to_dict(),
    }
    if not cfg.dp:
        summary["privacy"] = NON_PRIVATE
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info("done: model in %s, metrics in %s", model_dir, metrics.path)
    return summary


def federated_evaluate(grid: Grid, nodes: list[int], weights, cfg: FedConfig) -> dict:
    """Ask sites to score the global weights on their own data; example-weighted mean."""
    content = RecordDict({"global": state_to_record(weights), "config": config_to_record(cfg)})
    replies, _ = send(grid, nodes, content, "evaluate", cfg.timeout)
    totals, count = {"accuracy": 0.0, "loss": 0.0}, 0
    for reply in replies:
        if reply.has_error():
            log.warning("federated evaluation failed at site %s", site_of(reply))
            continue
        m = reply.content["metrics"]
        n = int(m["num-examples"])
        for k in totals:
            totals[k] += float(m[k]) * n
        count += n
    return {k: v / count for k, v in totals.items()} if count else {}


def make_server_app(cfg: FedConfig | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg``, or reading Flower's run config when ``cfg`` is None."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or from_mapping(context.run_config, source="the Flower run config")
        run_federation(grid, run_cfg, run_id=context.run_id)

    return server_app


app = make_server_app()

__all__ = ["app", "make_server_app", "run_federation"]
