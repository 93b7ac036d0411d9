"""Running ``ns_worker.py`` roles as subprocesses (under ``unshare`` or another user) and
following what they print."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from asgi_ipc import IPCChannelLayer
from asgi_ipc.engine.layout import wake_dir

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "ns_worker.py")
# Whatever a role's subprocess cannot say in this long is a hang: the test fails.
PATIENCE = 60.0


class Worker:
    """One ns_worker.py role in a subprocess, run through ``wrapper`` (e.g. unshare)."""

    def __init__(self, wrapper: list[str], role: str, prefix: str, *args: object) -> None:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, WORKER, role, prefix, *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=path),
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("")  # end of output

    def expect(self, word: str, timeout: float = PATIENCE) -> list[str]:
        """The words of the next line, which must start with ``word``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.proc.args[-3:]} said nothing within {timeout} s (a lost ring?)")
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


@pytest.fixture
def workers():
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait(10)


def slot_table(layer: IPCChannelLayer) -> list[tuple[int, int]]:
    """(slot, token) of every slot with a token recorded."""
    store = layer.engine()
    return store.locked(lambda: [(slot, token) for slot, _pid, token in store.slots.live()])


def wait_for(condition, what: str, timeout: float = PATIENCE):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return result


def doorbells(prefix: str) -> list[str]:
    """The sockets in the prefix's wake-up directory."""
    try:
        return sorted(os.listdir(wake_dir(prefix)))
    except FileNotFoundError:
        return []
