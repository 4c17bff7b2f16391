"""House rules a newcomer relies on: one error family, no import circles, a CLI that helps.

The error walk and the import graph read the installed package itself, so a new
exception class outside the family, or a new module that imports back into one
that imports it, fails here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedseal.common.cli import fedseal_version, main
from fedseal.common.errors import FedsealError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "common": "fedseal.common",
    "client": "fedseal.client",
    "server": "fedseal.server",
    "simulations": "fedseal.simulations",
}


def _modules() -> dict[str, Path]:
    """``dotted name -> file`` for every module of the installed package."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "bench" in path.relative_to(ROOT / folder).parts:
                continue  # the benchmarks are run from the checkout, not installed
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def test_every_exception_fedseal_defines_is_a_fedseal_error_with_a_stable_code():
    classes = []
    for name in MODULES:
        module = importlib.import_module(name)
        classes += [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, Exception) and c.__module__ == name
        ]
    assert len(classes) > 25  # the walk found the package's errors
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, FedsealError)]
    assert not outside, f"not FedsealError: {outside}"
    for cls in classes:
        if not isinstance(cls.code, property):  # a refusal's code is its own (refusals.Code)
            assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", cls.code), (cls, cls.code)


def _imports(path: Path) -> set[str]:
    """The fedseal modules ``path`` imports anywhere (functions too), except for type checking."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names & MODULES.keys()


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            part = []
            while True:
                other = stack.pop()
                part.append(other)
                if other == node:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_no_module_imports_back_into_one_that_imports_it():
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 100  # the walk saw the package's imports
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_version_and_a_mistyped_command_or_option(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedseal {fedseal_version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", fedseal_version())
    assert main(["simulat"]) == 2
    assert "did you mean 'simulate'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "--rund", "3"])
    assert stop.value.code == 2
    assert "--rund -> --rounds" in capsys.readouterr().err


def test_help_cut_short_by_its_reader_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedseal.common.cli", "simulate", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.read(10)
    proc.stdout.close()  # as `| head -c 10` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_a_model_folder_without_a_model_is_named_with_what_to_do(tmp_path):
    from fedseal.common.model import ModelError, resolve_model_path

    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("org/model") == "org/model"  # a hub name passes through


def test_one_site_with_secure_aggregation_gets_advice_that_ends():
    from fedseal.common.config import ConfigError, FedConfig

    with pytest.raises(ConfigError, match="--no-secagg"):
        FedConfig(clients=1, min_clients=1)
    assert FedConfig(clients=1, min_clients=1, secagg=False).clients == 1


def test_every_package_module_is_seen_by_the_walks():
    installed = {
        m.name
        for package in PACKAGES.values()
        for m in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}.")
    }
    assert {m for m in installed if ".bench" not in m} <= MODULES.keys()


def test_the_server_never_imports_opacus_so_its_progress_lines_show():
    # Opacus configures the root logger when imported; the deployed server's process would
    # then drop its INFO lines (the progress a server operator follows in `flwr log`).
    code = (
        "import logging, sys\n"
        "import fedseal.server.app\n"
        "assert 'opacus' not in sys.modules, 'the server imports Opacus'\n"
        "from fedseal.common.cli_args import setup_logging\n"
        "setup_logging()\n"
        "logging.getLogger('fedseal').info('round 2/2: 3 site(s) training')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\d\d:\d\d:\d\d INFO fedseal: round 2/2: 3 site\(s\) training", done.stderr)
