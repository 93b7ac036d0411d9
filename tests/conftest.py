"""Fixtures shared by the suite: a unique prefix per test whose shared memory is removed after
it, child processes killed when their test ends, layers of the three backends
(IPCChannelLayer, channels_redis, MultiHostChannelLayer) built from one config, and a
redis-server when one can be run. Plain helpers are in helpers.py."""

from __future__ import annotations

import os
import shutil

import pytest

import asgi_ipc
from asgi_ipc import IPCChannelLayer
from asgi_ipc.bench.redis_server import RedisServer

from .helpers import MiB, Worker, left_behind, made_prefixes, new_prefix


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


@pytest.fixture
def workers():
    """ns_worker.py roles a test starts (see helpers.Worker); killed at its end if still running."""
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait(10)


def pytest_sessionfinish(session, exitstatus):
    left = [p for p in made_prefixes if left_behind(p)]
    for p in left:
        asgi_ipc.unlink(p)
    if left:
        print(f"\nERROR: tests left shared memory behind for prefixes {left}")
        session.exitstatus = 1


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
    with RedisServer(binary) as server:
        yield server.url


BACKENDS = ["ipc", "redis", "multihost"]


@pytest.fixture(params=BACKENDS)
def make_layer(request, prefix, redis_url):
    """Build layers of the parametrised backend from the same config keys.

    Every layer made shares the test's prefix, as processes of one site would."""
    made = []
    backend = request.param
    if backend in ("redis", "multihost") and redis_url is None:
        pytest.skip(f"redis-server is not installed: the {backend} backend is skipped")

    def make(**config):
        config.setdefault("prefix", prefix)
        if backend == "ipc":
            config.setdefault("channel_memory", 4 * MiB)
            config.setdefault("group_memory", 1 * MiB)
            layer = IPCChannelLayer(**config)
        elif backend == "multihost":
            config.setdefault("channel_memory", 4 * MiB)
            config.setdefault("group_memory", 1 * MiB)
            layer = asgi_ipc.MultiHostChannelLayer(hosts=[redis_url], **config)
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
            if backend != "redis":
                await layer.close()
            else:
                await layer.close_pools()

    asyncio.run(tidy())

