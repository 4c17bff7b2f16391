"""What `pip install .` puts in an environment: the one `fedseal` namespace, and nothing else.

The repository keeps its top-level folders (common/, server/, client/,
simulations/); pyproject.toml maps them under ``fedseal``. Benchmarks and
diagnosis scripts (simulations/bench/) stay in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from source_imports import absolute_imports

ROOT = Path(__file__).resolve().parents[1]
GENERIC = {"common", "server", "client", "simulations"}


def _sources() -> list[Path]:
    """The repository's files as a fresh clone has them (tracked and new, never ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [Path(name) for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """``pip install`` of a copy of the checkout into a fresh venv (no network, no dependencies).

    The dependencies come from the test's own environment through a path-only
    ``.pth`` line (whose own ``.pth`` files, among them this checkout's editable
    finder, are therefore not run), so the installed code is what imports.
    """
    if shutil.which("git") is None:
        pytest.fail("git is needed to list the checkout's files")
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    for rel in _sources():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    # What `pip install .` does, in two steps so that neither needs the network: build
    # the wheel with this environment's setuptools, then install it into the fresh venv.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(base / "dist"),
            str(src),
        ],
        check=True,
        cwd=base,
        capture_output=True,
    )
    env_dir = base / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            *map(str, (base / "dist").glob("fedseal-*.whl")),
        ],
        check=True,
        cwd=base,
        capture_output=True,
    )
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (purelib / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"python": python, "bin": env_dir / "bin", "purelib": purelib, "cwd": base}


def test_only_fedseal_is_installed_at_top_level(installed) -> None:
    top = {p.name for p in installed["purelib"].iterdir()} - {"zz_test_dependencies.pth"}
    assert not top & GENERIC, f"generic top-level packages installed: {sorted(top & GENERIC)}"
    assert {name for name in top if not name.endswith(".dist-info")} == {"fedseal"}, top
    record = next(installed["purelib"].glob("fedseal-*.dist-info"))
    assert (record / "entry_points.txt").read_text().count("fedseal = fedseal.common.cli:main") == 1


def test_benchmarks_stay_in_the_checkout(installed) -> None:
    package = installed["purelib"] / "fedseal"
    shipped = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    repo = {
        p.as_posix() for p in _sources() if p.suffix == ".py" and p.parts[0] in {"common", "server", "client"}
    }
    commands = {
        p.as_posix()
        for p in _sources()
        if p.suffix == ".py" and p.parts[0] == "simulations" and len(p.parts) == 2
    }
    assert {"simulations/__init__.py", "simulations/simulate.py"} <= commands
    assert shipped == repo | commands
    assert (ROOT / "simulations" / "bench" / "utility.py").is_file()


def test_the_installed_code_runs_and_matches_the_checkout_byte_for_byte(installed) -> None:
    """Every installed module imports from the install, the CLI answers, and a site with this
    install accepts a run whose code came from the checkout (same pinned manifest)."""
    script = (
        "import importlib, json, pkgutil, fedseal\n"
        "mods = sorted(m.name for m in pkgutil.walk_packages(fedseal.__path__, 'fedseal.'))\n"
        "files = {m: importlib.import_module(m).__file__ for m in mods}\n"
        "from fedseal.client.pinning import installed_manifest, manifest_digest\n"
        "import sys\n"
        "print(json.dumps({'files': files, 'digest': manifest_digest(installed_manifest()),\n"
        "                  'generic': sorted(set(sys.modules) & {'common', 'server', 'client', 'simulations'})}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(installed["python"]), "-c", script],
        cwd=installed["cwd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "fedseal.client.app" in report["files"] and "fedseal.simulations.simulate" in report["files"]
    outside = {m: f for m, f in report["files"].items() if not f.startswith(str(installed["purelib"]))}
    assert not outside, f"imported from outside the install: {outside}"
    assert report["generic"] == []
    from fedseal.client.pinning import installed_manifest, manifest_digest

    assert report["digest"] == manifest_digest(installed_manifest())
    for args in (["--help"], ["simulate", "--help"], ["client", "--help"]):
        run = subprocess.run(
            [str(installed["bin"] / "fedseal"), *args],
            cwd=installed["cwd"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0 and "usage: fedseal" in run.stdout, run.stderr[-2000:]


def test_no_module_imports_a_generic_top_level_name() -> None:
    """Everything imports ``fedseal.*``; only checkout-side code may import ``simulations.bench``."""
    bad = []
    for rel in _sources():
        if rel.suffix != ".py":
            continue
        checkout_side = rel.parts[0] == "tests" or rel.parts[:2] == ("simulations", "bench")
        for line, name in absolute_imports(ROOT / rel):
            if name.split(".")[0] in GENERIC and not (checkout_side and name.startswith("simulations.bench")):
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, bad
