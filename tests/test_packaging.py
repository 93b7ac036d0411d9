"""The distributions as users get them, built from a copy of this tree the way a release is.

``python -m build --no-isolation`` makes the sdist, then the wheel from the unpacked sdist, with the
build backend installed by the ``tests`` extra (no download, about a second). The wheel must hold
the package, its ``py.typed`` and its metadata and nothing else; the sdist must hold everything the
suite needs, so that the suite collected from an unpacked sdist is the suite of this tree and its
tests run there.
"""

from __future__ import annotations

import configparser
import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import asgi_ipc
from asgi_ipc.engine.compiled import MODULES

from .helpers import ROOT

BUILD_TIMEOUT = 300
PYTEST_TIMEOUT = 300
# What a checkout or a previous build leaves beside the sources; none of it is part of a release.
# What building the compiled engine in place leaves beside its sources (setup.py).
BUILT = ("*.so", "*.c")
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]", ".venv", ".tox",
    ".pytest_cache", ".ruff_cache", ".hypothesis", *BUILT,
)


@dataclass
class Dists:
    wheel: Path
    sdist: Path
    unpacked: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Dists:
    # Built from a copy, as the build writes egg-info and build/ beside the sources it reads.
    base = tmp_path_factory.mktemp("packaging")
    source, out = base / "source", base / "dist"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(base / "unpacked", filter="data")
    return Dists(wheel, sdist, base / "unpacked" / f"asgi_ipc-{asgi_ipc.__version__}")


def tree_files(top: Path) -> set[str]:
    """The files under ``top`` that a release carries, relative to ROOT."""
    return {
        path.relative_to(ROOT).as_posix() for path in top.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
        and path.suffix not in (".pyc", *(pattern[1:] for pattern in BUILT))
    }


def tox_pythons() -> list[str]:
    """The Python versions tox.ini tests on, as "3.10", ..."""
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    envs = [env.strip() for env in tox["tox"]["envlist"].split(",")]
    assert all(env.startswith("py3") for env in envs), envs
    return [f"3.{env[3:]}" for env in envs]


def test_wheel_holds_the_package_with_its_metadata_and_no_tests(dists):
    dist_info = f"asgi_ipc-{asgi_ipc.__version__}.dist-info"
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()

    # Every module of the package and of its subpackages (asgi_ipc.bench).
    package = {path.relative_to(ROOT).as_posix() for pattern in ("*.py", "*.pxd")
               for path in (ROOT / "asgi_ipc").rglob(pattern)}
    # Built here, where a C compiler and Cython are found: the compiled engine is in the wheel.
    extensions = {f"asgi_ipc/engine/{module}{sysconfig.get_config_var('EXT_SUFFIX')}"
                  for module in MODULES}
    assert {name for name in names if not name.startswith(dist_info + "/")} == (
        package | extensions | {"asgi_ipc/py.typed"}
    )
    assert f"{dist_info}/licenses/LICENSE" in names

    assert metadata["Name"] == "asgi_ipc"
    assert metadata["Version"] == asgi_ipc.__version__
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["License-File"] == "LICENSE"
    assert metadata["Description-Content-Type"] == "text/x-rst"
    assert metadata.get_payload().startswith((ROOT / "README.rst").read_text().splitlines()[0])

    # The Pythons claimed are the ones tox.ini tests, and the oldest is the one required.
    pythons = tox_pythons()
    classifiers = metadata.get_all("Classifier")
    claimed = [c.rsplit(" :: ", 1)[1] for c in classifiers
               if c.startswith("Programming Language :: Python :: 3.")]
    assert claimed == pythons
    assert metadata["Requires-Python"] == f">={pythons[0]}"
    assert "Typing :: Typed" in classifiers
    assert "License :: OSI Approved :: BSD License" not in classifiers  # License-Expression says it

    requires = metadata.get_all("Requires-Dist")
    assert [r for r in requires if ";" not in r] == ["channels>=4.0", "msgpack>=1.0"]
    assert metadata.get_all("Provides-Extra") == ["tests", "bench", "top", "metrics"]
    for extra in ("tests", "bench"):
        assert f'redis>=5; extra == "{extra}"' in requires
    assert "asgi-ipc = asgi_ipc.cli:main" in entry_points


def test_sdist_holds_everything_the_suite_needs_and_its_suite_runs_from_it(dists):
    with tarfile.open(dists.sdist) as archive:
        top = f"asgi_ipc-{asgi_ipc.__version__}/"
        members = {m.name.removeprefix(top) for m in archive.getmembers() if m.isfile()}
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]
    wanted = (
        tree_files(ROOT / "asgi_ipc") | tree_files(ROOT / "tests") | tree_files(ROOT / "examples")
        | tree_files(ROOT / "benchmarks")
        | {"LICENSE", "README.rst", "pyproject.toml", "setup.py", "tox.ini", "MANIFEST.in"}
    )
    assert wanted - members == set()

    def pytest_in(where: Path, *args: str) -> subprocess.CompletedProcess:
        # PYTHONPATH puts that tree's package first here and in every process the tests start.
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=where, env={**os.environ, "PYTHONPATH": str(where)},
            capture_output=True, text=True, timeout=PYTEST_TIMEOUT,
        )

    def collected(where: Path) -> set[str]:
        run = pytest_in(where, "--collect-only", "-q")
        assert run.returncode == 0, run.stdout + run.stderr
        return {line for line in run.stdout.splitlines() if "::" in line}

    from_sdist = collected(dists.unpacked)
    assert len(from_sdist) > 100
    assert from_sdist == collected(ROOT)

    # Tests that need the helpers, a worker script and the example site, run from the sdist.
    run = pytest_in(
        dists.unpacked, "-q",
        "tests/test_example_site.py::test_each_server_serves_the_site_and_refuses_foreign_origins",
        "tests/test_processes.py",
    )
    assert run.returncode == 0, run.stdout + run.stderr
