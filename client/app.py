"""The ClientApp that runs at each data site: one handler per message, each a few named steps.

A plain round (secure aggregation off), ``train``:
    :func:`~fedseal.client.training.admit` (the run against the site's policy,
    :mod:`fedseal.client.policy`), :func:`~fedseal.client.training.prepare` (the
    data, the model holding the server's weights, the job's budget),
    :func:`~fedseal.client.training.train_round` (train, commit the spend to the
    ledger), :func:`~fedseal.client.reply.train_reply` (built only from the
    committed round, through the declared reply types of :mod:`fedseal.common.egress`).

A secure round (SecAgg+, :mod:`fedseal.client.secagg`):
    ``train``: admit and prepare (nothing is written), keep the server's
    message, and advertise fresh keys; ``train.secagg_share_keys``: share them;
    ``train.secagg_masked_input``: train the kept round now, commit its spend,
    and send ``x + masks``: a round abandoned before this stage (too few sites
    shared keys) costs no site any budget; then ``train.secagg_consistency``
    and ``train.secagg_unmask``. Under ``dp-noise = distributed`` the two
    training steps are :mod:`fedseal.client.ddp_round`'s: the site checks the
    round's noise share against its policy at ``train``, and sends its masked
    noisy share of one DP-SGD step at the masked-input stage.

``evaluate``: :func:`~fedseal.client.evaluation.evaluate_round`, a DP release
of the server's model's scores on the site's data, where the site and the run
allow it.

Every handler answers whatever happens (:func:`~fedseal.client.reply.answered`):
a refusal with a code and public values, its explanation in the site's log.
A round the server asks for again (it crashed in between) is answered with the
update that never left the site, or trained afresh with new, recorded spend
(or refused): never with the same update twice (:mod:`fedseal.client.pending`).

The configuration of the run arrives with every message from the server; the
site's own settings (data, budget, ledger, policy) come from its node config
(:mod:`fedseal.client.site`).
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedseal.client import ddp_round, secagg
from fedseal.client.evaluation import evaluate_round
from fedseal.client.pending import pending_path, release
from fedseal.client.reply import advert_reply, answered, evaluate_reply, masked_reply, train_reply
from fedseal.client.site import ledger_path
from fedseal.client.training import admit, prepare, train_round
from fedseal.common import secagg_wire
from fedseal.common.refusals import Code, Refusal

KEPT = "fedseal.round."  # context.state: the secure round's train message, until it trains

app = ClientApp()


def _deployment_logging(context: Context) -> None:
    """At a real site, show this app's log lines in the agent's output."""
    if "data-path" in context.node_config:
        from fedseal.common.cli_args import setup_logging

        setup_logging()


@app.train()
@answered()
def train(msg: Message, context: Context) -> Message:
    """A plain round: train and send the update. A secure round: check, then advertise keys."""
    _deployment_logging(context)
    asked = admit(msg.content, context)
    prepared = prepare(asked, msg.content, context)
    if asked.cfg.secagg:
        if asked.cfg.dp_noise == "distributed":
            ddp_round.check(asked, prepared, msg.content, context)
        _keep(context, msg.content)
        keys = secagg.begin_round(msg, context, asked.site, asked.job, asked.round)
        return advert_reply(msg, asked.cfg, asked.site, keys)
    committed, update = train_round(asked, prepared, context)
    return train_reply(msg, context, asked.cfg, asked.site, committed, update)


app.train(secagg_wire.SHARE_KEYS)(answered(stage=True, reads_data=False)(secagg.share_keys))


@app.train(secagg_wire.MASKED_INPUT)
@answered(stage=True)
def masked_input(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2: train the kept round now, commit its spend, send it masked."""
    content = _kept(context)
    asked = admit(content, context)
    if (asked.job, asked.round) != secagg.round_of(context):
        raise Refusal(Code.MESSAGE_STAGE, "the kept training message is not this round's")
    routed = secagg.open_routed(msg, context)  # before any spend: bad shares cost nothing
    prepared = prepare(asked, content, context)
    if asked.cfg.dp_noise == "distributed":
        reply = ddp_round.masked_input(msg, context, routed, asked, prepared, content)
    else:
        committed, update = train_round(asked, prepared, context)
        reply = masked_reply(msg, context, routed, asked.cfg, committed, update)
    ledger = ledger_path(context.node_config)
    if ledger is not None:
        release(pending_path(ledger))  # forgotten durably before it leaves, masked
    _forget(context)
    return reply


app.train(secagg_wire.CONSISTENCY)(answered(stage=True, reads_data=False)(secagg.consistency))
app.train(secagg_wire.UNMASK)(answered(stage=True, reads_data=False)(secagg.unmask))


@app.evaluate()
@answered()
def evaluate_site(msg: Message, context: Context) -> Message:
    """Score the server's weights on the site's data, as a DP release, if the site allows it."""
    _deployment_logging(context)
    committed, scores = evaluate_round(msg.content, context)
    return evaluate_reply(msg, committed, scores)


def _keep(context: Context, content: RecordDict) -> None:
    """Keep the secure round's training message (the server's weights, config, parameters)."""
    for name, array in content.array_records.items():
        context.state[KEPT + name] = array
    for name, config in content.config_records.items():
        context.state[KEPT + name] = config


def _kept(context: Context) -> RecordDict:
    """The kept training message, or a refusal if there is none (a restart, a stage out of order)."""
    names = [k for k in context.state.keys() if k.startswith(KEPT)]
    if not names:
        raise Refusal(
            Code.MESSAGE_STAGE,
            "no secure round in progress at this site (it restarted, or the stage arrived out of order)",
        )
    return RecordDict({k[len(KEPT) :]: context.state[k] for k in names})


def _forget(context: Context) -> None:
    for key in [k for k in context.state.keys() if k.startswith(KEPT)]:
        del context.state[key]


__all__ = ["app"]
