"""What a site knows about itself: its data file, its privacy budget, its progress.

In a deployment these come from the SuperNode's node config (``data-path``,
``epsilon``, ``delta``, ``ledger-path``, ``device``), set by the site operator,
never by the server. In a simulation each virtual node reads the file the
simulation wrote for its partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from common.config import ConfigError, FedConfig


@dataclass(frozen=True)
class SiteSettings:
    """Per-site settings that the server does not control."""

    name: str
    data_path: Path
    epsilon: float
    delta: float
    device: str
    ledger_path: Path | None


def simulation_site_file(out_dir: str | Path, partition_id: int) -> Path:
    """Where the simulation writes partition ``partition_id``'s data file."""
    return Path(out_dir) / "sites" / f"site-{partition_id}.jsonl"


def site_settings(node_config: Mapping[str, object], cfg: FedConfig) -> SiteSettings:
    """Resolve a site's own settings from its node config (deployment) or partition id."""
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"]))
        name = str(node_config.get("site-name", data_path.stem))
    elif "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        data_path = simulation_site_file(cfg.out, pid)
        name = f"site-{pid}"
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
    return SiteSettings(
        name=name,
        data_path=data_path,
        epsilon=epsilon,
        delta=delta,
        device=str(node_config.get("device", cfg.device)),
        ledger_path=Path(str(ledger)) if ledger else None,
    )
