"""Code pinning: a site runs only the fedseal it installed, whatever a run ships.

Flower sends every run's app (a FAB: a zip of the app's files) to the sites,
and Flower's own ClientApp process would import and run it. A fedseal site
never does: its ClientApp runner (:mod:`fedseal.client.runner`) always runs the
installed ``fedseal.client.app:app``, and before that compares the run's FAB with the
installed code, offline:

- every file of the FAB other than ``pyproject.toml`` and Flower's ``.info/``
  metadata must be one of the installed fedseal Python files
  (``client/``, ``common/``, ``server/``), byte for byte, and every installed
  file must be there;
- the FAB's ``pyproject.toml`` must name ``fedseal.client.app:app`` as its ClientApp.

A run that fails either check is refused before any of it executes, with a
message naming the files that differ. The installed code is summarised by
:func:`manifest_digest` (a byte format fixed by a known-answer test), which
the agent logs at start so the operator can compare it with the server's.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from collections.abc import Mapping
from functools import lru_cache

from fedseal.common.bundle import CLIENT_APP, PACKAGES, package_dir
from fedseal.common.errors import FedsealError

MANIFEST_CONTEXT = b"fedseal code manifest v1\n"
_FAB_METADATA = (".info/",)
_FAB_CONFIG = "pyproject.toml"


class CodePinError(FedsealError, RuntimeError):
    """A run's app is not the fedseal this site installed; the message says what differs."""

    code = "pinning.error"


def _shipped(name: str) -> bool:
    """Whether Flower's FAB builder keeps this Python file (it drops test files)."""
    return name.endswith(".py") and not (name.startswith("test_") or name.endswith("_test.py"))


@lru_cache(maxsize=1)
def installed_manifest() -> Mapping[str, str]:
    """``{relative path: sha256 hex}`` of the installed fedseal Python files."""
    files: dict[str, str] = {}
    for package in PACKAGES:
        root = package_dir(package)
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts or not _shipped(path.name):
                continue
            rel = path.relative_to(root.parent).as_posix()
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def manifest_digest(manifest: Mapping[str, str]) -> str:
    """SHA-256 hex of ``CONTEXT`` and one ``path NUL sha256 LF`` line per file, sorted by path."""
    digest = hashlib.sha256(MANIFEST_CONTEXT)
    for path in sorted(manifest):
        digest.update(path.encode("utf-8") + b"\0" + manifest[path].encode("ascii") + b"\n")
    return digest.hexdigest()


def check_fab(fab: bytes, installed: Mapping[str, str] | None = None) -> None:
    """Refuse a FAB whose code is not exactly ``installed`` (default: this site's fedseal).

    Raises
    ------
    CodePinError
        If the FAB is not a zip, names another ClientApp, or ships any file that
        is missing from, added to, or different from the installed code.
    """
    installed = installed_manifest() if installed is None else installed
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        contents = {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CodePinError(f"the run's app is not a readable Flower app bundle ({exc})") from None
    try:
        project = tomllib.loads(contents.get(_FAB_CONFIG, b"").decode("utf-8"))
        client_app = project["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        client_app = None
    if client_app != CLIENT_APP:
        raise CodePinError(f"the run's ClientApp is {client_app!r}, not fedseal's {CLIENT_APP!r}")
    shipped = {
        name: hashlib.sha256(data).hexdigest()
        for name, data in contents.items()
        if name != _FAB_CONFIG and not name.startswith(_FAB_METADATA)
    }
    changed = sorted(n for n in shipped if n in installed and shipped[n] != installed[n])
    added = sorted(set(shipped) - set(installed))
    missing = sorted(set(installed) - set(shipped))
    if changed or added or missing:
        parts = [
            f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for label, names in (("changed", changed), ("not installed here", added), ("missing", missing))
            if names
        ]
        raise CodePinError(
            "the run ships code that is not the fedseal installed at this site ("
            + "; ".join(parts)
            + f"; installed code {manifest_digest(installed)[:16]}, run's "
            f"{manifest_digest(shipped)[:16]}); nothing of it was run. If the server upgraded "
            "fedseal, install the same version here"
        )


__all__ = ["CodePinError", "check_fab", "installed_manifest", "manifest_digest"]
