"""Several real processes (spawn start method) sharing one prefix."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import defaultdict

import pytest

from asgi_ipc import IPCChannelLayer

from . import workers
from .helpers import MiB, start

spawn = multiprocessing.get_context("spawn")


def test_three_producers_three_consumers_exactly_once_and_fifo_per_sender(prefix, children):
    producers, consumers, count = 3, 3, 400
    results = spawn.Queue()
    for _ in range(consumers):
        start(children, workers.consume, prefix, "work", results)
    senders = [start(children, workers.produce, prefix, "work", p, count) for p in range(producers)]
    for sender in senders:
        sender.join(60)
        assert sender.exitcode == 0

    async def stop_consumers():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB)
        for _ in range(consumers):
            await layer.send("work", {"stop": True})
        await layer.close()

    asyncio.run(stop_consumers())
    reports = [results.get(timeout=60) for _ in range(consumers)]
    everything = [pair for _pid, got in reports for pair in got]
    assert len(everything) == producers * count
    assert set(everything) == {(p, s) for p in range(producers) for s in range(count)}
    for _pid, got in reports:
        last = defaultdict(lambda: -1)
        for producer, seq in got:
            assert seq > last[producer], "a consumer saw one sender's messages out of order"
            last[producer] = seq
    verify(prefix)


def test_group_send_reaches_members_in_other_processes(prefix, children):
    ready, results = spawn.Queue(), spawn.Queue()
    members = [start(children, workers.group_member, prefix, "room", ready, results)
               for _ in range(4)]
    channels = {ready.get(timeout=60) for _ in members}

    async def send():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB)
        await layer.group_send("room", {"type": "hello", "from": os.getpid()})
        await layer.close()

    asyncio.run(send())
    reports = [results.get(timeout=30) for _ in members]
    assert len(channels) == 4
    assert {pid for pid, _ in reports} == {m.pid for m in members}
    assert all(message == {"type": "hello", "from": os.getpid()} for _pid, message in reports)
    verify(prefix)


def test_flush_in_one_process_is_seen_by_the_others(prefix, children):
    async def fill():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB)
        await layer.send("queued", {"a": 1})
        await layer.group_add("g", "member")
        return layer

    async def after(layer):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive("queued"), 0.3)
        await layer.group_send("g", {"b": 2})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive("member"), 0.3)
        report = layer.engine().inspect()
        assert (report["messages"], report["groups"], report["problems"]) == (0, 0, [])
        await layer.close()

    loop = asyncio.new_event_loop()
    layer = loop.run_until_complete(fill())
    results = spawn.Queue()
    start(children, workers.flush_then_report, prefix, results)
    assert results.get(timeout=60) == "flushed"
    loop.run_until_complete(after(layer))
    loop.close()


def test_a_forked_child_gets_its_own_lock(prefix):
    """A layer opened before fork() keeps excluding the parent in the child."""
    fork = multiprocessing.get_context("fork")

    async def hammer(layer, tag, count):
        for i in range(count):
            await layer.send("shared", {"tag": tag, "i": i})
            await layer.receive("shared")

    layer = IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB)
    asyncio.run(layer.send("warm", {}))  # attach before forking
    child = fork.Process(target=lambda: asyncio.run(hammer(layer, "child", 3000)))
    child.start()
    asyncio.run(hammer(layer, "parent", 3000))
    child.join(60)
    assert child.exitcode == 0
    verify(prefix)
    asyncio.run(layer.close())


def verify(prefix):
    async def run():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB)
        problems = layer.engine().verify()
        await layer.close()
        return problems

    assert asyncio.run(run()) == []
