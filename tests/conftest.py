"""Fixtures shared by the suite: a unique prefix per test whose shared memory is removed after
it, layers of both backends built from one config, and a redis-server when one can be run."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

import asgi_ipc
from asgi_ipc import IPCChannelLayer
from asgi_ipc.engine.layout import store_path, wake_dir

MiB = 1024 * 1024
_made_prefixes: set[str] = set()


def shm_path(prefix: str) -> str:
    return store_path(prefix)


def left_behind(prefix: str) -> bool:
    """Whether anything of ``prefix`` (its store, its wake-up directory) is in /dev/shm."""
    return any(os.path.lexists(path) for path in (store_path(prefix), wake_dir(prefix)))


def new_prefix() -> str:
    prefix = "t" + secrets.token_hex(6)
    _made_prefixes.add(prefix)
    return prefix


@pytest.fixture
def prefix():
    """A prefix no other test uses; its store and wake-up directory must be gone when the test
    ends."""
    name = new_prefix()
    yield name
    asgi_ipc.unlink(name)
    assert not left_behind(name)


@pytest.fixture
def children():
    """Processes a test starts; whatever is still alive at its end is killed."""
    started: list = []
    yield started
    for child in started:
        if child.is_alive():
            child.kill()
        child.join(10)


def pytest_sessionfinish(session, exitstatus):
    left = [p for p in _made_prefixes if left_behind(p)]
    for p in left:
        asgi_ipc.unlink(p)
    if left:
        print(f"\nERROR: tests left shared memory behind for prefixes {left}")
        session.exitstatus = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    """A redis-server of our own on a free loopback port (or $ASGI_IPC_TEST_REDIS), else None."""
    if os.environ.get("ASGI_IPC_TEST_REDIS"):
        yield os.environ["ASGI_IPC_TEST_REDIS"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="asgi_ipc_redis_")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


BACKENDS = ["ipc", "redis"]


@pytest.fixture(params=BACKENDS)
def make_layer(request, prefix, redis_url):
    """Build layers of the parametrised backend from the same config keys.

    Every layer made shares the test's prefix, as processes of one site would."""
    made = []
    backend = request.param
    if backend == "redis" and redis_url is None:
        pytest.skip("redis-server is not installed: the channels_redis half is skipped")

    def make(**config):
        config.setdefault("prefix", prefix)
        if backend == "ipc":
            config.setdefault("channel_memory", 4 * MiB)
            config.setdefault("group_memory", 1 * MiB)
            layer = IPCChannelLayer(**config)
        else:
            from channels_redis.core import RedisChannelLayer

            config.pop("channel_memory", None)
            config.pop("group_memory", None)
            layer = RedisChannelLayer(hosts=[redis_url], **config)
        made.append(layer)
        return layer

    make.backend = backend
    yield make
    import asyncio

    async def tidy():
        for layer in made:
            await layer.flush()
            if backend == "ipc":
                await layer.close()
            else:
                await layer.close_pools()

    asyncio.run(tidy())


def verify_clean(layer: IPCChannelLayer) -> None:
    """Assert the store walks clean (no-op for other backends)."""
    if isinstance(layer, IPCChannelLayer):
        problems = layer.engine().verify()
        assert problems == [], problems
