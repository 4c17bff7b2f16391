"""The run report page and the TensorBoard scalars.

The report is written from small run folders made here (a DP run, a
non-private run, a run whose remote parties chose hostile names), checked as
HTML, opened in headless Chromium from disk, and written by a tiny real run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedseal.common.cli import main as cli_main
from fedseal.server.metrics import NON_PRIVATE, TensorBoardLog, round_scalars
from fedseal.server.report import REPORT_FILE, ReportError, load_run, render, write_report

CHROMIUM_MISSING = (
    "chromium not found on PATH: the report test needs Debian's chromium "
    "package; install it with `apt-get install chromium` (`make test` does, as root)"
)
HOSTILE_SITE = "<script>alert('site')</script>"
HOSTILE_REASON = '<img src=x onerror="alert(1)"> budget & more'
MATH_SITE = r"$\frac{1}{$"  # unbalanced mathtext: must not break matplotlib


def _row(rnd: int, *, private: bool = True, sites=("alpha", "beta", "gamma"), **extra) -> dict:
    row = {
        "round": rnd,
        "accuracy": 0.5 + 0.1 * rnd,
        "macro_f1": 0.45 + 0.1 * rnd,
        "loss": 0.7 - 0.1 * rnd,
        "private": private,
        "secagg": True,
        "epsilon": {s: 2.0 * rnd + 0.1 * i for i, s in enumerate(sites)} if private else {},
        "delta": {s: 1e-5 * (1 + i) for i, s in enumerate(sites)} if private else {},
        "contributors": list(sites),
        "refused": {},
        "failed": {},
        "abandoned": "",
        "bytes_sent": 1000,
        "bytes_received": 900,
        "seconds": 1.5,
    }
    if not private:
        row["privacy"] = NON_PRIVATE
    row.update(extra)
    return row


def write_run(folder: Path, rows: list[dict], *, private: bool = True, confusion=None) -> Path:
    """A run folder as the server leaves it: metrics.jsonl and summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "final_accuracy": rows[-1]["accuracy"],
        "rounds": len(rows),
        "private": private,
        "secagg": True,
        "epsilon_max": 6.2 if private else None,
        "config": {
            "dp": private,
            "epsilon": 8.0,
            "delta": 1e-5,
            "rounds": len(rows),
            "model": "tiny",
            "labels": ["negative", "positive"],
        },
        "confusion": confusion or {"labels": ["negative", "positive"], "matrix": [[150, 50], [30, 170]]},
    }
    if not private:
        summary["privacy"] = NON_PRIVATE
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def dp_run(tmp_path) -> Path:
    rows = [
        _row(1),
        _row(2, refused={"gamma": "budget exhausted"}, contributors=["alpha", "beta"]),
        _row(3, failed={"beta": "timeout"}, abandoned="too few survivors", contributors=[]),
    ]
    return write_run(tmp_path / "dp", rows)


@pytest.fixture
def open_run(tmp_path) -> Path:
    return write_run(tmp_path / "open", [_row(1, private=False), _row(2, private=False)], private=False)


def _images(page: str) -> list[bytes]:
    """The PNG bytes of every <img> on the page (all must be data: URIs)."""
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    return [base64.b64decode(s.split(",", 1)[1], validate=True) for s in sources]


def _png_shape(data: bytes) -> tuple[int, int, int]:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).shape


def test_dp_report_has_every_section_embedded(dp_run):
    path = write_report(dp_run)
    assert path == dp_run / REPORT_FILE
    page = path.read_text(encoding="utf-8")
    images = _images(page)
    # quality, epsilon, participation, confusion: every one a real, non-trivial PNG
    assert len(images) == 4
    for data in images:
        height, width, _ = _png_shape(data)
        assert width >= 300 and height >= 200
    assert "NON-PRIVATE" not in page
    assert "Content-Security-Policy" in page and "<script" not in page
    # No external resource at all: every src/href is a data: URI.
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    for text in (
        "budget exhausted",
        "timeout",
        "too few survivors",
        "ε max 6.200 of budget 8",
        "Confusion matrix",
        "Settings",
        "alpha, beta",
        "<th>max δ</th>",
        "<td>6.200</td><td>3e-05</td>",
    ):
        assert text in page, text


def test_non_private_run_carries_a_red_banner(open_run):
    page = write_report(open_run).read_text(encoding="utf-8")
    assert '<div class="nonprivate" role="alert">NON-PRIVATE RUN' in page
    assert page.index("NON-PRIVATE RUN") < page.index("<h2>")  # before anything else
    assert "<title>NON-PRIVATE" in page and NON_PRIVATE in page
    assert len(_images(page)) == 3  # no epsilon plot: there is no accounting to show


def test_one_non_private_round_is_enough_for_the_banner(tmp_path):
    folder = write_run(tmp_path / "mixed", [_row(1), _row(2, private=False)])
    assert "NON-PRIVATE RUN" in render(load_run(folder))


def test_hostile_names_and_reasons_are_escaped(tmp_path):
    sites = ("alpha", HOSTILE_SITE, MATH_SITE)
    rows = [
        _row(1, sites=sites, refused={HOSTILE_SITE: HOSTILE_REASON}),
        _row(2, sites=sites, failed={MATH_SITE: "</td></table><h1>forged</h1>"}, abandoned="<b>x</b>"),
    ]
    folder = write_run(
        tmp_path / "hostile", rows, confusion={"labels": ["<i>neg</i>", "$pos"], "matrix": [[3, 1], [0, 4]]}
    )
    page = write_report(folder).read_text(encoding="utf-8")
    for raw in (HOSTILE_SITE, HOSTILE_REASON, "<h1>forged</h1>", "<b>x</b>", "<i>neg</i>"):
        assert raw not in page
    assert "&lt;script&gt;alert(&#x27;site&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt; budget &amp; more" in page
    assert "&lt;h1&gt;forged&lt;/h1&gt;" in page
    assert len(_images(page)) == 4  # the mathtext-looking names did not break a plot


def test_a_run_still_going_on_gets_a_page_of_its_rounds(tmp_path):
    folder = tmp_path / "running"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps(_row(1)) + "\n")
    page = render(load_run(folder))
    assert "No summary.json" in page and len(_images(page)) == 3


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "metrics.jsonl does not exist"),
        ("{not json\n", "line 1 is not JSON"),
        ('{"accuracy": 0.5}\n', "has no integer 'round'"),
        ('{"round": 1, "epsilon": [1, 2]}\n', "'epsilon' must be an object"),
        ('{"round": 1, "delta": "1e-5"}\n', "'delta' must be an object"),
    ],
)
def test_bad_run_folders_give_clear_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message):
        write_report(tmp_path)
    assert not (tmp_path / REPORT_FILE).exists()


def test_report_command(dp_run, tmp_path, capsys):
    assert cli_main(["report", str(dp_run)]) == 0
    assert capsys.readouterr().out.strip() == str(dp_run / REPORT_FILE)
    assert (dp_run / REPORT_FILE).is_file()
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_confusion_matrix_counts_true_by_predicted():
    from fedseal.common.batches import confusion_matrix

    gold = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    assert confusion_matrix(gold, pred, 3) == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert confusion_matrix(np.array([], dtype=int), np.array([], dtype=int), 2) == [[0, 0], [0, 0]]


# -- headless Chromium ----------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("FEDSEAL_REQUIRE_CHROMIUM") or os.environ.get("CI"):  # missing is a failure
        pytest.fail(CHROMIUM_MISSING)
    pytest.skip(CHROMIUM_MISSING)


def _screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    """Open ``page`` from disk in headless Chromium, no network; the screenshot's RGB pixels."""
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1200,3000",
        f"--screenshot={shot}",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _pixels_near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 8) -> int:
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).sum())


TAB = {
    "blue": (31, 119, 180),
    "orange": (255, 127, 14),
    "purple": (148, 103, 189),
    "green": (44, 160, 44),
    "red": (214, 39, 40),
}
BANNER_RED = (192, 0, 0)
DARKEST_BLUES = (8, 48, 107)  # matplotlib's Blues colormap at its maximum


@pytest.mark.slow
def test_chromium_renders_every_plot(dp_run, open_run, tmp_path):
    img = _screenshot(write_report(dp_run), tmp_path / "dp")
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500  # not a blank or text-only page
    # Each plot has a colour no other part of the page uses: each was decoded and drawn.
    assert _pixels_near(img, TAB["blue"]) > 300  # accuracy line
    assert _pixels_near(img, TAB["purple"]) > 300  # loss line
    assert _pixels_near(img, TAB["red"]) > 300  # the budget line and the failed bar
    assert _pixels_near(img, TAB["green"]) > 3000  # contributor bars
    assert _pixels_near(img, DARKEST_BLUES) > 3000  # the confusion matrix's busiest cell
    assert _pixels_near(img, BANNER_RED) == 0

    img = _screenshot(write_report(open_run), tmp_path / "open")
    banner = img[:400]  # the top of the page: the banner before anything else
    assert _pixels_near(banner, BANNER_RED, tol=4) > 50_000
    assert _pixels_near(img, TAB["green"]) > 3000


# -- TensorBoard ----------------------------------------------------------------------------------


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_round_scalars_name_every_number():
    row = _row(2, refused={"gamma": "no"}, contributors=["alpha", "beta"])
    assert round_scalars(row) == {
        "eval/accuracy": pytest.approx(0.7),
        "eval/loss": pytest.approx(0.5),
        "eval/macro_f1": pytest.approx(0.65),
        "privacy/epsilon_max": pytest.approx(4.2),
        "privacy/epsilon/alpha": 4.0,
        "privacy/epsilon/beta": pytest.approx(4.1),
        "privacy/epsilon/gamma": pytest.approx(4.2),
        "sites/contributors": 2.0,
        "sites/refused": 1.0,
        "sites/failed": 0.0,
    }
    assert not any(k.startswith("privacy/") for k in round_scalars(_row(1, private=False)))


def test_tensorboard_events_read_back_and_a_resume_replaces_its_rounds(tmp_path):
    board = TensorBoardLog(tmp_path, first_round=1, private=True, settings={"epsilon": 8.0})
    for rnd in (1, 2, 3):
        board.append(_row(rnd))
    board.close()
    # A server that crashed after logging round 3 but before checkpointing it resumes at 3.
    board = TensorBoardLog(tmp_path, first_round=3, private=True, settings={"epsilon": 8.0})
    for rnd in (3, 4):
        board.append(_row(rnd, accuracy=0.25))
    board.close()
    scalars = _scalars(tmp_path)
    assert scalars["eval/accuracy"] == [(1, 0.6), (2, 0.7), (3, 0.25), (4, 0.25)]
    assert [s for s, _ in scalars["privacy/epsilon/beta"]] == [1, 2, 3, 4]
    assert scalars["privacy/epsilon_max"][0] == (1, 2.2)
    assert scalars["sites/contributors"][-1] == (4, 3.0)


# -- a real run -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_run_writes_its_report_and_tensorboard(tiny_bert, tmp_path):
    from fedseal.common.config import FedConfig
    from fedseal.common.data import write_examples
    from fedseal.common.synthetic import synthetic_examples
    from fedseal.server.app import run_federation
    from fedseal.simulations.simulate import prepare_sites
    from simulations.bench.local_grid import RUN_ID, LocalGrid

    out, board = tmp_path / "run", tmp_path / "tb"
    train = write_examples(synthetic_examples(240, seed=1), tmp_path / "train.jsonl")
    held_out = write_examples(synthetic_examples(100, seed=2), tmp_path / "eval.jsonl")
    cfg = prepare_sites(
        FedConfig(
            model=tiny_bert,
            clients=2,
            rounds=2,
            secagg=False,
            train=str(train),
            eval=str(held_out),
            local_steps=2,
            batch_size=16,
            max_length=16,
            epsilon=4.0,
            accountant="rdp",
            out=str(out),
            tensorboard=str(board),
        )
    )
    summary = run_federation(LocalGrid(2), cfg, run_id=RUN_ID)
    matrix = summary["confusion"]["matrix"]
    assert summary["confusion"]["labels"] == list(cfg.labels)
    assert sum(map(sum, matrix)) == 100
    assert sum(matrix[i][i] for i in range(len(matrix))) == round(summary["final_accuracy"] * 100)
    page = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert len(_images(page)) == 4 and "NON-PRIVATE" not in page
    assert "site-0" in page and "site-1" in page
    scalars = _scalars(board)
    assert [s for s, _ in scalars["eval/accuracy"]] == [1, 2]
    assert scalars["eval/accuracy"][-1][1] == pytest.approx(summary["final_accuracy"], abs=1e-5)
    assert {"privacy/epsilon/site-0", "privacy/epsilon/site-1"} <= set(scalars)


def test_the_settings_table_leaves_out_what_does_not_apply_and_shows_auto_resolved():
    from fedseal.common.config import FedConfig
    from fedseal.server.report import Run, settings_that_apply

    probe = FedConfig().to_dict()
    shown = settings_that_apply(probe)
    assert not {"lora_r", "lora_targets", "adam_tau", "alpha", "max_colluders"} & set(shown)
    assert {"epsilon", "secagg_k", "update_clip", "finetune"} <= set(shown)
    plain = settings_that_apply(FedConfig(dp=False, secagg=False, finetune="lora", rounds=3).to_dict())
    assert "lora_r" in plain and not {"epsilon", "secagg_k", "dp_noise"} & set(plain)
    row = {"round": 1, "contributors": ["a"], "abandoned": "", "seconds": 2.0}
    page = render(
        Run(
            Path("."),
            [load_run_row(row)],
            {"config": probe, "settings_used": {"secagg_k": "4 for a round of 3 sites"}},
        )
    )
    assert f"{len(probe) - len(shown)} settings that do not apply" in page
    assert "<th>secagg_k</th><td>&quot;auto&quot; &rarr; &quot;4 for a round of 3 sites&quot;" in page
    assert "<th>lora_r</th>" not in page


def load_run_row(data: dict):
    from fedseal.server.report import parse_row

    return parse_row(data, "line 1")
