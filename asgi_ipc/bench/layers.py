"""The layers under test and the messages they carry: what every workload, in the main process
or in a worker, builds its layer and its messages with.

A backend is named by a ``spec``, a picklable dict that each process turns into a layer of its
own (``opened``): asgi_ipc (through its public ``IPCChannelLayer`` only), the peers users would
pick instead (channels_redis's ``RedisChannelLayer`` and ``RedisPubSubChannelLayer``, and
channels-nats's ``NatsChannelLayer``, each against the server the run started), or Channels'
``InMemoryChannelLayer``. ``FLOOR`` is no layer: it names the bare asyncio ping-pong over Unix
datagram sockets that bounds what any layer's cross-process round trip can reach.

Each layer is built with its own defaults but for ``capacity`` and ``expiry``, which every
workload sets the same for all that have them (above anything it queues, so that a figure is the
transport's and not its back-pressure's). The pub/sub layers keep no queue in their server:
``RedisPubSubChannelLayer`` accepts both and ignores them, and channels-nats applies them to each
channel's mailbox in the receiving process, where what finds it full is dropped (no
``ChannelFull``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
from channels.exceptions import ChannelFull

MiB = 1024 * 1024
KiB = 1024

IPC = "asgi_ipc"
REDIS = "channels_redis"
REDIS_PUBSUB = "channels_redis_pubsub"
NATS = "channels_nats"
MEMORY = "in_memory"
FLOOR = "floor"
BACKENDS = (IPC, REDIS, REDIS_PUBSUB, NATS, MEMORY, FLOOR)
# What a user would run instead of asgi_ipc between the processes of one machine: the backends
# asgi_ipc's figures are held against ("the fastest peer"). InMemoryChannelLayer never crosses a
# process, and the floor is no layer.
PEERS = (REDIS, REDIS_PUBSUB, NATS)

DATA = "bench.data"
STOP = "bench.stop"
PROBE = "bench.probe"
# Sequence numbers are offset so msgpack always encodes them in 9 bytes: every message of a run
# then packs to exactly the size asked for, however far the count goes.
SEQ_BASE = 1 << 40

# The clock every process stamps with. On Linux it is CLOCK_MONOTONIC, which is one clock for
# the whole machine, so a producer's start and a consumer's end can be subtracted.
clock = time.monotonic


# --- messages --------------------------------------------------------------------------------


def padded_body(size: int, **fields: Any) -> bytes:
    """A ``body`` that makes ``{"type", "seq", **fields, "body"}`` pack to ``size`` bytes (or
    the nearest size below that msgpack can reach)."""
    template = {"type": DATA, "seq": SEQ_BASE, **fields, "body": b""}
    base = len(msgpack.packb(template, use_bin_type=True))
    guess = max(size - base, 0)
    # A longer bin needs a longer length prefix; step down until the total fits.
    for length in range(guess, max(guess - 8, -1), -1):
        template["body"] = b"x" * length
        if len(msgpack.packb(template, use_bin_type=True)) <= size:
            return template["body"]
    return b""


def packed_size(message: dict) -> int:
    return len(msgpack.packb(message, use_bin_type=True))


# --- layers ----------------------------------------------------------------------------------


def layer_spec(kind: str, run_id: str, url: str | None, **options: Any) -> dict:
    """What a process needs to build its own layer of the backend under test (picklable);
    ``url`` is the server's the backend runs against, if it needs one."""
    return {"kind": kind, "prefix": run_id, "url": url, **options}


def make_layer(spec: dict) -> Any:
    kind = spec["kind"]
    capacity = spec.get("capacity", 100)
    expiry = spec.get("expiry", 600)
    if kind == IPC:
        from .. import IPCChannelLayer

        return IPCChannelLayer(
            prefix=spec["prefix"],
            channel_memory=spec.get("channel_memory", 100 * MiB),
            group_memory=spec.get("group_memory", 20 * MiB),
            capacity=capacity,
            expiry=expiry,
        )
    if kind == REDIS:
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(
            hosts=[spec["url"]],
            prefix=spec["prefix"] + ":",
            capacity=capacity,
            expiry=expiry,
        )
    if kind == REDIS_PUBSUB:
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(hosts=[spec["url"]], prefix=spec["prefix"] + ":")
    if kind == NATS:
        from channels_nats import NatsChannelLayer

        return NatsChannelLayer(
            servers=[spec["url"]], prefix=spec["prefix"], capacity=capacity, expiry=expiry
        )
    if kind == MEMORY:
        from channels.layers import InMemoryChannelLayer

        return InMemoryChannelLayer(capacity=capacity, expiry=expiry)
    raise ValueError(f"unknown backend {kind!r}")


async def close_layer(kind: str, layer: Any) -> None:
    if kind == REDIS:
        await layer.close_pools()
    elif kind == REDIS_PUBSUB:
        # It has no close: its flush() is one (it cancels the reader task and closes the
        # connections), and there is nothing of it in Redis to remove.
        await layer.flush()
    else:
        await layer.close()


@contextlib.asynccontextmanager
async def opened(spec: dict) -> AsyncIterator[Any]:
    layer = make_layer(spec)
    try:
        yield layer
    finally:
        await close_layer(spec["kind"], layer)


async def subscribed(layer: Any) -> None:
    """Return once every channel and group this process took up is live at the server.

    The pub/sub layers drop what is published before the server has the subscription, by
    design, and ``RedisPubSubChannelLayer`` sends SUBSCRIBE without waiting for Redis to
    answer. A role calls this before it says it is ready: a probe channel, taken up after the
    others on the same connection, is sent to until a probe arrives, which the server can only
    do once it has every subscription sent before. The stray probes left behind are never read.
    """
    probe = await layer.new_channel()
    arrived = asyncio.ensure_future(layer.receive(probe))
    while True:
        await layer.send(probe, {"type": PROBE})
        done, _ = await asyncio.wait([arrived], timeout=0.05)
        if done:
            arrived.result()
            return


async def send_retrying(layer: Any, channel: str, message: dict) -> int:
    """Send, waiting a little whenever the channel is full; returns how often it was."""
    retries = 0
    while True:
        try:
            await layer.send(channel, message)
            return retries
        except ChannelFull:
            retries += 1
            await asyncio.sleep(0.0005)


async def guarded(work: Any, progress: Callable[[], int], stall_seconds: float) -> bool:
    """Run ``work`` until it ends, or until ``progress()`` has not moved for ``stall_seconds``
    (a receiver that will never be woken); False, with ``work`` cancelled, in the second case."""
    task = asyncio.ensure_future(work)
    last, since = progress(), clock()
    while True:
        done, _ = await asyncio.wait([task], timeout=0.1)
        if done:
            task.result()
            return True
        now, seen = clock(), progress()
        if seen != last:
            last, since = seen, now
        elif now - since > stall_seconds:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False



async def flush(spec: dict) -> None:
    async with opened(spec) as layer:
        await layer.flush()
