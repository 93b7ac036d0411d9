"""Plain helpers of the suite (its fixtures are in conftest.py, the code its child processes run
in workers.py, ns_worker.py and small_shm_child.py): prefixes and the paths of their objects,
free ports, waiting for a condition, the CLI and ``django check`` as subprocesses, and the
subprocess side of ns_worker.py. It does not import pytest, so that the children of workers.py
can import it.

Every wait here has a generous deadline whose only purpose is to turn a hang into a failure."""

from __future__ import annotations

import multiprocessing
import os
import queue
import secrets
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from asgi_ipc import IPCChannelLayer
from asgi_ipc.engine import compiled
from asgi_ipc.engine.layout import SHM_DIR, store_path, wake_dirs

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
# Whatever a child process cannot say or do in this long is a hang: the test fails.
PATIENCE = 60.0
# Every prefix handed out, so that the end of the session can tell which were left behind.
made_prefixes: set[str] = set()

T = TypeVar("T")

# The engines a child process can run (workers.start_piped's ``engine``): the compiled one only
# where it is built. A child of the other engine than this process's makes a mixed pair.
ENGINES = [
    "python",
    pytest.param("compiled", marks=pytest.mark.skipif(
        not compiled.built(), reason="the compiled engine is not built here")),
]


def new_prefix() -> str:
    prefix = "t" + secrets.token_hex(6)
    made_prefixes.add(prefix)
    return prefix


def shm_path(prefix: str) -> str:
    return store_path(prefix)


def left_behind(prefix: str) -> bool:
    """Whether anything of ``prefix`` is in /dev/shm: its store, or anything named after it
    (its wake-up directories, or what a test planted beside them)."""
    name = os.path.basename(store_path(prefix))
    return any(entry == name or entry.startswith(name + "+") for entry in os.listdir(SHM_DIR))


def write_object(prefix: str, data: bytes) -> None:
    """Make the prefix's shared-memory object hold exactly ``data``, whatever it held before."""
    fd = os.open(shm_path(prefix), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def verify_clean(layer: IPCChannelLayer) -> None:
    """Assert the store walks clean (no-op for other backends)."""
    if isinstance(layer, IPCChannelLayer):
        problems = layer.engine().verify()
        assert problems == [], problems


def pythonpath(*first: object) -> str:
    """A PYTHONPATH with ``first`` ahead of the one the suite runs with (the tree under test)."""
    return os.pathsep.join(filter(None, [*map(str, first), os.environ.get("PYTHONPATH")]))


def wait_until(condition: Callable[[], T], what: str = "", timeout: float = PATIENCE) -> T:
    """Poll ``condition`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
    return result


def cli(
    *args: str, under: list[str] | None = None, timeout: float = 60, **options: Any
) -> subprocess.CompletedProcess[str]:
    """``python -m asgi_ipc ARGS`` with the tree under test, run through ``under`` (e.g.
    unshare) if given."""
    return subprocess.run(
        [*(under or []), sys.executable, "-m", "asgi_ipc", *args], capture_output=True,
        text=True, timeout=timeout, **options,
    )


def gone(pid: int) -> bool:
    """Whether process ``pid`` (not necessarily our child) has exited; a zombie has, and its
    descriptors are closed."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


SPAWN = multiprocessing.get_context("spawn")


def start(children: list, target: Callable[..., object], *args: object):
    """A fresh interpreter running ``target(*args)``, added to the ``children`` fixture."""
    child = SPAWN.Process(target=target, args=args)
    child.start()
    children.append(child)
    return child


# --- the Django system check, run by a real `django check` ------------------------------------

SETTINGS = """
SECRET_KEY = "test-only"
INSTALLED_APPS = ["channels", "asgi_ipc"]
DATABASES = {{}}
CHANNEL_LAYERS = {layers}
"""


def django_check(tmp_path: Path, layers: str, shm: str | None = None, before: str = "",
                 after: str = "", settings: str = "") -> tuple[int, str]:
    """``django check`` on a settings module whose CHANNEL_LAYERS is ``layers``, with the Python
    code ``settings`` at its end: its exit status, and its output. With ``shm``, it runs in a
    mount namespace of its own whose /dev/shm is a tmpfs mounted with those options, after the
    Python code ``before`` and followed by the Python code ``after`` (run there too, and
    printing after the check's output)."""
    (tmp_path / "checksettings.py").write_text(
        textwrap.dedent(SETTINGS.format(layers=layers)) + textwrap.dedent(settings)
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "checksettings",
        "PYTHONPATH": pythonpath(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [sys.executable, "-m", "django", "check"]
    if shm:
        (tmp_path / "before.py").write_text(textwrap.dedent(before))
        (tmp_path / "after.py").write_text(textwrap.dedent(after))
        run = shlex.join(command)
        python = shlex.quote(sys.executable)
        command = [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs -o {shm} tmpfs /dev/shm && {python} before.py && "
            f"{{ {run}; status=$?; }} && {python} after.py && exit $status",
        ]
    done = subprocess.run(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=120,
    )
    return done.returncode, done.stdout


# --- the subprocess side of ns_worker.py -------------------------------------------------------

WORKER = str(ROOT / "tests" / "ns_worker.py")


class Worker:
    """One ns_worker.py role in a subprocess, run through ``wrapper`` (e.g. unshare)."""

    def __init__(self, wrapper: list[str], role: str, prefix: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, WORKER, role, prefix, *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=pythonpath(ROOT)),
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("")  # end of output

    def expect(self, word: str, timeout: float = PATIENCE) -> list[str]:
        """The words of the next line, which must start with ``word``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.proc.args[-3:]} said nothing within {timeout} s (a lost ring?)"
            ) from None
        assert line.split()[:1] == [word], f"expected {word!r}, got {line!r}"
        return line.split()

    def stop(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def slot_table(layer: IPCChannelLayer) -> list[tuple[int, int]]:
    """(slot, token) of every slot with a token recorded."""
    store = layer.engine()
    return store.locked(lambda: [(slot, token) for slot, _pid, token in store.slots.live()])


def doorbells(prefix: str) -> list[str]:
    """The sockets in the prefix's wake-up directories."""
    return sorted(entry for directory in wake_dirs(prefix) for entry in os.listdir(directory))
