"""What a site knows about itself: its data, its privacy budget, its policy, its keys.

In a deployment these come from the SuperNode's node config, written by
``fedseal client`` from the site operator's own flags, never from the server:

``data-path``, ``site-name``, ``epsilon``, ``delta``, ``ledger-path``, ``device``
    the site's data file, name, total budget over all jobs (the ledger holds
    it; ``fedseal ledger raise`` changes it), ledger and device;
``ledger-key``
    the site's ledger key, kept apart from the ledger (:mod:`fedseal.client.ledger_seal`);
``identity-key``
    the site's own private key (OpenSSH, made at the site); it authenticates
    the SuperNode and signs what the site says in secure aggregation;
``peers``
    a file of OpenSSH public keys, one line per site this site accepts as a
    fellow member of the federation (its own line may be included);
``text-column``, ``label-column``
    the columns of the site's own file (the server's settings of these name
    only its own files: a site never reads its data with columns a server chose);
``require-dp``, ``require-secagg``, ``min-cohort``, ``min-secagg-k``,
``min-secagg-threshold``, ``max-colluders``, ``max-update-clip``, ``federated-eval``,
``allow-model``, ``labels``, ``max-run-epsilon``
    the site's :class:`SitePolicy`: what it demands of any run before it trains;
``reply-hold``
    seconds the site holds each reply whose work read its data (:func:`reply_hold`).

In a simulation every virtual site reads the file the simulation wrote for its
partition, and its keys and roster from the same folder; the simulation's user
plays every site, so the run's own settings are the sites' policy there
(:meth:`SitePolicy.of_run`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedseal.common.config import ConfigError, FedConfig

FEDERATED_EVAL_MODES = ("off", "on")
DEFAULT_TEXT_COLUMN, DEFAULT_LABEL_COLUMN = "sentence", "label"
MAX_REPLY_HOLD = 86400.0  # seconds: a day; longer than any round a server would wait for


@dataclass(frozen=True)
class SitePolicy:
    """What a site demands of every run before it trains; the server cannot lower it.

    Attributes
    ----------
    require_dp : bool
        Train only with differential privacy at the site's own budget.
    require_secagg : bool
        Send updates only masked by secure aggregation.
    min_cohort : int
        Fewest sites a secure round may have for this site to take part (a
        sum over fewer sites says too much about each); the run's
        ``clients`` and ``min-clients`` must reach it too. Never below 2.
    min_secagg_k : int
        Fewest SecAgg+ neighbours this site accepts.
    min_secagg_threshold : int
        Smallest Shamir threshold ``t`` this site accepts.
    max_colluders : int
        How many sites colluding with the server (beside it) a secure round must
        withstand: a round's ``k`` and ``t`` must give ``2t - k - 1`` above it
        (that many colluders in one neighbourhood can get two views signed and
        unmask one site) and ``t - 1`` above it (that many colluding neighbours
        and the site's own share rebuild its self-mask), and ``min_cohort`` must
        be at least ``max_colluders + 2``
        (the sum minus the colluders' inputs must cover two honest sites).
    max_update_clip : float
        Largest ``update-clip`` the server may ask for: the per-coordinate bound of
        this site's plain updates (vote rounds send entries bounded by 1).
    federated_eval : str
        ``off``: refuse evaluation requests; ``on``: answer them (each answer is
        one more step of the site's DP mechanism, counted in its budget).
    allowed_models : tuple[str, ...]
        The models (hub names or folders, exactly as the server names them) this
        site runs; anything else is refused before any file is touched, so a
        server cannot probe the site's file system with model paths.
    labels : tuple[str, ...]
        The label set the site declared for its data (``--labels``); a run's
        labels must be this set. Empty: not declared (a deployed site declares
        it at start; :func:`fedseal.client.agent` refuses to start otherwise).
        A refusal says only that the sets differ, never which label the site has.
    max_run_epsilon : float
        Most epsilon one run may ask for (its config's ``epsilon``) out of the
        site's total. The default, infinity, caps a run at what is left of the
        total and no lower: the stock run asks for epsilon 8, the stock total
        is 8, and a lower default would refuse it at every site that kept the
        defaults. A site that wants its total to last several runs sets it
        lower (``--max-run-epsilon``).
    """

    require_dp: bool = True
    require_secagg: bool = True
    min_cohort: int = 3
    min_secagg_k: int = 2
    min_secagg_threshold: int = 2
    max_colluders: int = 1
    max_update_clip: float = 64.0
    federated_eval: str = "off"
    allowed_models: tuple[str, ...] = ("default",)
    labels: tuple[str, ...] = ()
    max_run_epsilon: float = math.inf

    def __post_init__(self) -> None:
        """Reject a policy that cannot protect anything."""
        if self.min_cohort < 2:
            raise ConfigError(
                f"min-cohort must be at least 2 (got {self.min_cohort}): a 'sum' "
                "over one site is that site's update"
            )
        if self.min_secagg_k < 1 or self.min_secagg_threshold < 2:
            raise ConfigError("min-secagg-k must be at least 1 and min-secagg-threshold at least 2")
        if self.max_colluders < 0:
            raise ConfigError(f"max-colluders must be at least 0, got {self.max_colluders}")
        if self.min_cohort < self.max_colluders + 2:
            raise ConfigError(
                f"min-cohort = {self.min_cohort} is below max-colluders + 2 = "
                f"{self.max_colluders + 2}: a sum over {self.min_cohort} sites less the inputs "
                f"of {self.max_colluders} colluding sites can be one honest site's input; "
                "raise --min-cohort or lower --max-colluders"
            )
        if not self.max_update_clip > 0:
            raise ConfigError(f"max-update-clip must be positive, got {self.max_update_clip}")
        if not self.max_run_epsilon > 0:
            raise ConfigError(f"max-run-epsilon must be positive, got {self.max_run_epsilon}")
        if self.federated_eval not in FEDERATED_EVAL_MODES:
            raise ConfigError(
                f"federated-eval must be one of {', '.join(FEDERATED_EVAL_MODES)}, "
                f"got {self.federated_eval!r}"
            )

    @classmethod
    def of_run(cls, cfg: FedConfig) -> SitePolicy:
        """A simulated site's policy: the run's own settings (its user plays every site, so
        there is nobody to collude with). Under distributed noise the sites take the
        run's own assumption, ``min-clients`` sites of which ``max-colluders``
        collude, so that their noise shares are what the run planned."""
        distributed = cfg.dp_noise == "distributed"
        return cls(
            require_dp=cfg.dp,
            require_secagg=cfg.secagg,
            min_cohort=cfg.min_clients if distributed else 2,
            min_secagg_k=1,
            min_secagg_threshold=2,
            max_colluders=cfg.max_colluders if distributed else 0,
            max_update_clip=cfg.update_clip,
            federated_eval="on" if cfg.federated_eval else "off",
            allowed_models=(cfg.model,),
            labels=tuple(cfg.labels),
        )


@dataclass(frozen=True)
class SiteSettings:
    """Per-site settings that the server does not control."""

    name: str
    data_path: Path
    epsilon: float
    delta: float
    device: str
    ledger_path: Path | None
    policy: SitePolicy = field(default_factory=SitePolicy)
    ledger_key: Path | None = None
    identity_key: Path | None = None
    peers: Path | None = None
    text_column: str = DEFAULT_TEXT_COLUMN
    label_column: str = DEFAULT_LABEL_COLUMN
    feature_dir: Path | None = None  # where it caches pooled features (:func:`feature_cache`)


def simulation_site_file(out_dir: str | Path, partition_id: int) -> Path:
    """Where the simulation writes partition ``partition_id``'s data file."""
    return Path(out_dir) / "sites" / f"site-{partition_id}.jsonl"


def site_name(node_config: Mapping[str, object], node_id: int | None = None) -> str:
    """The site's name: the node config's ``site-name``, else its data file's or partition's."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "data-path" in node_config:
        return Path(str(node_config["data-path"])).stem
    if "partition-id" in node_config:
        return f"site-{node_config['partition-id']}"
    return str(node_id) if node_id is not None else "unnamed site"


def reply_hold(node_config: Mapping[str, object]) -> float:
    """Seconds from the start of a message's handling before the site's reply to it may leave
    (``reply-hold``; 0, the default: as soon as it is ready).

    The server sees when each reply arrives. The work behind a reply that reads the
    site's data grows with its record count (the features of every record, the
    Poisson sample's forward and backward passes), so without a hold its arrival
    time tracks that count. With a hold longer than that work, every such reply
    leaves at the same delay after its handling began, whatever the data
    (:func:`fedseal.client.reply.answered`).

    Raises
    ------
    fedseal.common.config.ConfigError
        If the value is not a number of seconds from 0 to :data:`MAX_REPLY_HOLD`.
    """
    value = node_config.get("reply-hold", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_REPLY_HOLD:
        raise ConfigError(
            f"the site's reply-hold is {value!r}: set it to a number of seconds from 0 to {MAX_REPLY_HOLD:g}"
        )
    return float(value)


def ledger_path(node_config: Mapping[str, object]) -> Path | None:
    """The site's ledger file (node config ``ledger-path``), if it keeps one."""
    value = node_config.get("ledger-path")
    return Path(str(value)) if value else None


def feature_cache(site: SiteSettings) -> Path | None:
    """Where the site caches its pooled features (:mod:`fedseal.common.features`): a folder in its
    state folder, beside its ledger; a simulated site's beside its data file in the simulation's
    ``sites`` folder (:func:`simulation_feature_dir`), so that the simulation's processes share
    what one computed; None (memory only) for a deployed site without a ledger."""
    return site.feature_dir


def simulation_feature_dir(out_dir: str | Path, partition_id: int) -> Path:
    """Where simulated site ``partition_id`` caches its pooled features."""
    return Path(out_dir) / "sites" / f"site-{partition_id}.features"


def simulation_key_file(out_dir: str | Path, partition_id: int) -> Path:
    """Where the simulation writes partition ``partition_id``'s signing key (``.pub`` beside it)."""
    return Path(out_dir) / "sites" / f"site-{partition_id}.key"


def simulation_roster_file(out_dir: str | Path) -> Path:
    """Where the simulation writes the roster of all its virtual sites."""
    return Path(out_dir) / "sites" / "peers.pub"


_NODE_KEYS = {"allowed_models": "allow-model"}  # node-config keys that are not the field's name


def split_list(value: object) -> tuple[str, ...]:
    """A node-config list: a comma-separated string (Flower's node config holds scalars)."""
    if not isinstance(value, str):
        raise ValueError(value)
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _policy(node_config: Mapping[str, object], defaults: SitePolicy = SitePolicy()) -> SitePolicy:
    """The site's policy from its node config; unset entries keep ``defaults`` (the safe ones)."""
    values: dict[str, object] = {}
    for name in SitePolicy.__dataclass_fields__:
        key = _NODE_KEYS.get(name, name.replace("_", "-"))
        if key not in node_config:
            continue
        raw, default = node_config[key], getattr(defaults, name)
        try:
            if isinstance(default, tuple):
                values[name] = split_list(raw)
            elif isinstance(default, bool):
                if not isinstance(raw, bool):
                    raise ValueError(raw)
                values[name] = raw
            elif isinstance(default, int):
                number = float(str(raw))
                if isinstance(raw, bool) or number != int(number):
                    raise ValueError(raw)
                values[name] = int(number)
            elif isinstance(default, float):
                values[name] = float(str(raw))
            else:
                values[name] = str(raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"the site's node config has {key} = {raw!r}, which is not a {type(default).__name__}"
            ) from None
    return replace(defaults, **values)  # type: ignore[arg-type]


def site_settings(node_config: Mapping[str, object], cfg: FedConfig) -> SiteSettings:
    """Resolve a site's own settings from its node config (deployment) or partition id."""
    columns = (DEFAULT_TEXT_COLUMN, DEFAULT_LABEL_COLUMN)
    features = None
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"]))
        policy = _policy(node_config)
        columns = (
            str(node_config.get("text-column", columns[0])),
            str(node_config.get("label-column", columns[1])),
        )
    elif "partition-id" in node_config:
        pid = int(str(node_config["partition-id"]))
        data_path = simulation_site_file(cfg.out, pid)
        features = simulation_feature_dir(cfg.out, pid)
        # The simulation's user plays every site: its keys and roster are the ones the
        # simulation wrote, and the run's own settings are the sites' policy unless a
        # node config entry says otherwise.
        node_config = {
            "identity-key": str(simulation_key_file(cfg.out, pid)),
            "peers": str(simulation_roster_file(cfg.out)),
            **node_config,
        }
        policy = _policy(node_config, SitePolicy.of_run(cfg))
        columns = (cfg.text_column, cfg.label_column)  # what the simulation wrote the file with
    else:
        raise ConfigError(
            "this client agent has no data: start it with --data FILE (node config 'data-path')"
        )
    try:
        epsilon = float(str(node_config.get("epsilon", cfg.epsilon)))
        delta = float(str(node_config.get("delta", cfg.delta)))
    except (TypeError, ValueError):
        raise ConfigError("the site's epsilon and delta must be numbers") from None
    if epsilon <= 0 or not 0 < delta < 1:
        raise ConfigError(f"site budget epsilon={epsilon}, delta={delta} is invalid")
    ledger = ledger_path(node_config)
    ledger_key = node_config.get("ledger-key")
    if ledger and not ledger_key:
        raise ConfigError(
            "the site's node config has a ledger-path but no ledger-key: start "
            "the agent with --ledger-key FILE (kept apart from the ledger)"
        )
    identity = node_config.get("identity-key")
    peers = node_config.get("peers")
    return SiteSettings(
        name=site_name(node_config),
        data_path=data_path,
        epsilon=epsilon,
        delta=delta,
        device=str(node_config.get("device", cfg.device)),
        ledger_path=ledger,
        policy=policy,
        ledger_key=Path(str(ledger_key)) if ledger_key else None,
        identity_key=Path(str(identity)) if identity else None,
        peers=Path(str(peers)) if peers else None,
        text_column=columns[0],
        label_column=columns[1],
        feature_dir=ledger.parent / "feature-cache" if ledger else features,
    )
