"""What every fedseal run ships as its Flower app bundle (FAB).

One vocabulary for the server, which writes the bundle (:func:`fedseal.server.launch.write_app`),
and the site, which refuses any bundle that is not its own installed code
(:mod:`fedseal.client.pinning`). The bundle's folders are the repository's
``client/``, ``common/`` and ``server/``, whatever the installed layout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = ("client", "common", "server")  # the folders of every run's bundle
SERVER_APP = "fedseal.server.app:app"
CLIENT_APP = "fedseal.client.app:app"


def package_dir(name: str) -> Path:
    """The installed folder of ``fedseal.<name>`` (``name`` one of :data:`PACKAGES`), found
    without importing it (common/ imports neither client/ nor server/)."""
    spec = importlib.util.find_spec(f"fedseal.{name}")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"fedseal.{name} is not installed")
    return Path(spec.submodule_search_locations[0]).resolve()


__all__ = ["CLIENT_APP", "PACKAGES", "SERVER_APP", "package_dir"]
