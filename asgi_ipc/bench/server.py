"""A throw-away server for peers to run against (``redis_server.py``, ``nats_server.py``):
started on a free 127.0.0.1 port in a temporary directory of its own, and always stopped (the
directory removed) when the run ends, however it ends. It runs in a process group of its own, so
that a Ctrl-C at the terminal does not kill it under a running workload.
"""

from __future__ import annotations

import abc
import shutil
import socket
import subprocess
import tempfile
import time
from typing import ClassVar

from .layers import clock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowAwayServer(abc.ABC):
    """A server on a free 127.0.0.1 port, for the length of a ``with`` block."""

    #: The scheme of ``url``.
    scheme: ClassVar[str]

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.workdir = ""
        self.version = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line that serves on ``self.port`` of 127.0.0.1 only, writing nothing
        outside ``self.workdir``."""

    @abc.abstractmethod
    def answers(self) -> bool:
        """Whether the server on ``self.port`` is up and speaks its protocol."""

    @abc.abstractmethod
    def read_version(self) -> str:
        """What the binary says its version is."""

    def __enter__(self) -> ThrowAwayServer:
        self.workdir = tempfile.mkdtemp(prefix=f"asgi_ipc_bench_{self.scheme}_")
        try:
            # The free port can be taken between our probe and the server's bind: try again.
            for _ in range(3):
                self.port = free_port()
                self.proc = subprocess.Popen(
                    self.command(), cwd=self.workdir,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    # A process group of its own: a Ctrl-C at the terminal must not kill it under
                    # a running workload; it is stopped here, after the workloads.
                    start_new_session=True,
                )
                deadline = clock() + 10
                while clock() < deadline and self.proc.poll() is None:
                    if self.answers():
                        self.version = self.read_version()
                        return self
                    time.sleep(0.05)
                self._stop()
            raise RuntimeError(f"{self.binary} did not start")
        except BaseException:
            self._stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __exit__(self, *exc: object) -> None:
        self._stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
