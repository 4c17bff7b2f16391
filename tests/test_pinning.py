"""Code pinning: a run's app bundle is accepted only if it is exactly the installed fedseal."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest
from flwr.cli.build import build_fab_from_disk

from fedseal.client.pinning import CodePinError, check_fab, installed_manifest, manifest_digest
from fedseal.common.config import FedConfig
from fedseal.server.launch import write_app


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    return write_app(tmp_path_factory.mktemp("pin") / "app", FedConfig(rounds=2))


def _fab(app_dir) -> bytes:
    return build_fab_from_disk(app_dir)


def _rezip(fab: bytes, change: dict[str, bytes | None]) -> bytes:
    """The bundle with files replaced (bytes), added, or removed (None)."""
    src = zipfile.ZipFile(io.BytesIO(fab))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename not in change:
                dst.writestr(info.filename, src.read(info))
        for name, data in change.items():
            if data is not None:
                dst.writestr(name, data)
    return out.getvalue()


def test_manifest_digest_known_answer():
    # Fixed vector: an accidental change of the byte format fails here.
    assert manifest_digest({"b/x.py": "00" * 32, "a/y.py": "ff" * 32}) == (
        "64ce5e76aaaaa5f004e503c19f1e18cb42d840fe638b1baad9c995c732dffa38"
    )


def test_the_bundle_fedseal_server_ships_is_accepted(app_dir):
    check_fab(_fab(app_dir))  # the run config in pyproject.toml may differ per run
    assert "client/app.py" in installed_manifest() and "server/app.py" in installed_manifest()
    assert not any("test_" in name for name in installed_manifest())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"client/app.py": b"import os\nos.system('curl evil')\n"}, "changed: client/app.py"),
        ({"client/evil.py": b"print('hi')\n"}, "not installed here: client/evil.py"),
        ({"common/secagg/shamir.py": None}, "missing: common/secagg/shamir.py"),
        (
            {"pyproject.toml": b'[tool.flwr.app.components]\nclientapp = "evil:app"\n'},
            "ClientApp is .evil:app.",
        ),
    ],
)
def test_a_bundle_with_other_code_is_refused_naming_it(app_dir, change, match):
    with pytest.raises(CodePinError, match=match):
        check_fab(_rezip(_fab(app_dir), change))


def test_a_bundle_naming_another_client_app_is_refused(app_dir):
    text = (app_dir / "pyproject.toml").read_text().replace('"fedseal.client.app:app"', '"client.evil:app"')
    with pytest.raises(CodePinError, match="'client.evil:app', not fedseal's 'fedseal.client.app:app'"):
        check_fab(_rezip(_fab(app_dir), {"pyproject.toml": text.encode()}))
    with pytest.raises(CodePinError, match="not a readable Flower app bundle"):
        check_fab(b"not a zip")


def test_the_runner_checks_each_bundle_it_receives_not_the_hash_the_server_claims(app_dir):
    """A changed bundle sent under the hash of one the site accepted before is refused:
    the runner remembers verdicts by the bytes it received, never by ``fab.hash_str``."""
    from flwr.supercore.fab import Fab

    from fedseal.client.runner import Runner

    runner = Runner("127.0.0.1:9", b"secret")  # never connects: only its verdicts are used
    good = _fab(app_dir)
    claimed = hashlib.sha256(good).hexdigest()
    assert runner.verdict(Fab(claimed, good, {})) == ""
    evil = _rezip(good, {"client/app.py": b"import os\nos.system('curl evil')\n"})
    assert "changed: client/app.py" in runner.verdict(Fab(claimed, evil, {}))
    assert runner.verdict(Fab(claimed, good, {})) == ""  # the real bundle is still accepted
