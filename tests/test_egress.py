"""What leaves a site: every field declared, nothing read from its files, no exact count.

Real ClientApp and ServerApp over the in-process grid with a tiny BERT. The
server here is hostile: it points every setting it controls at the site's data
(the text column as labels, guessed labels, the site's own paths as the model,
absurd sizes), and the test looks for a canary planted in the site's data (its
texts, a stray label, its column names, its folder) in every byte of every
reply, and in every file the stock server writes.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from recording import Recording

from fedseal.common import egress
from fedseal.common.config import FedConfig
from fedseal.common.data import Examples, write_examples
from fedseal.common.model import build_model, trainable_state
from fedseal.common.records import JOB_KEY, ROUND_KEY, config_to_record, state_to_record, to_numpy_state
from fedseal.common.refusals import Code
from fedseal.common.vote import update_template
from fedseal.server.app import run_federation
from fedseal.simulations.simulate import prepare_sites
from simulations.bench.local_grid import RUN_ID, LocalGrid

ROOT = Path(__file__).resolve().parent.parent
CANARY = "zq7CANARYx3v"
LABELS = ("negative", "positive")


def _reply_bytes(reply: Message) -> bytes:
    """Every byte a reply's records carry (texts, bytes, numbers, arrays)."""
    out = []
    if reply.has_error():
        out.append(reply.error.reason.encode())
        return b"".join(out)
    content = reply.content
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        for key, value in record.items():
            out.append(str(key).encode())
            values = value if isinstance(value, list) else [value]
            out += [v if isinstance(v, bytes) else str(v).encode() for v in values]
    for name, record in content.array_records.items():
        out.append(name.encode())
        out += [k.encode() + bytes(a.data) for k, a in record.items()]
    return b"".join(out)


def _examples(n: int, *, text: str = "a fine day", stray: str | None = None) -> Examples:
    texts = [f"{text} {i % 7}" for i in range(n)]
    labels = [i % 2 for i in range(n)]
    ex = Examples(texts, labels, LABELS, "test")
    if stray is None:
        return ex
    return Examples(texts + [text], labels + [2], (*LABELS, stray), "test")


def _write(examples: Examples, path: Path, text_column: str, label_column: str) -> Path:
    return write_examples(examples, path, text_column=text_column, label_column=label_column)


@pytest.fixture
def canary_sites(tmp_path, tiny_bert):
    """Two deployed-style sites whose data carries the canary everywhere a site's data can."""
    folder = tmp_path / f"data-{CANARY}"
    text_col, label_col = f"text{CANARY}", f"label{CANARY}"
    good = _write(_examples(96, text=f"{CANARY} is here"), folder / f"{CANARY}-a.jsonl", text_col, label_col)
    bad = _write(
        _examples(96, text=f"{CANARY} too", stray=f"{CANARY}-label"),
        folder / f"{CANARY}-b.jsonl",
        text_col,
        label_col,
    )
    (tmp_path / "secrets").mkdir()
    nodes = [
        {
            "data-path": str(path),
            "site-name": name,
            "epsilon": 8.0,
            "delta": 1e-5,
            "ledger-path": str(tmp_path / f"{name}-ledger.json"),
            "ledger-key": str(tmp_path / "secrets" / f"{name}.key"),
            "device": "cpu",
            "require-secagg": False,
            "min-cohort": 2,
            "max-colluders": 0,
            "federated-eval": "on",
            "allow-model": tiny_bert,
            "labels": ",".join(LABELS),
            "text-column": text_col,
            "label-column": label_col,
        }
        for name, path in (("alpha", good), ("beta", bad))
    ]
    write_examples(_examples(32), tmp_path / "eval.jsonl")
    cfg = FedConfig(
        model=tiny_bert,
        labels=LABELS,
        clients=2,
        min_clients=2,
        rounds=2,
        max_length=16,
        secagg=False,
        federated_eval=True,
        eval=str(tmp_path / "eval.jsonl"),
        out=str(tmp_path / "out"),
    )
    return cfg, nodes, folder


HOSTILE = {
    "label column is the text column": dict(text_column="label", label_column="sentence"),
    "guessed labels": dict(labels=("negative",)),
    "guessed labels, one more": dict(labels=(*LABELS, "neutral")),
    "model is the site's data folder": "folder",
    "model is the site's data file": "file",
    "absurd max-length": dict(max_length=10**9),
    "absurd local steps": dict(local_steps=10**9),
    "absurd eval batch": dict(eval_batch_size=10**9),
    "batch of one": dict(batch_size=1),
    "an honest run": dict(),
}


def _hostile_config(cfg: FedConfig, attack: str, nodes: list[dict], folder: Path) -> FedConfig:
    change = HOSTILE[attack]
    if change == "folder":
        change = dict(model=str(folder))
    elif change == "file":
        change = dict(model=nodes[0]["data-path"])
    return cfg.replace(**change)


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_no_byte_of_the_sites_data_reaches_a_hostile_server(canary_sites, attack):
    """Train (statistics and training rounds) and evaluate under each hostile config."""
    cfg, nodes, folder = canary_sites
    hostile = _hostile_config(cfg, attack, nodes, folder)
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    grid = Recording(2, node_configs=nodes)
    for message_type, server_round in (("train", 1), ("evaluate", 1), ("train", 2)):
        content = _content(hostile, weights, server_round)
        grid.send_and_receive(
            [Message(content, dst_node_id=n, message_type=message_type) for n in grid.nodes]
        )
    assert len(grid.replies) == 6
    for kind, server_round, reply in grid.replies:
        assert not reply.has_error()
        assert CANARY.encode() not in _reply_bytes(reply), (attack, kind, server_round)
    codes = {egress.refusal_of(r)[0] for _, _, r in grid.replies if egress.refusal_of(r)}
    if attack in ("an honest run", "batch of one", "label column is the text column"):
        # The good site trains and answers; the other refuses its data, with a code alone.
        assert codes <= {Code.SITE_DATA.value, Code.ROUND_NOT_TRAINED.value}, codes
        assert sum(egress.refusal_of(r) is None for _, _, r in grid.replies) == 3
    else:
        assert codes <= {Code.POLICY_LABELS.value, Code.POLICY_MODEL.value, Code.POLICY_SIZE.value}, codes
        assert len(codes) == 1


def _secure_canary_sites(cfg: FedConfig, nodes: list[dict], tmp_path: Path) -> tuple[FedConfig, list[dict]]:
    """The canary sites, two more good ones, each with a signing key and the roster, under
    secure aggregation and distributed noise (a round of four withstands beta's refusal)."""
    more = []
    for name in ("gamma", "omega"):
        node = dict(
            nodes[0],
            **{
                "site-name": name,
                "ledger-path": str(tmp_path / f"{name}-ledger.json"),
                "ledger-key": str(tmp_path / "secrets" / f"{name}.key"),
            },
        )
        node["data-path"] = str(
            _write(
                _examples(96, text=f"{CANARY} {name}"),
                Path(nodes[0]["data-path"]).with_name(f"{CANARY}-{name}.jsonl"),
                *(node[k] for k in ("text-column", "label-column")),
            )
        )
        more.append(node)
    nodes = [*nodes, *more]
    keys = prepare_sites(
        FedConfig(model=cfg.model, clients=len(nodes), labels=LABELS, out=str(tmp_path / "keys"))
    )
    sites = Path(keys.out) / "sites"
    nodes = [
        dict(node, **{"identity-key": str(sites / f"site-{i}.key"), "peers": str(sites / "peers.pub")})
        for i, node in enumerate(nodes)
    ]
    return cfg.replace(
        clients=len(nodes),
        min_clients=2,
        secagg=True,
        dp_noise="distributed",
        max_colluders=0,
        federated_eval=False,
    ), nodes


@pytest.mark.parametrize("dp_noise", ["local", "distributed"])
def test_the_stock_server_writes_no_byte_of_the_sites_data(canary_sites, tmp_path, dp_noise):
    """A whole run against a site whose data is refused: metrics, report, summary, logs, and
    every reply (under distributed noise: the keys, the masked noisy shares, the unmasking)."""
    cfg, nodes, _ = canary_sites
    if dp_noise == "distributed":
        cfg, nodes = _secure_canary_sites(cfg, nodes, tmp_path)
    grid = Recording(len(nodes), node_configs=nodes)
    run_federation(grid, cfg, run_id=RUN_ID)
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert all(row["refused"]["beta"].startswith(Code.SITE_DATA.value) for row in rows)
    if dp_noise == "distributed":
        assert all(row["contributors"] == ["alpha", "gamma", "omega"] for row in rows)
    kinds = {kind for kind, _, _ in grid.replies}
    assert dp_noise == "local" or "train.secagg_masked_input" in kinds
    for kind, server_round, reply in grid.replies:
        assert CANARY.encode() not in _reply_bytes(reply), (kind, server_round)
    written = [p for p in Path(cfg.out).rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in written)
    for path in written:
        assert CANARY.encode() not in path.read_bytes(), path


def _reply_type(message_type: str, reply: Message, cfg: FedConfig, server_round: int):
    if egress.refusal_of(reply) is not None:
        return egress.REFUSAL_REPLY
    if message_type == "evaluate":
        return egress.EVALUATION
    stages = {
        f"train.{stage}": t
        for stage, t in (
            ("secagg_share_keys", egress.SECAGG_SHARE_KEYS),
            ("secagg_masked_input", egress.SECAGG_MASKED_INPUT),
            ("secagg_consistency", egress.SECAGG_CONSISTENCY),
            ("secagg_unmask", egress.SECAGG_UNMASK),
        )
    }
    return stages.get(message_type) or egress.train_reply_type(cfg, server_round)


def test_every_reply_the_real_site_sends_is_exactly_its_declared_type(tmp_path, tiny_bert):
    """Plain and secure runs with federated evaluation: every reply type occurs, each parses
    strictly (an undeclared record or field fails), and nothing but the declared types occur."""
    seen = set()
    runs = [
        dict(secagg=False),
        dict(secagg=True),
        dict(secagg=False, aggregation="mean"),
        dict(secagg=True, dp_noise="distributed", max_colluders=0, local_steps="auto", federated_eval=False),
    ]
    for i, run in enumerate(runs):  # vote rounds, SecAgg+ stages, plain rounds, distributed noise
        settings = dict(
            model=tiny_bert,
            clients=3,
            min_clients=2,
            rounds=2,
            max_length=8,
            local_steps=2,
            federated_eval=True,
            out=str(tmp_path / f"run-{i}"),
        )
        cfg = prepare_sites(FedConfig(**{**settings, **run}))
        grid = Recording(3)
        run_federation(grid, cfg, run_id=RUN_ID)
        weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
        for message_type, server_round, reply in grid.replies:
            reply_type = _reply_type(message_type, reply, cfg, server_round)
            length = (
                reply.content["masked"]["y"].shape[0] if reply_type is egress.SECAGG_MASKED_INPUT else None
            )
            egress.parse(
                reply_type, reply, template=update_template(weights, cfg, server_round), ring_length=length
            )
            seen.add(reply_type.name)
    # A refusal occurs too: ask a site to score a round it never trained.
    grid = Recording(3)
    cfg = cfg.replace(secagg=False, dp_noise="local", federated_eval=True)
    weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
    [reply] = grid.send_and_receive(
        [Message(_content(cfg, weights, 9), dst_node_id=grid.nodes[0], message_type="evaluate")]
    )
    assert egress.refusal_of(reply)[0] == Code.ROUND_NOT_TRAINED.value
    egress.parse(egress.REFUSAL_REPLY, reply)
    seen.add("refusal")
    assert seen == {t.name for t in egress.REPLY_TYPES}


def _content(cfg: FedConfig, weights, server_round: int, job: str = "job-1") -> RecordDict:
    return RecordDict(
        {
            "global": state_to_record(weights),
            "config": config_to_record(cfg, **{ROUND_KEY: server_round, JOB_KEY: job}),
        }
    )


def _public(reply_type: egress.ReplyType, reply: Message) -> dict:
    """The reply's fields the schema calls public (what may depend on the size bucket only)."""
    assert egress.refusal_of(reply) is None, egress.refusal_of(reply)
    values = egress.parse(reply_type, reply, only=(egress.METRICS, egress.STATUS))
    return {
        (f.record, f.key): values[f.record].get(f.key)
        for f in reply_type.fields
        if f.kind is egress.Kind.PUBLIC and f.record != egress.STATUS
    }


ALL_MODES = (("probe", 1), ("probe", 2), ("lora", 1), ("lora", 3), ("full", 1))
PROBE = (("probe", 1), ("probe", 2))


@pytest.mark.parametrize(
    "n, modes",
    [
        (100, ALL_MODES),
        (1000, ALL_MODES),
        (70_000, PROBE),  # above 32,768 the probe's rate is capped by its batch of 8,192
    ],
)
def test_sites_of_n_and_n_plus_one_examples_send_identical_metadata(tmp_path, tiny_bert, n, modes):
    """Everything public in a reply depends on the size bucket only (n and n + 1 share it)."""
    base = FedConfig(
        model=tiny_bert,
        labels=LABELS,
        clients=2,
        min_clients=2,
        rounds=2,
        max_length=8,
        local_steps=2,
        secagg=False,
        delta=1e-6,
        out=str(tmp_path / "out"),
    )
    prepare_sites(base)  # the sites' keys and roster (the data files are replaced below)
    for mode, server_round in modes:
        cfg = base.replace(finetune=mode, rounds=3 if mode == "lora" else 2)  # 3: an adapter round
        sites = Path(cfg.out) / "sites"
        write_examples(_examples(n), sites / "site-0.jsonl")
        write_examples(_examples(n + 1), sites / "site-1.jsonl")
        grid = LocalGrid(2)
        weights = to_numpy_state(trainable_state(build_model(cfg, cfg.labels)))
        content = _content(cfg, weights, server_round, job=f"{mode}-{server_round}")
        messages = [Message(content, dst_node_id=node, message_type="train") for node in grid.nodes]
        replies = grid.send_and_receive(messages)
        reply_type = egress.train_reply_type(cfg, server_round)
        small, large = (_public(reply_type, r) for r in replies)
        assert small == large, (mode, server_round)
        assert small[(egress.METRICS, "sample-rate")] > 0


@pytest.mark.parametrize("n, finetune", [(100, "probe"), (1000, "probe"), (100, "lora")])
def test_sites_of_n_and_n_plus_one_send_identical_metadata_under_distributed_noise(
    tmp_path, tiny_bert, n, finetune
):
    """The masked noisy shares' public numbers (epsilon, steps, the mechanism's noise
    multiplier, the rate) depend on the size bucket and the round's public encoding only:
    in the probe's rounds and in LP-FT's adapter round (round 3)."""
    rounds = 3 if finetune == "lora" else 2
    cfg = prepare_sites(
        FedConfig(
            model=tiny_bert,
            labels=LABELS,
            finetune=finetune,
            clients=2,
            min_clients=2,
            rounds=rounds,
            max_length=8,
            dp_noise="distributed",
            max_colluders=0,
            delta=1e-6,
            out=str(tmp_path / "out"),
        )
    )
    sites = Path(cfg.out) / "sites"
    write_examples(_examples(n), sites / "site-0.jsonl")
    write_examples(_examples(n + 1), sites / "site-1.jsonl")
    cfg = cfg.replace(eval=str(write_examples(_examples(32), tmp_path / "eval.jsonl")))
    grid = Recording(2)
    run_federation(grid, cfg, run_id=RUN_ID)
    for server_round in range(1, rounds + 1):
        small, large = (
            _public(egress.SECAGG_MASKED_INPUT, reply)
            for kind, r, reply in grid.replies
            if kind == "train.secagg_masked_input" and r == server_round
        )
        assert small == large, server_round
        assert small[(egress.METRICS, "steps")] == server_round


def test_a_secure_round_sends_the_same_public_metadata_as_a_plain_one():
    """Under SecAgg+ the keys carry none; the masked input carries exactly the plain reply's
    public numbers (the same committed round's), so the n/n+1 test above covers it too."""

    def public(reply_type):
        return {(f.record, f.key) for f in reply_type.fields if f.kind is egress.Kind.PUBLIC}

    assert public(egress.SECAGG_ADVERT) == {(egress.STATUS, "site"), (egress.STATUS, "private")}
    assert public(egress.SECAGG_MASKED_INPUT) == public(egress.TRAINING) - {(egress.METRICS, "weight")}


def test_a_reply_with_an_undeclared_field_cannot_be_built():
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m"
    with pytest.raises(egress.EgressError, match="train-loss"):
        egress.build(
            egress.EVALUATION, msg, {egress.METRICS: {"accuracy": 0.5, "loss": 0.7, "train-loss": 0.1}}
        )
    with pytest.raises(egress.EgressError, match="declares no record"):
        egress.build(egress.SECAGG_CONSISTENCY, msg, {"extra": {"x": b""}})
    with pytest.raises(egress.EgressError, match="requires"):
        egress.build(egress.SECAGG_CONSISTENCY, msg, {})


def test_the_server_refuses_a_reply_with_a_field_its_type_does_not_declare():
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m"
    reply = egress.build(egress.SECAGG_CONSISTENCY, msg, {egress.SECAGG: {"signature": b"s"}})
    reply.content["metrics"] = MetricRecord({"train-loss": 0.3})
    with pytest.raises(egress.ReplyError) as err:
        egress.parse(egress.SECAGG_CONSISTENCY, reply)
    assert err.value.reason == egress.REPLY_EXTRA


def test_no_site_module_builds_a_message_but_through_the_egress_schema():
    """The one way out: no module of the site (nor common/, but egress) constructs a Message."""
    offenders = []
    for path in [*ROOT.glob("client/*.py"), *ROOT.glob("common/**/*.py")]:
        if path.name == "egress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Message":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_every_field_says_why_it_may_leave():
    for reply_type in egress.REPLY_TYPES:
        keys = [(f.record, f.key) for f in reply_type.fields]
        assert len(keys) == len(set(keys)), reply_type.name
        for f in reply_type.fields:
            assert isinstance(f.kind, egress.Kind) and len(f.why) > 20, (reply_type.name, f.key)
    # The training loss was a statistic of the records without noise: it leaves no more.
    assert not any(f.key == "train-loss" for t in egress.REPLY_TYPES for f in t.fields)


KNOWN_TYPES = {  # name: sorted "record/key:form:kind" -- a change of the wire format fails here
    "refusal": [
        "refusal/asked:text:public",
        "refusal/code:text:public",
        "refusal/limit:text:public",
        "refusal/remaining:text:public",
        "refusal/round:text:public",
        "refusal/setting:text:public",
        "status/site:text:public",
    ],
    "secagg.consistency": ["secagg/signature:bytes:protocol"],
    "secagg.masked_input": [
        "masked/y:ring:protocol",
        "metrics/delta:float:public",
        "metrics/epsilon:float:public",
        "metrics/noise-multiplier:float:public",
        "metrics/sample-rate:float:public",
        "metrics/steps:count:public",
        "secagg/complaints:bytes:protocol",
        "status/private:flag:public",
        "status/site:text:public",
    ],
    "secagg.advert": [
        "secagg/advert:bytes:protocol",
        "status/private:flag:public",
        "status/site:text:public",
    ],
}


def test_known_reply_formats():
    by_name = {t.name: t for t in egress.REPLY_TYPES}
    for name, fields in KNOWN_TYPES.items():
        got = sorted(f"{f.record}/{f.key}:{f.form.value}:{f.kind.value}" for f in by_name[name].fields)
        assert got == fields
    assert sorted(by_name) == [
        "evaluation",
        "refusal",
        "secagg.advert",
        "secagg.consistency",
        "secagg.masked_input",
        "secagg.share_keys",
        "secagg.unmask",
        "statistics",
        "training",
        "vote",
    ]


KNOWN_CODES = [
    "budget.exhausted",
    "budget.round",
    "message.config",
    "message.ddp",
    "message.round",
    "message.secagg",
    "message.stage",
    "message.weights",
    "plan.changed",
    "plan.infeasible",
    "policy.cohort",
    "policy.colluders",
    "policy.dp",
    "policy.federated_eval",
    "policy.labels",
    "policy.model",
    "policy.noise_share",
    "policy.run_epsilon",
    "policy.secagg",
    "policy.secagg_k",
    "policy.secagg_threshold",
    "policy.size",
    "policy.timeout",
    "policy.update_clip",
    "round.evaluated",
    "round.not_trained",
    "round.sent",
    "round.unmasked",
    "site.code",
    "site.config",
    "site.data",
    "site.internal",
    "site.keys",
    "site.ledger",
    "site.model",
    "site.record",
    "train.diverged",
]
"""The refusal codes on the wire: renaming or dropping one is a wire change."""


def test_known_refusal_codes_each_with_the_servers_own_words():
    from fedseal.common.refusals import DESCRIPTIONS, Code

    assert sorted(code.value for code in Code) == KNOWN_CODES
    assert set(DESCRIPTIONS) == set(Code)
    assert all(DESCRIPTIONS[code].strip() for code in Code)
