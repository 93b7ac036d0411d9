"""The throw-away ``redis-server`` channels_redis's two layers run against (``server.py``): no
persistence, its files in the server's temporary directory."""

from __future__ import annotations

import socket
import subprocess

from .server import ThrowAwayServer, free_port

# free_port is the test suite's too (tests/conftest.py and the example site's tests).
__all__ = ["RedisServer", "free_port"]


class RedisServer(ThrowAwayServer):
    """A throw-away redis-server on a free 127.0.0.1 port: no persistence, a temp dir."""

    scheme = "redis"

    def command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.workdir]

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def read_version(self) -> str:
        # "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=..."
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return out.split(" sha=")[0].strip()
