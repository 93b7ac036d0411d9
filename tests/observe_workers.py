"""Functions that run in spawned child processes for tests/test_observe.py."""

from __future__ import annotations

import asyncio
import os
import signal

from channels.exceptions import ChannelFull

from asgi_ipc import IPCChannelLayer
from asgi_ipc.observe import figures

MiB = 1024 * 1024
BULK = 200


def layer(prefix: str, **config) -> IPCChannelLayer:
    config.setdefault("channel_memory", 2 * MiB)
    config.setdefault("group_memory", MiB)
    return IPCChannelLayer(prefix=prefix, **config)


def work(prefix: str, tag: str, done) -> None:
    """A known amount of every kind of work (see ``expected_counters``); reports ChannelFull
    raised so the parent can tell the counters from what the layer really did."""

    async def run() -> int:
        small = layer(prefix, capacity=3)
        short = layer(prefix, expiry=0.001)
        bulk = layer(prefix, capacity=10 * BULK)
        full = 0
        for i in range(5):  # 3 queued, 2 refused
            try:
                await small.send(f"full.{tag}", {"i": i})
            except ChannelFull:
                full += 1
        for i in range(2):  # both expire unread
            await short.send(f"exp.{tag}", {"i": i})
        await asyncio.sleep(0.05)
        await small.send(f"exp.{tag}", {"i": "kept"})  # drops the two expired ones
        assert (await small.receive(f"exp.{tag}"))["i"] == "kept"
        await small.group_add(f"g.{tag}", f"full.{tag}")  # at capacity: skipped
        await small.group_add(f"g.{tag}", f"ok.{tag}")
        await small.group_send(f"g.{tag}", {"hello": tag})
        assert (await small.receive(f"ok.{tag}")) == {"hello": tag}
        for i in range(BULK):
            await bulk.send("bulk", {"i": i})
        for _ in range(BULK // 2):
            await bulk.receive("bulk")
        for each in (small, short, bulk):
            await each.close()
        return full

    done.put(asyncio.run(run()))


def expected_counters(processes: int) -> dict[str, int]:
    return {
        "sent": processes * (3 + 2 + 1 + BULK),
        "received": processes * (1 + 1 + BULK // 2),
        "returned": 0,
        "group_sends": processes,
        "delivered": processes,
        "expired": processes * 2,
        "channel_full": processes * 2,
        "group_full": processes,
        "no_memory": 0,
    }


class _KillAt:
    """A channel_capacity pattern that kills its own process when asked about ``name``: the
    layer asks inside the lock hold of a group_send, with its work so far uncommitted."""

    def __init__(self, name: str) -> None:
        self.name = name

    def match(self, channel: str):
        if channel == self.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return None


def killed_in_group_send(prefix: str, members: int) -> None:
    """Queue copies for ``members`` - 1 channels of a group, then die before the group_send
    commits (the last member added is asked about last)."""

    async def run() -> None:
        victim = layer(prefix, channel_capacity={_KillAt("zz.last"): 5})
        for n in range(members - 1):
            await victim.group_add("everyone", f"m.{n:05}")
        await victim.group_add("everyone", "zz.last")
        await victim.group_send("everyone", {"never": "counted"})

    asyncio.run(run())


def wait_for(prefix: str, channel: str, ready) -> None:
    async def run() -> None:
        waiting = layer(prefix)
        task = asyncio.ensure_future(waiting.receive(channel))
        while figures(prefix).waiting_processes != [os.getpid()]:
            await asyncio.sleep(0.01)
        ready.put(os.getpid())
        await task

    asyncio.run(run())
