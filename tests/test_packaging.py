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
import json
import os
import re
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
from asgi_ipc.engine import compiled
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
    assert metadata.get_all("Provides-Extra") == ["tests", "bench", "redis", "top", "metrics"]
    assert 'redis>=5; extra == "bench"' in requires
    # MultiHostChannelLayer's (asgi_ipc[redis]), which the tests run too.
    for extra in ("tests", "redis"):
        assert f'redis>=5.3; extra == "{extra}"' in requires
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


# Opens two stores, so that the warning shows once per process, not once per store.
OPEN_TWO_STORES = """
import asyncio, sys
from asgi_ipc import IPCChannelLayer, unlink

async def main():
    for name in sys.argv[1:]:
        layer = IPCChannelLayer(prefix=name, channel_memory=1 << 20, group_memory=1 << 20)
        await layer.send("c", {})
        await layer.close()

asyncio.run(main())
import asgi_ipc
print(asgi_ipc.ENGINE)
"""


def test_a_wheel_whose_compiler_failed_says_so_at_first_use(dists, tmp_path, prefix):
    source = tmp_path / "source"
    shutil.copytree(dists.unpacked, source)
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir",
         str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, env={**os.environ, "CC": "false"},
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert not wheel.name.endswith("-none-any.whl")  # tagged for the platform all the same
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        assert not [name for name in archive.namelist() if name.endswith(".so")]
        record = archive.read("asgi_ipc/engine/build-failed.txt").decode()
        archive.extractall(installed)
    assert record.count("CompileError") == len(MODULES), record

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(installed), **env})

    other = prefix + "x"
    try:
        used = run("-c", OPEN_TWO_STORES, prefix, other)
        assert (used.returncode, used.stdout) == (0, "python\n"), used.stderr
        assert used.stderr.count("asgi_ipc runs its pure-Python engine") == 1, used.stderr
        assert ("the compiled engine failed to build when asgi_ipc was installed (CompileError: "
                in used.stderr)
        assert "apt-get install gcc python3-dev" in used.stderr
        chosen = run("-c", OPEN_TWO_STORES, prefix, other, ASGI_IPC_PURE_PYTHON="1")
        assert (chosen.returncode, chosen.stdout, chosen.stderr) == (0, "python\n", "")
        stats = run("-m", "asgi_ipc", "stats", "--prefix", prefix)
        assert re.search(r"^  engine +python \(this command's\): the compiled engine failed to "
                         r"build when asgi_ipc was installed \(CompileError: ", stats.stdout, re.M)
        report = json.loads(run("-m", "asgi_ipc", "stats", "--prefix", prefix, "--json").stdout)
        assert report["engine"] == "python"
        assert report["engine_not_built"].startswith("CompileError: ")
    finally:
        asgi_ipc.unlink(other)


@pytest.mark.skipif(not compiled.built(), reason="the compiled engine is not built here")
def test_an_editable_install_compiles_only_what_changed(tmp_path):
    """A copy of this tree with its compiled engine, installed editable with a C compiler that
    always fails: nothing to compile, nothing fails; then one module edited: that one alone is
    compiled, and fails."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".tox", "build-failed.txt"))
    venv = tmp_path / "venv"
    # With this interpreter's pip and build backend, not the older ones a venv gets its own.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=BUILD_TIMEOUT)

    def install() -> str | None:
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps",
             "--no-build-isolation", "-e", str(source)],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT,
            env={**os.environ, "CC": "false", "PYTHONPATH": ""},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        record = source / "asgi_ipc" / "engine" / "build-failed.txt"
        return record.read_text() if record.exists() else None

    assert install() is None
    (source / "asgi_ipc" / "engine" / "queues.py").touch()
    record = install()
    assert record is not None and len(record.splitlines()) == 1 and "queues.c" in record
