"""A throw-away ``redis-server`` for channels_redis to run against: started on a free
127.0.0.1 port with no persistence and a temporary directory, and always stopped (the directory
removed) when the run ends, however it ends. It runs in a process group of its own, so that a
Ctrl-C at the terminal does not kill it under a running workload.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

from .layers import clock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A throw-away redis-server on a free 127.0.0.1 port: no persistence, a temp dir."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.workdir = ""
        self.version = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def __enter__(self) -> RedisServer:
        self.workdir = tempfile.mkdtemp(prefix="asgi_ipc_bench_redis_")
        try:
            # The free port can be taken between our probe and the server's bind: try again.
            for _ in range(3):
                self.port = free_port()
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", self.workdir],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    # A process group of its own: a Ctrl-C at the terminal must not kill it under
                    # a running workload; it is stopped here, after the workloads.
                    start_new_session=True,
                )
                deadline = clock() + 10
                while clock() < deadline and self.proc.poll() is None:
                    if _redis_ping(self.port):
                        self.version = subprocess.run(
                            [self.binary, "--version"], capture_output=True, text=True
                        ).stdout.strip()
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
