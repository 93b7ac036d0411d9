"""Messages lent to the process that owns a channel (engine/queues.py, "Lending"): a receive
on a channel made by new_channel() takes the messages queued behind its own in the same lock
hold, and the receives after it return them without one. Lent messages still count against the
channel's capacity until they are handed out, go with a flush, are not a forked child's, and
go with their owner when it dies, leaving a sound store."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from channels.exceptions import ChannelFull

from asgi_ipc import IPCChannelLayer

from . import workers
from .helpers import ENGINES, PATIENCE, MiB, verify_clean, wait_until

CONFIG = {"channel_memory": 4 * MiB, "group_memory": MiB, "capacity": 10}


async def _nothing_arrives(layer: IPCChannelLayer, channel: str) -> bool:
    try:
        await asyncio.wait_for(layer.receive(channel), 0.3)
    except asyncio.TimeoutError:
        return True
    return False


def test_lent_messages_count_against_capacity_until_handed_out(prefix):
    async def run() -> None:
        owner = IPCChannelLayer(prefix=prefix, **CONFIG)
        sender = IPCChannelLayer(prefix=prefix, **CONFIG)
        channel = await owner.new_channel()
        for n in range(10):
            await sender.send(channel, {"n": n})
        with pytest.raises(ChannelFull):
            await sender.send(channel, {"n": "over"})
        # The first receive is lent the other nine: they still fill the channel but for one.
        assert (await owner.receive(channel))["n"] == 0
        await sender.send(channel, {"n": 10})
        with pytest.raises(ChannelFull):
            await sender.send(channel, {"n": "over"})
        assert [(await owner.receive(channel))["n"] for _ in range(10)] == list(range(1, 11))
        # Handed out, and settled by the owner's next lock hold: the room is all back.
        assert await _nothing_arrives(owner, channel)
        for n in range(10):
            await sender.send(channel, {"n": n})
        with pytest.raises(ChannelFull):
            await sender.send(channel, {"n": "over"})
        assert [(await owner.receive(channel))["n"] for _ in range(10)] == list(range(10))
        verify_clean(owner)
        counters = owner.engine().inspect()["counters"]
        assert counters["received"] == 21
        await sender.close()
        await owner.close()

    asyncio.run(run())


def test_a_flush_takes_lent_messages(prefix):
    async def run() -> None:
        owner = IPCChannelLayer(prefix=prefix, **CONFIG)
        sender = IPCChannelLayer(prefix=prefix, **CONFIG)
        channel = await owner.new_channel()
        for n in range(5):
            await sender.send(channel, {"n": n})
        assert (await owner.receive(channel))["n"] == 0
        await sender.flush()
        assert await _nothing_arrives(owner, channel)
        await sender.send(channel, {"n": "after"})
        assert (await owner.receive(channel))["n"] == "after"
        verify_clean(owner)
        await sender.close()
        await owner.close()

    asyncio.run(run())


def test_a_forked_child_is_not_handed_its_parents_lent_messages(prefix):
    async def lend() -> tuple[IPCChannelLayer, str]:
        owner = IPCChannelLayer(prefix=prefix, **CONFIG)
        channel = await owner.new_channel()
        for n in range(5):
            await owner.send(channel, {"n": n})
        assert (await owner.receive(channel))["n"] == 0
        return owner, channel

    loop = asyncio.new_event_loop()
    owner, channel = loop.run_until_complete(lend())
    pid = os.fork()
    if pid == 0:  # the child: nothing of the four lent to its parent may reach it
        try:
            os._exit(0 if asyncio.run(_nothing_arrives(owner, channel)) else 1)
        finally:
            os._exit(2)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = [loop.run_until_complete(owner.receive(channel))["n"] for _ in range(4)]
    assert got == [1, 2, 3, 4]
    loop.run_until_complete(owner.close())
    loop.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_owners_lent_messages_are_reaped(prefix, engine, children):
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    process, conn = workers.start_piped(workers.take_one_and_hold, prefix, CONFIG, engine=engine)
    children.append(process)
    assert conn.poll(PATIENCE)
    channel = conn.recv()

    async def fill() -> None:
        for n in range(10):
            await layer.send(channel, {"n": n})

    asyncio.run(fill())
    conn.send("take")
    assert conn.poll(PATIENCE)
    assert conn.recv() == ("took", {"n": 0})
    os.kill(process.pid, signal.SIGKILL)
    process.join(PATIENCE)
    store = layer.engine()

    def reaped() -> dict | None:
        store.look_for_dead()
        while store.reaping():
            store.reap()
        report = store.inspect()
        return report if report["owned_channels"] == 0 and report["channels"] == 0 else None

    report = wait_until(reaped, "the killed owner's channel to be reaped")
    assert report["problems"] == []
    assert report["messages"] == 0
    asyncio.run(layer.close())


@pytest.mark.parametrize("engine", ENGINES)
def test_threads_that_lend_take_and_settle_at_once_account_for_every_message(
    prefix, engine, children
):
    rounds = 3000
    process, conn = workers.start_piped(
        workers.lend_and_take_in_threads, prefix, rounds, engine=engine
    )
    children.append(process)
    assert conn.poll(PATIENCE * 4)
    taken, settled = conn.recv()
    for channel, got in taken.items():
        # Each message once, each taker's in the order lent, and each counted to settle once.
        assert sorted(int(message) for _taker, message in got) == list(range(rounds)), channel
        for taker in (0, 1):
            mine = [int(message) for who, message in got if who == taker]
            assert mine == sorted(mine), channel
        assert settled[channel] == rounds, channel
