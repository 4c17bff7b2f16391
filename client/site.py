"""What a site knows about itself: its data, its privacy budget, its policy, its keys.

In a deployment these come from the SuperNode's node config, written by
``fedseal client`` from the site operator's own flags, never from the server:

``data-path``, ``site-name``, ``epsilon``, ``delta``, ``ledger-path``, ``device``
    the site's data file, name, total budget, ledger and device;
``identity-key``
    the site's own private key (OpenSSH, made at the site); it authenticates
    the SuperNode and signs what the site says in secure aggregation;
``peers``
    a file of OpenSSH public keys, one line per site this site accepts as a
    fellow member of the federation (its own line may be included);
``require-dp``, ``require-secagg``, ``min-cohort``, ``min-secagg-k``,
``min-secagg-threshold``, ``max-update-clip``, ``federated-eval``
    the site's :class:`SitePolicy`: what it demands of any run before it trains.

In a simulation every virtual site reads the file the simulation wrote for its
partition, and its keys and roster from the same folder; the simulation's user
plays every site, so the run's own settings are the sites' policy there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from common.config import ConfigError, FedConfig

FEDERATED_EVAL_MODES = ("off", "on")


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
        Fewest sites a round may have for this site to take part (a sum over
        fewer sites says too much about each).
    min_secagg_k : int
        Fewest SecAgg+ neighbours this site accepts.
    min_secagg_threshold : int
        Smallest Shamir threshold ``t`` this site accepts.
    max_update_clip : float
        Largest per-coordinate update bound the server may ask for.
    federated_eval : str
        ``off``: refuse evaluation requests; ``on``: answer them.
    """

    require_dp: bool = True
    require_secagg: bool = True
    min_cohort: int = 3
    min_secagg_k: int = 2
    min_secagg_threshold: int = 2
    max_update_clip: float = 10.0
    federated_eval: str = "off"

    def __post_init__(self) -> None:
        """Reject a policy that cannot protect anything."""
        if self.min_cohort < 2:
            raise ConfigError(f"min-cohort must be at least 2 (got {self.min_cohort}): a 'sum' "
                              "over one site is that site's update")
        if self.min_secagg_k < 1 or self.min_secagg_threshold < 2:
            raise ConfigError("min-secagg-k must be at least 1 and min-secagg-threshold at least 2")
        if not self.max_update_clip > 0:
            raise ConfigError(f"max-update-clip must be positive, got {self.max_update_clip}")
        if self.federated_eval not in FEDERATED_EVAL_MODES:
            raise ConfigError(f"federated-eval must be one of {', '.join(FEDERATED_EVAL_MODES)}, "
                              f"got {self.federated_eval!r}")


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
    identity_key: Path | None = None
    peers: Path | None = None


def simulation_site_file(out_dir: str | Path, partition_id: int) -> Path:
    """Where the simulation writes partition ``partition_id``'s data file."""
    return Path(out_dir) / "sites" / f"site-{partition_id}.jsonl"


def simulation_key_file(out_dir: str | Path, partition_id: int) -> Path:
    """Where the simulation writes partition ``partition_id``'s signing key (``.pub`` beside it)."""
    return Path(out_dir) / "sites" / f"site-{partition_id}.key"


def simulation_roster_file(out_dir: str | Path) -> Path:
    """Where the simulation writes the roster of all its virtual sites."""
    return Path(out_dir) / "sites" / "peers.pub"


def _policy(node_config: Mapping[str, object]) -> SitePolicy:
    """The site's policy from its node config; unset entries keep the safe defaults."""
    defaults = SitePolicy()
    values: dict[str, object] = {}
    for name in SitePolicy.__dataclass_fields__:
        key = name.replace("_", "-")
        if key not in node_config:
            continue
        raw, default = node_config[key], getattr(defaults, name)
        try:
            if isinstance(default, bool):
                if not isinstance(raw, bool):
                    raise ValueError(raw)
                values[name] = raw
            elif isinstance(default, int):
                values[name] = int(raw)  # type: ignore[arg-type]
            elif isinstance(default, float):
                values[name] = float(raw)  # type: ignore[arg-type]
            else:
                values[name] = str(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"the site's node config has {key} = {raw!r}, which is not a "
                              f"{type(default).__name__}") from None
    return SitePolicy(**values)  # type: ignore[arg-type]


def site_settings(node_config: Mapping[str, object], cfg: FedConfig) -> SiteSettings:
    """Resolve a site's own settings from its node config (deployment) or partition id."""
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"]))
        name = str(node_config.get("site-name", data_path.stem))
    elif "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        data_path = simulation_site_file(cfg.out, pid)
        name = f"site-{pid}"
        # The simulation's user plays every site: its keys and roster are the ones the
        # simulation wrote, and the run's own cohort settings are the sites' minimums.
        node_config = {"identity-key": str(simulation_key_file(cfg.out, pid)),
                       "peers": str(simulation_roster_file(cfg.out)),
                       "min-cohort": max(2, cfg.min_clients), "min-secagg-k": 1, **node_config}
    else:
        raise ConfigError(
            "this client agent has no data: start it with --data FILE "
            "(node config 'data-path')"
        )
    try:
        epsilon = float(node_config.get("epsilon", cfg.epsilon))
        delta = float(node_config.get("delta", cfg.delta))
    except (TypeError, ValueError):
        raise ConfigError("the site's epsilon and delta must be numbers") from None
    if epsilon <= 0 or not 0 < delta < 1:
        raise ConfigError(f"site budget epsilon={epsilon}, delta={delta} is invalid")
    ledger = node_config.get("ledger-path")
    identity = node_config.get("identity-key")
    peers = node_config.get("peers")
    return SiteSettings(
        name=name,
        data_path=data_path,
        epsilon=epsilon,
        delta=delta,
        device=str(node_config.get("device", cfg.device)),
        ledger_path=Path(str(ledger)) if ledger else None,
        policy=_policy(node_config),
        identity_key=Path(str(identity)) if identity else None,
        peers=Path(str(peers)) if peers else None,
    )
