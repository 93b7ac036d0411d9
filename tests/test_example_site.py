"""End-to-end tests of the example site in examples/chat, run as it would be deployed.

Each test starts three real processes on loopback sharing one layer prefix: daphne and uvicorn
serving the site on two ports, and ``manage.py runworker chat-worker``. Clients are real WebSocket
connections, so a message that reaches a client on the other server has crossed processes through
the shared-memory layer and nothing else.

``run_chat_site`` is also used by the browser tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets

from asgi_ipc import IPCChannelLayer
from asgi_ipc.bench.redis_server import free_port

from .helpers import pythonpath

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "chat"
START_TIMEOUT = 30
REPLY_TIMEOUT = 10
STOP_TIMEOUT = 5


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, room: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/{room}/"


@dataclass
class ChatSite:
    prefix: str
    servers: list[Server]
    worker: subprocess.Popen
    log_dir: Path

    def logs(self) -> str:
        """Every process's output, for the message of a failed assertion."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def wait_for_port(port: int, proc: subprocess.Popen, describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}\n{describe()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {START_TIMEOUT} s\n{describe()}")


def stop(procs: list[subprocess.Popen]) -> None:
    # Signal every process before waiting on any, so they shut down in parallel.
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def run_chat_site(prefix: str, log_dir: Path) -> Iterator[ChatSite]:
    """Daphne and uvicorn serving the example site, and its worker, all stopped on exit."""
    env = {
        **os.environ,
        "CHAT_LAYER_PREFIX": prefix,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "PYTHONPATH": pythonpath(EXAMPLE_DIR),
        # The example directory is part of the repository: running it must not write there.
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    app = "chatsite.asgi:application"
    daphne_port, uvicorn_port = free_port(), free_port()
    commands = {
        "daphne": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(daphne_port), app],
        "uvicorn": [
            sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1",
            "--port", str(uvicorn_port), "--lifespan", "off",
        ],
        "worker": [sys.executable, "manage.py", "runworker", "chat-worker"],
    }
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with open(log_dir / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(
                    command, cwd=EXAMPLE_DIR, env=env, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT,
                )
        site = ChatSite(
            prefix=prefix,
            servers=[
                Server("daphne", daphne_port, procs["daphne"]),
                Server("uvicorn", uvicorn_port, procs["uvicorn"]),
            ],
            worker=procs["worker"],
            log_dir=log_dir,
        )
        for server in site.servers:
            wait_for_port(server.port, server.proc, site.logs)
        yield site
    finally:
        stop(list(procs.values()))


@pytest.fixture
def site(prefix, tmp_path):
    # Depending on ``prefix`` makes its removal of the shared memory run after the processes
    # using it have stopped.
    with run_chat_site(prefix, tmp_path) as running:
        yield running


@pytest.fixture
async def layer(site):
    """A layer in the test process attached to the site's store, as a third kind of process."""
    ipc = IPCChannelLayer(prefix=site.prefix)
    try:
        yield ipc
    finally:
        await ipc.close()


def connect(server: Server, room: str):
    # The site refuses WebSockets from other origins, as a browser on the page would not be.
    return websockets.connect(server.ws_url(room), origin=server.http_url, open_timeout=10)


async def next_json(ws, site: ChatSite) -> dict:
    try:
        return json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT))
    except asyncio.TimeoutError:
        pytest.fail(f"no message within {REPLY_TIMEOUT} s\n{site.logs()}")


async def join(server: Server, room: str, site: ChatSite, stack: contextlib.AsyncExitStack):
    ws = await stack.enter_async_context(connect(server, room))
    welcome = await next_json(ws, site)
    assert welcome == {"type": "welcome", "room": room, "server_pid": server.proc.pid}
    return ws


def memberships(layer: IPCChannelLayer) -> int:
    return layer.engine().inspect()["memberships"]


def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.url, response.read().decode()


async def test_each_server_serves_the_site_and_refuses_foreign_origins(site):
    for server in site.servers:
        status, _, body = await asyncio.to_thread(http_get, server.http_url + "/")
        assert status == 200 and 'id="room-input"' in body

        status, url, body = await asyncio.to_thread(http_get, server.http_url + "/?room=lobby")
        assert status == 200 and url == server.http_url + "/chat/lobby/"
        for element in ('id="messages"', 'id="message-input"', 'id="send-button"'):
            assert element in body
        assert f"served by process {server.proc.pid}" in body

        with pytest.raises(urllib.error.HTTPError) as missing:
            await asyncio.to_thread(http_get, server.http_url + "/chat/no%20spaces/")
        assert missing.value.code == 404

        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url("lobby"), origin="http://evil.example")
        assert refused.value.response.status_code == 403


async def test_message_said_on_one_server_reaches_the_room_on_the_other(site):
    daphne, uvicorn = site.servers
    async with contextlib.AsyncExitStack() as stack:
        ann = await join(daphne, "lobby", site, stack)
        bob = await join(uvicorn, "lobby", site, stack)
        cid = await join(uvicorn, "elsewhere", site, stack)

        await ann.send(json.dumps({"command": "say", "text": " hello bob ", "author": "ann"}))
        said = {"type": "message", "text": "hello bob", "author": "ann",
                "server_pid": daphne.proc.pid}
        assert await next_json(bob, site) == said
        # The sender is a member of the room too and sees its own message come back.
        assert await next_json(ann, site) == said

        # A channel's messages arrive in order, so had the lobby's message leaked into the other
        # room, cid would read it before its own.
        await cid.send(json.dumps({"command": "say", "text": "anyone?", "author": "cid"}))
        assert (await next_json(cid, site))["text"] == "anyone?"

        # Bad input is answered, and the connection stays usable.
        await bob.send("not json")
        assert await next_json(bob, site) == {"type": "error", "reason": "frames must be JSON text"}
        await bob.send(json.dumps({"command": "say", "text": "   "}))
        assert await next_json(bob, site) == {
            "type": "error", "reason": "text must be a non-empty string",
        }
        await bob.send(json.dumps({"command": "dance", "text": "now"}))
        assert await next_json(bob, site) == {"type": "error", "reason": "unknown command 'dance'"}
        await bob.send(json.dumps({"command": "say", "text": "still here"}))
        for ws in (bob, ann):
            got = await next_json(ws, site)
            assert (got["text"], got["author"], got["server_pid"]) == (
                "still here", "anonymous", uvicorn.proc.pid,
            )


async def test_shout_is_handled_by_the_worker_process_and_answered_to_the_sender(site):
    daphne, uvicorn = site.servers
    async with contextlib.AsyncExitStack() as stack:
        ann = await join(daphne, "lobby", site, stack)
        bob = await join(uvicorn, "lobby", site, stack)

        await ann.send(json.dumps({"command": "shout", "text": "quiet please"}))
        assert await next_json(ann, site) == {
            "type": "shout", "text": "QUIET PLEASE", "count": 1, "worker_pid": site.worker.pid,
        }
        # The count lives in the worker process, so it carries on whichever server asks.
        await bob.send(json.dumps({"command": "shout", "text": "Ünïcode too"}))
        assert await next_json(bob, site) == {
            "type": "shout", "text": "ÜNÏCODE TOO", "count": 2, "worker_pid": site.worker.pid,
        }

        # Replies go to the asker's channel only: ann's next message is this one, not bob's shout.
        await bob.send(json.dumps({"command": "say", "text": "done"}))
        assert (await next_json(ann, site))["text"] == "done"
    assert site.worker.poll() is None, site.logs()


@pytest.mark.parametrize(
    "leaver_server, how",
    [("daphne", "closes"), ("uvicorn", "drops")],
)
async def test_client_that_goes_away_leaves_its_room(site, layer, leaver_server, how):
    servers = {server.name: server for server in site.servers}
    async with contextlib.AsyncExitStack() as stack:
        stay_a = await join(servers["daphne"], "exits", site, stack)
        stay_b = await join(servers["uvicorn"], "exits", site, stack)
        leaver = await join(servers[leaver_server], "exits", site, stack)
        # Each consumer joins its group before accepting, so the welcome proves membership.
        assert memberships(layer) == 3

        if how == "closes":
            await leaver.close()
        else:
            # No closing handshake, as when a browser tab is killed or the network goes.
            leaver.transport.abort()

        # The server notices the departure on its own time: poll rather than guess a delay.
        deadline = time.monotonic() + REPLY_TIMEOUT
        while memberships(layer) != 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        report = layer.engine().inspect()
        assert report["memberships"] == 2, site.logs()
        assert report["largest"] == [(2, "room-exits")]

        # A message from outside both servers reaches the two who stayed...
        await layer.group_send(
            "room-exits",
            {"type": "chat.message", "text": "who is left?", "author": "ops", "server_pid": 0},
        )
        for ws in (stay_a, stay_b):
            got = await next_json(ws, site)
            assert (got["type"], got["text"], got["author"]) == ("message", "who is left?", "ops")
        # ...and nothing was queued for the channel of the one who left, where it would sit
        # unread until it expired.
        report = layer.engine().inspect()
        assert report["messages"] == 0
        assert report["problems"] == []
