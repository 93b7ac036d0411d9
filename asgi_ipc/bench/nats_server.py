"""The throw-away ``nats-server`` channels-nats runs against (``server.py``): core NATS as the
Debian package's binary serves it by default, with no JetStream (channels-nats uses none), so it
writes nothing to disk."""

from __future__ import annotations

import socket
import subprocess

from .server import ThrowAwayServer


class NatsServer(ThrowAwayServer):
    """A throw-away nats-server on a free 127.0.0.1 port."""

    scheme = "nats"

    def command(self) -> list[str]:
        return [self.binary, "--addr", "127.0.0.1", "--port", str(self.port)]

    def answers(self) -> bool:
        # A NATS server greets every connection with its INFO line before anything is sent.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                return s.recv(5).startswith(b"INFO")
        except OSError:
            return False

    def read_version(self) -> str:
        # "nats-server: v2.9.10"
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return out.strip().replace("nats-server: v", "nats-server ")
