"""The ServerApp: one federated fine-tuning run, round by round.

One round, seen from the server:

1. sample sites and send each the global trainable weights and the run's config;
2. sites train with DP-SGD and answer; with secure aggregation (default) the
   server only ever recovers ``sum_i w_i * update_i`` and ``sum_i w_i``
   (:mod:`fedseal.server.secagg`), otherwise it adds plain replies (:mod:`fedseal.server.aggregate`);
3. the strategy (FedAvg or FedAdam, :mod:`fedseal.server.strategy`) turns the weighted
   mean update into the next global weights;
4. central evaluation on the held-out file, one JSON line in
   ``<out>/metrics.jsonl``, a progress line on screen.

After every round the global weights, the strategy's state and the metrics
are checkpointed atomically in ``<out>/checkpoint/`` (:mod:`fedseal.server.checkpoint`).
A deployed server restarted with the same config resumes after the last
completed round; a simulation starts afresh. At the end the global model is
saved with LoRA merged in ``<out>/model/``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedseal.common import egress
from fedseal.common.batches import confusion_matrix, encode, predict, scores_of
from fedseal.common.cli_args import setup_logging
from fedseal.common.config import ALL, AUTO, ConfigError, FedConfig, from_mapping
from fedseal.common.data import read_examples
from fedseal.common.dp_rule import FULL_UNDER_DP, PRIOR_KEY, prior_bias, stats_rounds
from fedseal.common.durable import atomic_write
from fedseal.common.egress import train_reply_type
from fedseal.common.features import features
from fedseal.common.model import (
    build_model,
    count_parameters,
    load_tokenizer,
    load_trainable,
    pick_device,
    save_merged,
    trainable_state,
)
from fedseal.common.records import (
    JOB_KEY,
    ROUND_KEY,
    RecordError,
    config_to_record,
    record_to_state,
    state_to_record,
    to_numpy_state,
)
from fedseal.common.refusals import describe
from fedseal.common.secagg_wire import round_parameters
from fedseal.common.vote import from_votes, is_vote_round, round_clip, round_phase, update_template
from fedseal.common.weights import weight_range
from fedseal.server.aggregate import RoundSums, error_reason, send, sum_plain
from fedseal.server.checkpoint import (
    GROWABLE_KEYS,
    CheckpointError,
    check_resume_config,
    check_resume_phases,
    load_checkpoint,
    save_checkpoint,
)
from fedseal.server.identity import SiteNames, admitted_keys, names_from_nodes
from fedseal.server.metrics import NON_PRIVATE, MetricsLog, TensorBoardLog, eta_seconds, progress_line
from fedseal.server.outcome import run_failure
from fedseal.server.report import write_report
from fedseal.server.strategy import FedAvg, Strategy, make_strategy

log = logging.getLogger("fedseal")  # progress lines and warnings: what a console shows
detail = logging.getLogger("fedseal.run")  # the rest: a simulation's log file, a server's log

CHECKPOINT_DIR = "checkpoint"
JOB_FILE = "job.json"


def wait_for_sites(grid: Grid, cfg: FedConfig, want: int | None = None) -> list[int]:
    """Connected sites, once ``want`` (default ``min_clients``) are there.

    Waits up to ``cfg.timeout``; then goes on with whoever is connected if that
    is at least ``min_clients``, else raises TimeoutError.
    """
    want = max(cfg.min_clients, want or cfg.min_clients)
    deadline = time.monotonic() + cfg.timeout
    announced = False
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= cfg.min_clients:
                log.warning(
                    "%d of %d site(s) connected after %.0fs; going on without the rest",
                    len(nodes),
                    want,
                    cfg.timeout,
                )
                return nodes
            raise TimeoutError(
                f"only {len(nodes)} site(s) connected after {cfg.timeout:.0f}s, "
                f"{cfg.min_clients} needed (min-clients); start more client agents"
            )
        if not announced:
            detail.info("waiting for sites: %d of %d connected", len(nodes), want)
            announced = True
        time.sleep(1.0)


def sample_sites(nodes: list[int], cfg: FedConfig, server_round: int) -> list[int]:
    """Seeded choice of this round's sites."""
    k = min(len(nodes), max(cfg.min_clients, int(np.ceil(cfg.fraction * len(nodes)))))
    rng = np.random.default_rng([cfg.seed, server_round])
    # Choose positions, not ids: node ids use all 64 bits and numpy would round them.
    return sorted(nodes[i] for i in rng.choice(len(nodes), size=k, replace=False))


def job_id(out: Path, resume: bool) -> str:
    """The job's id: kept in ``<out>/checkpoint/job.json`` so a resumed run keeps it.

    Sites key their ledger entries by it, so the steps a site took before a
    server restart count towards the same run's budget afterwards.
    """
    path = out / CHECKPOINT_DIR / JOB_FILE
    if resume and path.is_file():
        try:
            return str(json.loads(path.read_text(encoding="utf-8"))["job_id"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"{path} is unreadable; restore it or delete {path.parent} to start the run afresh"
            ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    job = uuid.uuid4().hex[:16]
    atomic_write(path, json.dumps({"job_id": job}).encode("utf-8"))
    return job


def resume_state(
    out: Path, cfg: FedConfig, weights: dict[str, np.ndarray], strategy: Strategy, metrics: MetricsLog
) -> tuple[int, dict[str, np.ndarray]]:
    """Load ``<out>/checkpoint`` if any; return the last completed round and the weights.

    Under DP the number of rounds may not change on resume: every site
    calibrated its noise for the planned rounds.
    """
    ckpt = load_checkpoint(out / CHECKPOINT_DIR)
    if ckpt is None:
        metrics.rewrite([])
        return 0, weights
    check_resume_config(ckpt.config, cfg.to_dict(), growable=() if cfg.dp else GROWABLE_KEYS)
    if ckpt.round < cfg.rounds:  # a finished run only saves its model: no round trains again
        check_resume_phases(
            ckpt.metrics,
            ckpt.round,
            lambda r: round_phase(cfg, r),
            # Only LP-FT's split under the sum's noise moved before rows recorded their phase.
            require_recorded=cfg.finetune == "lora" and cfg.dp_noise == "distributed",
            saved_rounds=ckpt.config.get("rounds"),
        )
    # safetensors returns names sorted; put them back in the model's order.
    ordered = {k: ckpt.weights[k] for k in weights if k in ckpt.weights}
    ordered.update({k: v for k, v in ckpt.weights.items() if k not in ordered})
    try:
        restored = record_to_state(state_to_record(ordered), weights, what="checkpoint weights")
    except RecordError as exc:
        raise CheckpointError(f"{out / CHECKPOINT_DIR} does not fit this model: {exc}") from None
    try:
        strategy.load_state_dict(ckpt.strategy_state)
    except ValueError as exc:
        raise CheckpointError(
            f"{out / CHECKPOINT_DIR} holds an optimiser state this run cannot use ({exc}); "
            "restore the checkpoint this run wrote, or start afresh without --resume"
        ) from None
    metrics.rewrite(ckpt.metrics)  # drops any row of a round that never completed
    detail.info("resuming after round %d of %d from %s", ckpt.round, cfg.rounds, out / CHECKPOINT_DIR)
    return ckpt.round, dict(restored)


def run_federation(grid: Grid, cfg: FedConfig, run_id: int = 0, resume: bool = False) -> dict:
    """Run all rounds; return the summary that is also written to ``<out>/summary.json``.

    With ``resume``, continue after the last round checkpointed in
    ``<out>/checkpoint`` (same settings required); otherwise start afresh.
    """
    if not cfg.eval:
        raise ConfigError("the server needs a held-out file for central evaluation: set --eval")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_examples = read_examples(
        cfg.eval, text_column=cfg.text_column, label_column=cfg.label_column, label_names=cfg.labels or None
    )
    if not cfg.labels:
        cfg = cfg.replace(labels=list(eval_examples.label_names))
    if cfg.eval_max_examples != ALL:
        eval_examples = eval_examples.subset(range(min(cfg.eval_max_examples, len(eval_examples))))
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, cfg.labels)
    eval_data = encode(tokenizer, eval_examples, cfg.max_length)
    # Under the probe the encoder never changes: the held-out features once, the head each round.
    eval_features = held_out_cache(model, eval_data, cfg, device)
    weights = to_numpy_state(trainable_state(model))
    strategy = make_strategy(cfg)
    metrics = MetricsLog(out / "metrics.jsonl")
    done = 0
    if resume:
        done, weights = resume_state(out, cfg, weights, strategy, metrics)
        load_trainable(model, weights)  # saved as is if every round was done
    else:
        metrics.rewrite([])
    job = job_id(out, resume=resume)
    trainable, total = count_parameters(model)
    detail.info(
        "model %s: %d of %d parameters trainable (%s); labels %s",
        cfg.model,
        trainable,
        total,
        cfg.finetune,
        list(cfg.labels),
    )
    if not cfg.dp:
        log.warning(NON_PRIVATE)
    elif cfg.finetune == "full":
        log.warning(FULL_UNDER_DP)
    if not cfg.secagg:
        log.warning("secure aggregation is OFF (--no-secagg): the server sees each site's update")
    detail.info("watch progress in %s", metrics.path)

    board = (
        TensorBoardLog(cfg.tensorboard, first_round=done + 1, private=cfg.dp, settings=cfg.to_dict())
        if cfg.tensorboard
        else None
    )
    logits = None  # the last round's, for the confusion matrix
    names = SiteNames()
    admitted = admitted_keys(cfg.roster) if cfg.roster else {}
    if done >= cfg.rounds:
        detail.info("all %d rounds were already completed; saving the model", cfg.rounds)
    for server_round in range(done + 1, cfg.rounds + 1):
        started = time.monotonic()
        # The first round of this process waits for every expected site (up to
        # the timeout); later rounds go on with whoever is connected.
        want = cfg.clients if server_round == done + 1 else cfg.min_clients
        nodes = sample_sites(wait_for_sites(grid, cfg, want), cfg, server_round)
        if admitted:
            names.authenticate(names_from_nodes(grid.get_nodes(), admitted))
        detail.info("round %d/%d: %d site(s) training", server_round, cfg.rounds, len(nodes))
        content = round_content(weights, cfg, job, server_round)
        template = update_template(weights, cfg, server_round)
        vote_scale = None
        if cfg.dp_noise == "distributed":  # one DP-SGD step over all sites (docs/ddp.md)
            from fedseal.server.ddp_round import ddp_round

            weights, sums = ddp_round(
                grid, nodes, content, weights, cfg, run_id, server_round, names, strategy
            )
        elif cfg.secagg:
            from fedseal.server.secagg import secure_round

            sums = secure_round(grid, nodes, content, template, cfg, run_id, server_round, names)
        else:
            replies, sent = send(grid, nodes, content, "train", cfg.timeout)
            sums = sum_plain(
                replies,
                template,
                RoundSums(bytes_sent=sent),
                train_reply_type(cfg, server_round),
                names,
                weight_range(cfg, server_round),
                round_clip(cfg, server_round),
            )
        if cfg.dp_noise == "local":
            weights, vote_scale = next_weights(weights, sums, cfg, strategy, server_round)
        load_trainable(model, weights)
        model.to(device)
        logits = held_out_logits(model, eval_data, eval_features, cfg, device)
        scores = scores_of(logits, eval_data.tensors[2].to(device), len(cfg.labels))
        row = {
            "round": server_round,
            "phase": round_phase(cfg, server_round),
            **scores,
            "epsilon": sums.epsilons if cfg.dp else {},
            "delta": sums.deltas if cfg.dp else {},
            "private": cfg.dp,
            "secagg": cfg.secagg,
            "contributors": sums.contributors,
            "refused": sums.refused,
            "failed": sums.failed,
            "timed_out": sums.timed_out,
            "abandoned": sums.abandoned,
            "bytes_sent": sums.bytes_sent,
            "bytes_received": sums.bytes_received,
            "seconds": round(time.monotonic() - started, 3),
        }
        if vote_scale is not None:
            row["vote_scale"] = vote_scale
        if not cfg.dp:
            row["privacy"] = NON_PRIVATE
        if cfg.federated_eval:
            row["federated_eval"] = federated_evaluate(grid, nodes, weights, cfg, job, server_round, names)
        metrics.append(row)
        save_checkpoint(
            out / CHECKPOINT_DIR, server_round, weights, strategy.state_dict(), metrics.rows(), cfg.to_dict()
        )
        if board is not None:
            board.append(row)
        log.info(
            progress_line(row, cfg.rounds, cfg.epsilon, cfg.dp, eta=eta_seconds(metrics.rows(), cfg.rounds))
        )
    if board is not None:
        board.close()

    final_confusion = confusion(model, eval_data, eval_features, cfg, device, logits)
    model_dir = save_merged(model, tokenizer, out / "model")
    rows = metrics.rows()
    summary = {
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "final_macro_f1": rows[-1]["macro_f1"] if rows else None,
        "rounds": len(rows),
        "epsilon_max": max((max(r["epsilon"].values()) for r in rows if r["epsilon"]), default=None),
        "failed": run_failure(rows, stats_rounds(cfg)),
        "settings_used": settings_used(cfg),
        "run_id": run_id,
        "seconds": round(sum(r.get("seconds", 0.0) for r in rows), 1),
        "private": cfg.dp,
        "secagg": cfg.secagg,
        "model_dir": str(model_dir),
        "metrics": str(metrics.path),
        "config": cfg.to_dict(),
        "confusion": final_confusion,
    }
    if not cfg.dp:
        summary["privacy"] = NON_PRIVATE
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if summary["failed"]:
        log.error("the run FAILED: %s", summary["failed"])
    detail.info("done: model in %s, metrics in %s", model_dir, metrics.path)
    try:
        detail.info("report: %s", write_report(out))
    except Exception as exc:  # noqa: BLE001 - the finished run must not fail over its report
        log.warning(
            "could not write %s (%s: %s); the run's outputs are complete, retry with: fedseal report %s",
            out / "report.html",
            type(exc).__name__,
            exc,
            out,
        )
    return summary


def settings_used(cfg: FedConfig) -> dict[str, object]:
    """The values the server used for the run's ``auto`` settings it decides.

    The training settings a site uses under ``auto`` (``lr``, ``batch-size``,
    ``local-steps``, ``max-grad-norm``) follow each site's size bucket
    (:func:`fedseal.common.dp_rule.recipe`) and are not the server's to report.
    """
    used: dict[str, object] = {}
    if cfg.server_lr == AUTO:
        used["server_lr"] = cfg.effective_server_lr
    if cfg.secagg and AUTO in (cfg.secagg_k, cfg.secagg_threshold):
        k, threshold = round_parameters(cfg, cfg.clients)
        used["secagg_k"] = f"{k} for a round of {cfg.clients} sites"
        used["secagg_threshold"] = f"{threshold} for a round of {cfg.clients} sites"
    return used


def round_content(weights: dict[str, np.ndarray], cfg: FedConfig, job: str, server_round: int) -> RecordDict:
    """What the server sends every site in round ``server_round``: the global weights and the
    run's config, naming the job and the round."""
    return RecordDict(
        {
            "global": state_to_record(weights),
            "config": config_to_record(cfg, **{ROUND_KEY: server_round, JOB_KEY: job}),
        }
    )


def next_weights(
    weights: dict[str, np.ndarray], sums: RoundSums, cfg: FedConfig, strategy: Strategy, server_round: int
) -> tuple[dict[str, np.ndarray], float | None]:
    """The global weights after round ``server_round``, and the vote round's scale (else None).

    Unchanged when no site contributed.
    """
    mean, vote_scale = sums.mean_update(), None
    if mean is not None and is_vote_round(cfg, server_round):
        mean, vote_scale = from_votes(mean, cfg.update_clip)
    if mean is None:
        log.warning("round %d: no site contributed; the global model is unchanged", server_round)
    elif server_round <= stats_rounds(cfg):
        # The sites' feature means and label proportions: their plain average,
        # whatever the strategy (a server optimiser's state is for training
        # rounds only); the proportions become the head's bias, the log prior.
        weights = FedAvg(1.0).step(weights, mean)
        weights[PRIOR_KEY] = prior_bias(weights[PRIOR_KEY])
    else:
        weights = strategy.step(weights, mean)
    return weights, vote_scale


def held_out_cache(model, data, cfg: FedConfig, device):
    """What the held-out data's logits start from each round, computed once: the probe's
    features, LP-FT's states below its adapters (float32), or None (the whole model runs)."""
    if cfg.finetune == "probe":
        return features(model, data, device)
    if cfg.finetune == "lora":
        import torch

        from fedseal.common.hidden_cache import hidden_states
        from fedseal.common.top_layers import adapted_layers, encoder_layers

        cut = len(encoder_layers(model.backbone)) - adapted_layers(model)
        return hidden_states(model, data, cut, device, storage=torch.float32)
    return None


def held_out_logits(model, data, data_features, cfg: FedConfig, device):
    """The global model's logits on the server's held-out data.

    With ``data_features`` (:func:`held_out_cache`: the probe's pooled features, or
    LP-FT's cached states), only the head, or the layers above the cut, run;
    otherwise the whole model.
    """
    if data_features is None:
        return predict(model, data, batch_size=cfg.eval_batch_size, device=device)
    import torch

    from fedseal.common.hidden_cache import HiddenStates, cached_logits

    if isinstance(data_features, HiddenStates):
        return cached_logits(model, data_features, device, cfg.eval_batch_size)

    with torch.no_grad():
        return model.head(data_features.to(device))


def confusion(model, data, data_features, cfg: FedConfig, device, logits=None) -> dict:
    """The final model's confusion matrix on the held-out data, for the report.

    ``matrix[g][p]`` counts examples of gold label ``labels[g]`` predicted as
    ``labels[p]``. ``logits`` are the last round's, when this process ran one.
    """
    if logits is None:
        logits = held_out_logits(model, data, data_features, cfg, device)
    pred = logits.argmax(dim=-1).cpu().numpy()
    return {
        "labels": list(cfg.labels),
        "matrix": confusion_matrix(data.tensors[2].numpy(), pred, len(cfg.labels)),
    }


def federated_evaluate(
    grid: Grid, nodes: list[int], weights, cfg: FedConfig, job: str, server_round: int, names: SiteNames
) -> dict:
    """Ask sites to score the global weights on their own data; the mean over sites that answer.

    Sites answer only if they turned federated evaluation on, once per round
    they trained in, with a DP release of accuracy and loss (no example count);
    refusals and malformed replies are logged.
    """
    replies, _ = send(grid, nodes, round_content(weights, cfg, job, server_round), "evaluate", cfg.timeout)
    scores = []
    for reply in replies:
        site = names.of(reply)
        try:
            if reply.has_error():
                raise egress.ReplyError(egress.REPLY_ERROR, error_reason(reply))
            site = names.claim(reply)
            refused = egress.refusal_of(reply)
            if refused is not None:
                log.warning("site %s gave no federated evaluation: %s", site, describe(*refused))
                continue
            scores.append(egress.parse(egress.EVALUATION, reply)[egress.METRICS])
        except egress.ReplyError as exc:
            log.warning("site %s gave no federated evaluation: %s", site, exc)
    return {k: float(np.mean([m[k] for m in scores])) for k in ("accuracy", "loss")} if scores else {}


def make_server_app(cfg: FedConfig | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg``, or reading Flower's run config when ``cfg`` is None."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:  # a simulation: always a fresh run
            run_federation(grid, cfg, run_id=context.run_id)
        else:  # a deployment: a restarted server resumes its checkpoint
            setup_logging()  # the ServerApp process: show fedseal's progress in `flwr log`
            run_cfg = from_mapping(context.run_config, source="the Flower run config")
            run_federation(grid, run_cfg, run_id=context.run_id, resume=True)

    return server_app


app = make_server_app()

__all__ = ["app", "federated_evaluate", "make_server_app", "next_weights", "round_content", "run_federation"]
