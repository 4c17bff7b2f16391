"""``<run>/report.html``: one self-contained page that shows how a run went.

The page reads only the run folder's files (``metrics.jsonl``, ``summary.json``)
and, when given one, a ``fedseal audit`` result; it needs no network: the plots
are matplotlib PNGs embedded as ``data:`` URIs, the style sheet is inline, and
a Content-Security-Policy forbids scripts and any other source. Site names and
refusal reasons come from remote parties: every text taken from the files is
HTML-escaped, and kept out of matplotlib's mathtext, so a hostile name can
neither run in the page nor break a plot.

Sections: the NON-PRIVATE banner (when the run was not private), a summary,
accuracy / macro-F1 / loss per round, each site's epsilon per round against
the run's budget, the privacy audit (``fedseal report --audit FILE``: its
verdict and the fields with the largest bounds), the sites that contributed,
refused or failed and the abandoned rounds, the final model's confusion matrix
on the held-out file, a per-round table (the largest epsilon and delta a site
reported, the reasons given), and the settings.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedseal.common.durable import atomic_write
from fedseal.common.errors import FedsealError
from fedseal.server.metrics import NON_PRIVATE

REPORT_FILE = "report.html"
MAX_LEGEND_SITES = 12  # more sites than this: the spread over sites, not a line each
MAX_LABEL_CHARS = 40  # site or label names in plots are cut to this length
MAX_AUDIT_ROWS = 12  # fields of a privacy audit shown: the flagged ones, then the largest bounds

STYLE = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 4px; } .sub { color: #666; margin-top: 0; }
.nonprivate { background: #c00000; color: #fff; font-size: 32px; font-weight: bold;
  padding: 24px; margin: 16px 0; border: 6px solid #700000; text-align: center; }
.nonprivate small { display: block; font-size: 18px; font-weight: normal; }
.warn { background: #fff3cd; border: 2px solid #b58100; padding: 10px; margin: 10px 0; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 14px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } img { display: block; margin: 8px 0 20px; }
.reason { color: #8a1c00; font-size: 13px; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class ReportError(FedsealError, ValueError):
    """A run folder cannot be turned into a report (missing or malformed files)."""

    code = "report.error"


@dataclass(frozen=True)
class RoundRow:
    """One round of ``metrics.jsonl``, with every field checked and typed."""

    round: int
    accuracy: float | None
    macro_f1: float | None
    loss: float | None
    epsilon: dict[str, float]
    delta: dict[str, float]
    contributors: list[str]
    refused: dict[str, str]
    failed: dict[str, str]
    abandoned: str
    private: bool
    timed_out: list[str] = field(default_factory=list)  # of ``failed``: never answered in time
    seconds: float | None = None
    bytes_sent: float | None = None
    bytes_received: float | None = None


@dataclass(frozen=True)
class Run:
    """What the report shows: the rounds and the summary (empty while the run goes on)."""

    folder: Path
    rows: list[RoundRow]
    summary: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings as recorded in ``summary.json`` (empty when absent)."""
        cfg = self.summary.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def private(self) -> bool:
        """False if the summary, the settings or any round says the run was not private."""
        flags = [self.summary.get("private"), self.config.get("dp"), *(r.private for r in self.rows)]
        return all(flag is not False for flag in flags)

    @property
    def budget(self) -> float | None:
        """The run's epsilon budget per site (the ``epsilon`` setting)."""
        return _number(self.config.get("epsilon"))


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything else (missing, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _texts(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{where} must be an object of site: reason")
    return {str(k): str(v) for k, v in value.items()}


def _numbers(value: Any, where: str) -> dict[str, float]:
    """A ``{site: number}`` object; entries that are not finite numbers are left out."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{where} must be an object of site: number")
    return {str(site): v for site, raw in value.items() if (v := _number(raw)) is not None}


def parse_row(data: Any, where: str) -> RoundRow:
    """Check one metrics line; ReportError naming ``where`` and the field otherwise."""
    if not isinstance(data, dict):
        raise ReportError(f"{where} is not a JSON object")
    rnd = data.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int):
        raise ReportError(f"{where} has no integer 'round'")
    contributors = data.get("contributors") or []
    late = data.get("timed_out") or []
    for key, value in (("contributors", contributors), ("timed_out", late)):
        if not isinstance(value, list):
            raise ReportError(f"{where}: '{key}' must be a list of site names")
    return RoundRow(
        round=rnd,
        accuracy=_number(data.get("accuracy")),
        macro_f1=_number(data.get("macro_f1")),
        loss=_number(data.get("loss")),
        epsilon=_numbers(data.get("epsilon"), f"{where}: 'epsilon'"),
        delta=_numbers(data.get("delta"), f"{where}: 'delta'"),
        contributors=[str(c) for c in contributors],
        refused=_texts(data.get("refused"), f"{where}: 'refused'"),
        failed=_texts(data.get("failed"), f"{where}: 'failed'"),
        abandoned=str(data.get("abandoned") or ""),
        private=data.get("private") is not False,
        timed_out=[str(site) for site in late],
        seconds=_number(data.get("seconds")),
        bytes_sent=_number(data.get("bytes_sent")),
        bytes_received=_number(data.get("bytes_received")),
    )


def load_run(folder: str | Path) -> Run:
    """Read a run folder's ``metrics.jsonl`` and (if the run finished) ``summary.json``."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{metrics} does not exist: give the run's output folder (its --out)")
    rows = []
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise ReportError(f"{metrics} line {number} is not JSON ({exc})") from None
        rows.append(parse_row(data, f"{metrics} line {number}"))
    summary: dict[str, Any] = {}
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ReportError(f"{summary_path} is not JSON ({exc})") from None
        if not isinstance(summary, dict):
            raise ReportError(f"{summary_path} is not a JSON object")
    return Run(folder=folder, rows=rows, summary=summary)


def load_audit(path: str | Path) -> dict[str, Any]:
    """A ``fedseal audit`` result (its ``--json`` file), checked for what the page shows.

    Raises
    ------
    ReportError
        If the file is not JSON, or not an audit result with a numeric bound per field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not a readable JSON file ({exc})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("fields"), list)
        or not isinstance(data.get("accounted"), dict)
    ):
        raise ReportError(f"{path} is not a result of fedseal audit --json FILE")
    fields = []
    for entry in data["fields"]:
        bound = _number(entry.get("epsilon_lower_bound")) if isinstance(entry, dict) else None
        if bound is None:
            raise ReportError(f"{path}: a field has no numeric epsilon_lower_bound")
        fields.append(
            {
                "field": str(entry.get("field")),
                "kind": str(entry.get("kind")),
                "attack": str(entry.get("attack")),
                "bound": bound,
                "flagged": entry.get("flagged") is True,
            }
        )
    return {
        "accounted": _number(data["accounted"].get("epsilon")),
        "resolution": _number(data.get("resolution")),
        "runs": _number(data.get("runs_per_arm")),
        "fields": fields,
    }


# -- plots --------------------------------------------------------------------------------------


def plot_text(text: str) -> str:
    """``text`` safe for a matplotlib label: cut short, ``$`` escaped so no mathtext runs."""
    text = text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"
    return text.replace("$", r"\$")


def _png(fig) -> str:
    """The figure as a base64 ``data:`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _round_axis(ax, rounds: list[int]) -> None:
    ax.set_xlabel("round")
    ax.set_xticks(rounds if len(rounds) <= 30 else rounds[:: math.ceil(len(rounds) / 30)])
    ax.grid(alpha=0.3)


def quality_plot(rows: list[RoundRow]) -> str:
    """Accuracy and macro-F1 (left), loss (right), per round on the held-out file."""
    fig, (left, right) = _figure(10.5, 3.4, ncols=2)
    rounds = [r.round for r in rows]
    for key, colour in (("accuracy", "tab:blue"), ("macro_f1", "tab:orange")):
        points = [(r.round, getattr(r, key)) for r in rows if getattr(r, key) is not None]
        if points:
            left.plot(*zip(*points), marker="o", color=colour, linewidth=2.5, label=key.replace("_", "-"))
    left.set_ylim(0, 1)
    left.set_title("held-out accuracy and macro-F1")
    if left.get_lines():  # a run with no evaluated round has nothing to name
        left.legend(loc="lower right")
    points = [(r.round, r.loss) for r in rows if r.loss is not None]
    if points:
        right.plot(*zip(*points), marker="o", color="tab:purple", linewidth=2.5)
    right.set_title("held-out loss (cross-entropy)")
    for ax in (left, right):
        _round_axis(ax, rounds)
    return _png(fig)


def epsilon_plot(rows: list[RoundRow], budget: float | None, delta: Any) -> str:
    """Each site's epsilon after each round, and the run's budget as a dashed line."""
    fig, ax = _figure(10.5, 3.8)
    sites = sorted({site for r in rows for site in r.epsilon})
    if len(sites) <= MAX_LEGEND_SITES:
        for site in sites:
            points = [(r.round, r.epsilon[site]) for r in rows if site in r.epsilon]
            ax.plot(*zip(*points), marker="o", linewidth=1.8, label=plot_text(site))
    else:  # one line per site would hide each other: the spread over sites instead
        spent = [(r.round, sorted(r.epsilon.values())) for r in rows if r.epsilon]
        rounds = [rnd for rnd, _ in spent]
        ax.fill_between(
            rounds,
            [v[0] for _, v in spent],
            [v[-1] for _, v in spent],
            alpha=0.3,
            label=f"lowest to highest of {len(sites)} sites",
        )
        ax.plot(rounds, [v[len(v) // 2] for _, v in spent], marker="o", linewidth=1.8, label="median site")
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", linewidth=2.5, label=f"budget ε = {budget:g}")
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_title(f"privacy spent per site (δ = {plot_text(str(delta))})")
    _round_axis(ax, [r.round for r in rows])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return _png(fig)


def participation_plot(rows: list[RoundRow]) -> str:
    """Sites that contributed, refused and failed per round; abandoned rounds marked."""
    fig, ax = _figure(10.5, 3.3)
    rounds = [r.round for r in rows]
    bottom = [0] * len(rows)
    for name, colour in (("contributors", "tab:green"), ("refused", "tab:orange"), ("failed", "tab:red")):
        counts = [len(getattr(r, name)) for r in rows]
        ax.bar(rounds, counts, bottom=bottom, color=colour, label=name)
        bottom = [b + c for b, c in zip(bottom, counts)]
    abandoned = [r.round for r in rows if r.abandoned]
    if abandoned:
        top = max(bottom + [1])
        ax.bar(
            abandoned,
            [top] * len(abandoned),
            color="none",
            edgecolor="black",
            hatch="//",
            label="abandoned (model unchanged)",
        )
    ax.set_ylabel("sites")
    ax.set_title("sites per round")
    _round_axis(ax, rounds)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return _png(fig)


def confusion_plot(labels: list[str], matrix: list[list[int]]) -> str:
    """The final model's confusion matrix (rows: true label, columns: predicted)."""
    size = min(3.0 + 0.5 * len(labels), 9.0)
    fig, ax = _figure(size + 1.2, size)
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    names = [plot_text(label) for label in labels]
    ax.set_xticks(range(len(labels)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("final model on the held-out file")
    peak = max((max(row) for row in matrix), default=0)
    if len(labels) <= 20:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(
                    j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black"
                )
    return _png(fig)


# -- page ---------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _reasons(reasons: dict[str, str]) -> str:
    return "<br>".join(
        f'{_e(site)}: <span class="reason">{_e(why)}</span>' for site, why in sorted(reasons.items())
    )


def _confusion(summary: dict[str, Any]) -> tuple[list[str], list[list[int]]] | None:
    """The summary's confusion matrix if it is well formed (square, counts), else None."""
    conf = summary.get("confusion")
    if not isinstance(conf, dict):
        return None
    labels, matrix = conf.get("labels"), conf.get("matrix")
    if (
        not isinstance(labels, list)
        or not isinstance(matrix, list)
        or not labels
        or len(matrix) != len(labels)
        or not all(
            isinstance(row, list)
            and len(row) == len(labels)
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row)
            for row in matrix
        )
    ):
        return None
    return [str(label) for label in labels], matrix


def _audit_section(audit: dict[str, Any]) -> str:
    """The privacy audit's verdict and its fields with the largest bounds (flagged ones first)."""
    fields = sorted(audit["fields"], key=lambda f: (not f["flagged"], -f["bound"]))
    flagged = [f["field"] for f in fields if f["flagged"]]
    head = (
        f"ε {_fmt(audit['accounted'], 3)} accounted; {_fmt(audit['runs'], 0)} runs with the "
        f"canary and as many without; the test runs can show at most ε "
        f"{_fmt(audit['resolution'], 3)}"
    )
    verdict = (
        f'<div class="nonprivate" role="alert">{len(flagged)} field(s) reveal more than '
        f"the accounted ε<small>{_e(', '.join(flagged))}</small></div>"
        if flagged
        else "<p>No field's empirical lower bound exceeds the accounted ε.</p>"
    )
    rows = "".join(
        f"<tr><td>{_e(f['field'])}</td><td>{_e(f['kind'])}</td>"
        f"<td>{_e(f['attack'])}</td><td>{_fmt(f['bound'], 3)}</td>"
        f"<td>{'FLAGGED' if f['flagged'] else '-'}</td></tr>"
        for f in fields[:MAX_AUDIT_ROWS]
    )
    return (
        f"<p>{_e(head)}</p>{verdict}<table><tr><th>field</th><th>kind</th><th>attack</th>"
        f"<th>ε lower bound</th><th>flag</th></tr>{rows}</table>"
        f"<p>{len(fields)} fields attacked; the {min(len(fields), MAX_AUDIT_ROWS)} with the "
        "largest bounds are shown (docs/audit.md).</p>"
    )


def settings_that_apply(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's settings without those its choices make moot (LoRA's under the probe, FedAdam's
    under FedAvg, the noise and SecAgg+ settings of a run without DP or SecAgg+, ...)."""
    moot: set[str] = set()
    if cfg.get("finetune") != "lora":
        moot |= {"lora_r", "lora_alpha", "lora_dropout", "lora_targets"}
    if cfg.get("strategy") != "fedadam":
        moot |= {"adam_beta1", "adam_beta2", "adam_tau"}
    if cfg.get("partition") != "dirichlet":
        moot.add("alpha")
    if cfg.get("dp") is False:
        moot |= {"epsilon", "delta", "accountant", "max_grad_norm", "dp_noise", "federated_eval"}
    if cfg.get("secagg") is False:
        moot |= {"secagg_k", "secagg_threshold", "update_clip", "dp_noise", "max_colluders"}
    elif cfg.get("dp_noise") != "distributed":
        moot.add("max_colluders")
    if cfg.get("finetune") != "full":
        moot.add("weight_decay")
    return {k: v for k, v in cfg.items() if k not in moot}


def render(run: Run, audit: dict[str, Any] | None = None) -> str:
    """The report page of ``run`` as one HTML string (with ``audit``, a privacy audit section:
    :func:`load_audit`)."""
    rows, summary, cfg = run.rows, run.summary, run.config
    parts = []
    title = "fedseal run report" if run.private else "NON-PRIVATE fedseal run report"
    parts.append(f"<h1>{_e(title)}</h1>")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f'<p class="sub">{_e(run.folder.resolve())} &middot; written {stamp}</p>')
    if summary.get("failed"):
        parts.append(
            f'<div class="nonprivate" role="alert">RUN FAILED'
            f"<small>{_e(str(summary['failed']))}</small></div>"
        )
    if not run.private:
        parts.append(
            f'<div class="nonprivate" role="alert">NON-PRIVATE RUN<small>{_e(NON_PRIVATE)}</small></div>'
        )
    if summary.get("secagg") is False or cfg.get("secagg") is False:
        parts.append(
            '<div class="warn">Secure aggregation was OFF: the server saw each site\'s update.</div>'
        )
    if not summary:
        parts.append(
            '<div class="warn">No summary.json: the run has not finished (or failed); '
            "this page shows the rounds completed so far.</div>"
        )
    late = [r for r in rows if r.timed_out]
    if late:
        parts.append(
            '<div class="warn">Sites timed out (no answer within --timeout seconds of '
            "a stage's last answer) in "
            + "; ".join(f"round {r.round}: {_e(', '.join(r.timed_out))}" for r in late)
            + ". Raise --timeout if they are slow rather than gone.</div>"
        )

    last = rows[-1] if rows else None
    eps_max = max((max(r.epsilon.values()) for r in rows if r.epsilon), default=None)
    budget = run.budget
    lost = sum(1 for r in rows if r.abandoned)
    seconds = [r.seconds for r in rows if r.seconds is not None]
    traffic = [(r.bytes_sent or 0.0) + (r.bytes_received or 0.0) for r in rows]
    facts = [
        (
            "outcome",
            f"FAILED: {summary['failed']}"
            if summary.get("failed")
            else ("completed" if summary else "not finished"),
        ),
        ("run", str(summary.get("run_id", "-"))),
        (
            "rounds",
            f"{len(rows)}"
            + (f" of {cfg['rounds']}" if "rounds" in cfg else "")
            + f" run, {lost} abandoned (model unchanged by them)",
        ),
        ("time", f"{sum(seconds):.1f} s, {sum(seconds) / len(seconds):.1f} s per round" if seconds else "-"),
        ("traffic", f"{sum(traffic) / 1e6:.2f} MB between the server and the sites" if any(traffic) else "-"),
        ("final accuracy", _fmt(last.accuracy if last else None)),
        ("final macro-F1", _fmt(last.macro_f1 if last else None)),
        ("final loss", _fmt(last.loss if last else None)),
        (
            "privacy",
            (
                f"ε max {_fmt(eps_max, 3)} of budget {budget:g}, δ {cfg.get('delta')}"
                if run.private and budget is not None
                else ("differential privacy on" if run.private else "NONE (non-private)")
            ),
        ),
        ("secure aggregation", "on" if summary.get("secagg", cfg.get("secagg")) else "off"),
        ("model", cfg.get("model", "-")),
    ]
    parts.append(
        "<h2>Summary</h2><table>"
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
        + "</table>"
    )

    if rows:
        parts.append(
            "<h2>Quality per round</h2>" + _img(quality_plot(rows), "accuracy, macro-F1 and loss per round")
        )
        parts.append("<h2>Privacy per round</h2>")
        if run.private and any(r.epsilon for r in rows):
            parts.append(
                _img(
                    epsilon_plot(rows, budget, cfg.get("delta", "?")),
                    "epsilon spent per site and round, with the budget",
                )
            )
        elif run.private:
            parts.append("<p>No site reported an epsilon.</p>")
        else:
            parts.append("<p><strong>No privacy accounting: this run was NON-PRIVATE.</strong></p>")
        if audit is not None:
            parts.append("<h2>Privacy audit</h2>" + _audit_section(audit))
        parts.append(
            "<h2>Sites per round</h2>"
            + _img(participation_plot(rows), "sites that contributed, refused, failed")
        )
    else:
        parts.append("<p>No round has completed yet.</p>")

    parts.append("<h2>Confusion matrix</h2>")
    confusion = _confusion(summary)
    if confusion is None:
        parts.append(
            "<p>Not available (the run has not finished, or its summary.json "
            "predates confusion matrices).</p>"
        )
    else:
        parts.append(_img(confusion_plot(*confusion), "confusion matrix of the final model"))

    if rows:
        header = (
            "round",
            "accuracy",
            "macro-F1",
            "loss",
            "max ε",
            "max δ",
            "seconds",
            "MB",
            "contributors",
            "refused",
            "failed",
            "abandoned",
        )
        body = []
        for r in rows:
            cells = (
                str(r.round),
                _fmt(r.accuracy),
                _fmt(r.macro_f1),
                _fmt(r.loss),
                _fmt(max(r.epsilon.values()) if r.epsilon else None, 3),
                f"{max(r.delta.values()):.3g}" if r.delta else "-",
                _fmt(r.seconds, 1),
                _fmt(((r.bytes_sent or 0.0) + (r.bytes_received or 0.0)) / 1e6, 2)
                if r.bytes_sent is not None
                else "-",
            )
            body.append(
                "<tr>"
                + "".join(f"<td>{c}</td>" for c in cells)
                + f"<td>{_e(', '.join(r.contributors)) or '-'}</td>"
                + f"<td>{_reasons(r.refused) or '-'}</td><td>{_reasons(r.failed) or '-'}</td>"
                + f'<td class="reason">{_e(r.abandoned) or "-"}</td></tr>'
            )
        parts.append(
            "<h2>Rounds</h2><table><tr>"
            + "".join(f"<th>{_e(h)}</th>" for h in header)
            + "</tr>"
            + "".join(body)
            + "</table>"
        )

    parts.append("<h2>Settings</h2>")
    if cfg:
        raw = summary.get("settings_used")
        used: dict[str, Any] = raw if isinstance(raw, dict) else {}
        shown = settings_that_apply(cfg)
        parts.append(
            "<p>As the run was configured; where a setting was auto, the value used "
            f"follows it. {len(cfg) - len(shown)} settings that do not apply to this run "
            "are left out.</p><table>"
            + "".join(
                f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v))}"
                + (f" &rarr; {_e(json.dumps(used[k]))}" if k in used else "")
                + "</td></tr>"
                for k, v in sorted(shown.items())
            )
            + "</table>"
        )
    else:
        parts.append("<p>Not recorded (no summary.json yet).</p>")

    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(folder: str | Path, path: str | Path | None = None, audit: str | Path | None = None) -> Path:
    """Write the report of the run in ``folder`` to ``path`` (default ``folder/report.html``),
    with the ``fedseal audit`` result in the file ``audit`` if given."""
    run = load_run(folder)
    target = Path(path) if path is not None else Path(folder) / REPORT_FILE
    atomic_write(target, render(run, load_audit(audit) if audit else None).encode("utf-8"))
    return target


__all__ = [
    "REPORT_FILE",
    "ReportError",
    "Run",
    "load_audit",
    "load_run",
    "render",
    "settings_that_apply",
    "write_report",
]
