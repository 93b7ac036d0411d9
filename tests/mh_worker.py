"""A process of a simulated host of the multi-host tests (test_multihost.py), run as a script
inside the host's mount namespace (its own tmpfs at /dev/shm) with the tree under test on
PYTHONPATH:

    python mh_worker.py ROLE PREFIX REDIS_URL [ARG...]

Each role prints one line per step it reaches and flushes it, so the test can follow along.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from channels.exceptions import ChannelFull

from asgi_ipc import MultiHostChannelLayer
from asgi_ipc.multihost import relay as relay_module
from asgi_ipc.multihost.redis_side import RedisUnavailable

MiB = 1024 * 1024
PATIENCE = 60.0


def say(*words: object) -> None:
    print(*words, flush=True)


def compact(value: object) -> str:
    """JSON with no spaces: one word of a line."""
    return json.dumps(value, separators=(",", ":"))


def make(prefix: str, url: str, relay: bool = True) -> MultiHostChannelLayer:
    return MultiHostChannelLayer(
        prefix=prefix, hosts=[url], channel_memory=16 * MiB, group_memory=4 * MiB,
        capacity=100_000, expiry=600, relay=relay,
    )


async def receiver(layer: MultiHostChannelLayer) -> None:
    """Receive on a channel of its own until {"end": True}; then report every ``i`` got."""
    channel = await layer.new_channel()
    say("channel", channel)
    got, times = [], []
    while "end" not in (message := await layer.receive(channel)):
        got.append(message["i"])
        times.append(round(time.time(), 4))
    say("got", compact(got), compact(times))


async def sender(layer: MultiHostChannelLayer, channel: str, count: str, pause: str) -> None:
    """Send {"i": i} for i up to ``count`` to ``channel``, ``pause`` seconds apart, retrying one
    refused (never one that may have been sent); then {"end": True}. Reports what was
    acknowledged (the sends that returned)."""
    acked, unsure = [], []
    for i in range(int(count)):
        while True:
            try:
                await layer.send(channel, {"i": i})
                acked.append(i)
                break
            except ChannelFull:
                await asyncio.sleep(0.01)
            except RedisUnavailable:
                unsure.append(i)
                await asyncio.sleep(0.05)
                break
        if float(pause):
            await asyncio.sleep(float(pause))
    while True:
        try:
            await layer.send(channel, {"end": True})
            break
        except (RedisUnavailable, ChannelFull):
            await asyncio.sleep(0.05)
    say("acked", compact(acked), compact(unsure))


async def candidate(layer: MultiHostChannelLayer) -> None:
    """Stand for the relay of the host; say when leading (with the time), until killed."""
    layer.receiver()  # opens the store, which starts the relay candidacy
    say("candidate", os.getpid())
    relay = layer.relay()
    assert relay is not None
    while not relay.leading:
        await asyncio.sleep(0.0005)
    say("leading", os.getpid(), repr(time.time()))
    await asyncio.Event().wait()


async def racer(layer: MultiHostChannelLayer) -> None:
    """A relay that ignores the election, to race another such one."""
    real = relay_module.byte_lock

    def no_election(fd: int, cmd: int, kind: int, offset: int) -> int:
        if offset == relay_module.RELAY_BYTE and cmd != relay_module.fcntl.F_OFD_GETLK:
            return kind
        return real(fd, cmd, kind, offset)

    relay_module.byte_lock = no_election  # type: ignore[assignment]
    await candidate(layer)


async def members(layer: MultiHostChannelLayer, group: str, count: str, expect: str) -> None:
    """Make ``count`` channels, add them to ``group``, then receive ``expect`` messages on
    each and look for any more; report the copies got and the duplicates."""
    channels = [await layer.new_channel() for _ in range(int(count))]
    for channel in channels:
        await layer.group_add(group, channel)
    say("ready", len(channels))

    async def drain(channel: str) -> list[int]:
        got = []
        for _ in range(int(expect)):
            got.append((await asyncio.wait_for(layer.receive(channel), PATIENCE))["n"])
        try:
            while True:
                got.append((await asyncio.wait_for(layer.receive(channel), 1.0))["n"])
        except asyncio.TimeoutError:
            pass
        return got

    results = await asyncio.gather(*map(drain, channels))
    copies = sum(len(r) for r in results)
    wrong = sum(sorted(r) != list(range(int(expect))) for r in results)
    say("members", copies, wrong)


async def group_sender(layer: MultiHostChannelLayer, group: str, count: str) -> None:
    for n in range(int(count)):
        await layer.group_send(group, {"n": n})
    say("sent")


async def echo(layer: MultiHostChannelLayer) -> None:
    """Answer each message {"to": channel, ...} by sending it back there."""
    channel = await layer.new_channel()
    say("channel", channel)
    while "end" not in (message := await layer.receive(channel)):
        await layer.send(message["to"], message)


async def pinger(layer: MultiHostChannelLayer, echo_channel: str, rounds: str) -> None:
    channel = await layer.new_channel()
    times = []
    for n in range(int(rounds)):
        start = time.perf_counter()
        await layer.send(echo_channel, {"to": channel, "n": n})
        assert (await asyncio.wait_for(layer.receive(channel), PATIENCE))["n"] == n
        times.append(time.perf_counter() - start)
    times.sort()
    await layer.send(echo_channel, {"end": True})
    say("p50", repr(times[len(times) // 2]), repr(times[len(times) * 9 // 10]))


async def local(layer: MultiHostChannelLayer, seconds: str) -> None:
    """Same-host traffic only, for ``seconds``: sends and receives of this host's channels."""
    a, b = await layer.new_channel(), await layer.new_channel()
    say("local-ready")
    rounds, deadline = 0, time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        await layer.send(a, {"n": rounds})
        await layer.send(b, await layer.receive(a))
        assert (await layer.receive(b))["n"] == rounds
        rounds += 1
    say("local", rounds)


async def stats(layer: MultiHostChannelLayer) -> None:
    """The store's counters, as JSON."""
    say("counters", compact(layer.engine().inspect(check=False)["counters"]))


ROLES = {
    "receiver": receiver, "sender": sender, "candidate": candidate, "racer": racer,
    "members": members, "group-sender": group_sender, "echo": echo, "pinger": pinger,
    "local": local, "stats": stats,
}
NO_RELAY = {"receiver", "local", "stats"}


async def main() -> None:
    role, prefix, url, *args = sys.argv[1:]
    layer = make(prefix, url, relay=role not in NO_RELAY)
    try:
        await ROLES[role](layer, *args)
    finally:
        await layer.close()
    say("exit")


if __name__ == "__main__":
    asyncio.run(main())
