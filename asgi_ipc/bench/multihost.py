"""The multi-host section of ``asgi-ipc bench`` (``--multihost``): MultiHostChannelLayer against
channels_redis's RedisChannelLayer, in the same run, on the same redis-server.

Hosts are stores: each simulated host is a prefix of its own, its processes spawned here, all of
one ``site`` in Redis (on one machine a mount namespace per host changes nothing measured: each
store has its own host id and relay). Measured, with the Redis commands each operation costs
(``INFO commandstats``, every command the server ran, those inside scripts included, relays'
reads and beats included):

  same-host ping-pong     two processes of one host (both layers, and IPCChannelLayer, whose
                          figure the multi-host layer's is to stay within 1.1 times of)
  cross-host ping-pong    processes of two hosts (both layers)
  cross-host one-way      1->1: a producer on one host, a consumer on another; 4->4: four
                          producers on one host, each to a consumer of its own on another.
                          Messages a second, from the first send to the last receive, every
                          message counted
  group_send              to 1000 members over 4 hosts (250 each, the sender on the first):
                          time per group_send, deliveries a second (from the first group_send
                          to the last delivery, every delivery counted), commands per
                          group_send, and the round trips the sender made (counted in the
                          sender); RedisPubSubChannelLayer too, which keeps no queue, so its
                          members are subscribed before the timed part

Every store made here is unlinked, and every Redis key of the run deleted, when it ends.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import time
from typing import Any

from .. import unlink
from .layers import guarded

MULTIHOST = "multihost"
REDIS = "redis"
PUBSUB = "redis pubsub"
IPC = "ipc"  # the single-host layer, on same-host ping-pong only
SPAWN = multiprocessing.get_context("spawn")
MiB = 1024 * 1024
# A receiving side that gets nothing for this long gives up (a message lost): the run then
# counts what it got. Watched over the whole run, not per receive: an ``asyncio.wait_for``
# around each receive cost a task and a timer apiece, more than a receive of the two fast layers
# (it took the multi-host fan-out from 540 000 deliveries a second to 170 000).
STALL_SECONDS = 60


def _layer(kind: str, prefix: str, site: str, url: str) -> Any:
    if kind == IPC:
        from .. import IPCChannelLayer

        return IPCChannelLayer(prefix=prefix, capacity=100_000, expiry=600,
                               channel_memory=64 * MiB, group_memory=8 * MiB)
    if kind == MULTIHOST:
        from ..multihost import MultiHostChannelLayer

        return MultiHostChannelLayer(prefix=prefix, site=site, hosts=[url], capacity=100_000,
                                     expiry=600, channel_memory=64 * MiB, group_memory=8 * MiB)
    if kind == PUBSUB:
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(hosts=[url], prefix=site + ":")
    from channels_redis.core import RedisChannelLayer

    return RedisChannelLayer(hosts=[url], prefix=site + ":", capacity=100_000, expiry=600)


async def _close(kind: str, layer: Any) -> None:
    if kind == REDIS:
        await layer.close_pools()
    elif kind == PUBSUB:
        await layer.flush()  # its only close: it ends the reader and the connections
    else:
        await layer.close()


def _commands(url: str) -> int:
    import redis

    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(figures["calls"] for name, figures in stats.items()
               if name not in ("cmdstat_info", "cmdstat_hello", "cmdstat_client|setinfo"))


# --- the processes -------------------------------------------------------------------------


def _echo(kind: str, prefix: str, site: str, url: str, out: Any) -> None:
    async def run() -> None:
        layer = _layer(kind, prefix, site, url)
        channel = await layer.new_channel()
        out.put(channel)
        while "end" not in (message := await layer.receive(channel)):
            await layer.send(message["to"], message)
        await _close(kind, layer)

    asyncio.run(run())


def _pinger(kind: str, prefix: str, site: str, url: str, echo: str, rounds: int,
            out: Any) -> None:
    async def run() -> None:
        layer = _layer(kind, prefix, site, url)
        channel = await layer.new_channel()
        for n in range(20):  # warm-up
            await layer.send(echo, {"to": channel, "n": n})
            await layer.receive(channel)
        await asyncio.sleep(0.2)
        before = _commands(url)
        times = []
        for n in range(rounds):
            start = time.perf_counter()
            await layer.send(echo, {"to": channel, "n": n})
            got = await layer.receive(channel)
            times.append(time.perf_counter() - start)
            assert got["n"] == n
        commands = _commands(url) - before
        await layer.send(echo, {"end": True})
        await _close(kind, layer)
        out.put((times, commands))

    asyncio.run(run())


def _consumer(kind: str, prefix: str, site: str, url: str, count: int, out: Any) -> None:
    async def run() -> None:
        layer = _layer(kind, prefix, site, url)
        channel = await layer.new_channel()
        if kind == MULTIHOST:
            layer.receiver()  # its relay stands
        out.put(channel)
        got = received = 0

        async def consume() -> None:
            nonlocal got, received
            await layer.receive(channel)  # the producer's warm-up
            for n in range(count):
                message = await layer.receive(channel)
                got += message["n"] == n
                received += 1

        await guarded(consume(), lambda: received, STALL_SECONDS)
        end = time.monotonic()
        await _close(kind, layer)
        out.put((got, end))

    asyncio.run(run())


def _producer(kind: str, prefix: str, site: str, url: str, channel: str, count: int,
              out: Any) -> None:
    async def run() -> None:
        layer = _layer(kind, prefix, site, url)
        await layer.send(channel, {"n": -1})  # warm: the connection made, the script loaded
        start = time.monotonic()
        for n in range(count):
            await layer.send(channel, {"n": n})
        await _close(kind, layer)
        out.put(start)

    asyncio.run(run())


def _members(kind: str, prefix: str, site: str, url: str, group: str, count: int,
             sends: int, out: Any) -> None:
    async def run() -> None:
        layer = _layer(kind, prefix, site, url)
        channels = [await layer.new_channel() for _ in range(count)]
        for channel in channels:
            await layer.group_add(group, channel)
        if kind == MULTIHOST:
            layer.receiver()  # its relay stands
        if kind == PUBSUB:
            # Subscribed for sure: a probe sent to each channel comes back.
            for channel in channels:
                await layer.send(channel, {"n": -1})
                await layer.receive(channel)
        out.put("ready")

        counts = [0] * len(channels)

        async def drain(k: int, channel: str) -> None:
            for _ in range(sends):
                await layer.receive(channel)
                counts[k] += 1

        work = asyncio.gather(*(drain(k, channel) for k, channel in enumerate(channels)))
        await guarded(work, lambda: sum(counts), STALL_SECONDS)
        counted = sum(counts)
        end = time.monotonic()
        await _close(kind, layer)
        out.put((counted, end))

    asyncio.run(run())


def _group_sender(kind: str, prefix: str, site: str, url: str, group: str, sends: int,
                  out: Any) -> None:
    async def run() -> None:
        layer = _layer(kind, prefix, site, url)
        calls = 0
        if kind == MULTIHOST:
            layer.receiver()
            connections = layer.redis_side().connections
            plain = connections.call

            async def counted(packed: bytes) -> Any:
                nonlocal calls
                calls += 1
                return await plain(packed)

            connections.call = counted
        # Warm: the script loaded, the connection made (a group with no member elsewhere).
        await layer.group_send(group + "-warm", {"n": -1})
        await asyncio.sleep(0.3)
        calls = 0
        before = _commands(url)
        start = time.monotonic()
        for n in range(sends):
            await layer.group_send(group, {"n": n})
        elapsed = time.monotonic() - start
        commands = _commands(url) - before
        await _close(kind, layer)
        out.put((start, elapsed, commands, calls if kind == MULTIHOST else None))

    asyncio.run(run())


# --- the section ---------------------------------------------------------------------------


def _start(target: Any, *args: Any) -> Any:
    process = SPAWN.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _pingpong(kind: str, url: str, rounds: int, same_host: bool) -> dict:
    site = "mhb" + secrets.token_hex(4)
    a, b = site + "a", (site + "a" if same_host else site + "b")
    out = SPAWN.Queue()
    try:
        echo = _start(_echo, kind, b, site, url, out)
        channel = out.get(timeout=60)
        pinger = _start(_pinger, kind, a, site, url, channel, rounds, out)
        times, commands = out.get(timeout=300)
        for process in (pinger, echo):
            process.join(30)
    finally:
        _tidy(url, site, [a, b])
    times.sort()
    return {
        "p50_ms": round(times[len(times) // 2] * 1e3, 3),
        "p90_ms": round(times[len(times) * 9 // 10] * 1e3, 3),
        "rounds": rounds,
        "commands_per_round_trip": round(commands / rounds, 2),
    }


def _fanout(kind: str, url: str, members: int, hosts: int, sends: int) -> dict:
    site = "mhb" + secrets.token_hex(4)
    prefixes = [f"{site}{n}" for n in range(hosts)]
    group = "bench"
    out = SPAWN.Queue()
    # The sender's figures come on a queue of their own: messages that two processes put on
    # one queue may arrive in either order.
    sent = SPAWN.Queue()
    try:
        holders = [_start(_members, kind, p, site, url, group, members // hosts, sends, out)
                   for p in prefixes]
        for _ in holders:
            assert out.get(timeout=120) == "ready"
        sender = _start(_group_sender, kind, prefixes[0], site, url, group, sends, sent)
        start, elapsed, commands, calls = sent.get(timeout=300)
        ends = [out.get(timeout=300) for _ in holders]
        counted = sum(got for got, _end in ends)
        for process in (sender, *holders):
            process.join(30)
    finally:
        _tidy(url, site, prefixes)
    last = max(end for _got, end in ends)
    return {
        "members": members,
        "hosts": hosts,
        "group_sends": sends,
        "ms_per_group_send": round(elapsed / sends * 1e3, 3),
        "deliveries_per_s": round(counted / max(last - start, 1e-9)),
        "commands_per_group_send": round(commands / sends, 1),
        "sender_round_trips_per_group_send": None if calls is None else calls / sends,
        "counted": counted,
        "expected": members * sends,
    }


def _oneway(kind: str, url: str, count: int, pairs: int) -> dict:
    """``pairs`` producers on one host, each sending ``count`` messages to a consumer of its
    own on another."""
    site = "mhb" + secrets.token_hex(4)
    a, b = site + "a", site + "b"
    out = SPAWN.Queue()
    sent = SPAWN.Queue()  # the producers' starts, apart from the consumers' ends (see _fanout)
    try:
        consumers = [_start(_consumer, kind, b, site, url, count, out) for _ in range(pairs)]
        channels = [out.get(timeout=60) for _ in consumers]
        producers = [_start(_producer, kind, a, site, url, channel, count, sent)
                     for channel in channels]
        start = min(sent.get(timeout=300) for _ in producers)
        ends = [out.get(timeout=300) for _ in consumers]
        for process in (*producers, *consumers):
            process.join(30)
    finally:
        _tidy(url, site, [a, b])
    got = sum(got for got, _end in ends)
    return {
        "messages_per_s": round(got / max(max(end for _got, end in ends) - start, 1e-9)),
        "counted": got,
        "expected": count * pairs,
    }


def _tidy(url: str, site: str, prefixes: list[str]) -> None:
    import redis

    for prefix in set(prefixes):
        unlink(prefix)
    with redis.Redis.from_url(url) as client:
        for pattern in (f"{{{site}}}:*", f"{site}:*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)


def run(url: str, quick: bool) -> dict:
    """The section's results, by measurement and layer."""
    rounds = 200 if quick else 2000
    sends = 5 if quick else 40
    messages = 500 if quick else 5000
    results: dict[str, dict[str, dict]] = {}
    for kind in (MULTIHOST, IPC, REDIS):
        results.setdefault("same-host ping-pong", {})[kind] = _pingpong(kind, url, rounds, True)
    for kind in (MULTIHOST, REDIS):
        results.setdefault("cross-host ping-pong", {})[kind] = _pingpong(kind, url, rounds,
                                                                         False)
        # Each run a few seconds long: RedisChannelLayer's 1 500 a second take that with
        # fewer messages, and shorter runs of the faster layer swung by a third.
        count = messages * 4 if kind == MULTIHOST else messages
        results.setdefault("cross-host one-way 1->1", {})[kind] = _oneway(kind, url, count, 1)
        results.setdefault("cross-host one-way 4->4", {})[kind] = _oneway(kind, url,
                                                                          count // 4, 4)
    for kind in (MULTIHOST, REDIS, PUBSUB):
        # A second or more each, as one-way: the 40 group_sends RedisChannelLayer takes about
        # a second with lasted a quarter of that on the other two, too short to leave the
        # first message's hop behind.
        results.setdefault("group_send 1000 members / 4 hosts", {})[kind] = _fanout(
            kind, url, 1000, 4, sends if kind == REDIS else sends * 10)
    return results


def render(results: dict) -> str:
    lines = ["multi-host: MultiHostChannelLayer (multihost) and RedisChannelLayer (redis), "
             "same redis-server; IPCChannelLayer (ipc) beside them on one host"]
    for name, by_layer in results.items():
        for kind, figures in by_layer.items():
            shown = ", ".join(f"{key} {value}" for key, value in figures.items())
            lines.append(f"  {name:36} {kind:12} {shown}")
    for name, other in (("same-host ping-pong", IPC), ("cross-host ping-pong", REDIS)):
        by_layer = results.get(name, {})
        if MULTIHOST in by_layer and other in by_layer and by_layer[other]["p50_ms"]:
            lines.append(f"  {name} p50, multihost / {other}: "
                         f"{by_layer[MULTIHOST]['p50_ms'] / by_layer[other]['p50_ms']:.2f}")
    for name, key in (("cross-host one-way 1->1", "messages_per_s"),
                      ("cross-host one-way 4->4", "messages_per_s"),
                      ("group_send 1000 members / 4 hosts", "deliveries_per_s")):
        by_layer = results.get(name, {})
        for other in (REDIS, PUBSUB):
            if MULTIHOST in by_layer and other in by_layer and by_layer[other][key]:
                lines.append(f"  {name}, multihost / {other}: "
                             f"{by_layer[MULTIHOST][key] / by_layer[other][key]:.2f}")
    return "\n".join(lines)

