"""Functions that run in spawned child processes for tests/test_processes.py."""

from __future__ import annotations

import asyncio
import os

from channels.exceptions import ChannelFull

from asgi_ipc import IPCChannelLayer

MiB = 1024 * 1024


def _layer(prefix: str) -> IPCChannelLayer:
    return IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB,
                           capacity=10_000)


def produce(prefix: str, channel: str, producer: int, count: int) -> None:
    async def run():
        layer = _layer(prefix)
        for seq in range(count):
            while True:
                try:
                    await layer.send(channel, {"producer": producer, "seq": seq})
                    break
                except ChannelFull:
                    await asyncio.sleep(0.001)
        await layer.close()

    asyncio.run(run())


def consume(prefix: str, channel: str, results) -> None:
    """Receive until a stop message; report (producer, seq) pairs in the order received."""
    async def run():
        layer = _layer(prefix)
        got = []
        while True:
            message = await layer.receive(channel)
            if message.get("stop"):
                break
            got.append((message["producer"], message["seq"]))
        await layer.close()
        results.put((os.getpid(), got))

    asyncio.run(run())


def group_member(prefix: str, group: str, ready, results) -> None:
    async def run():
        layer = _layer(prefix)
        me = await layer.new_channel()
        await layer.group_add(group, me)
        ready.put(me)
        message = await layer.receive(me)
        await layer.close()
        results.put((os.getpid(), message))

    asyncio.run(run())


def flush_then_report(prefix: str, results) -> None:
    async def run():
        layer = _layer(prefix)
        await layer.flush()
        await layer.close()
        results.put("flushed")

    asyncio.run(run())
