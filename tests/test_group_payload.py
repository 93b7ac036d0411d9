"""A group_send stores its payload once: each member's channel gets a 64-byte node that
references one counted payload block, freed with its last reference however the references go
(taken, expired, flushed), and verify() checks the count against the nodes it finds.

Memory is read through the store's own accounting (``observe.figures``, ``Engine.inspect``).
The crash cases (a kill at every journaled write of a shared group_send and of taking its
copies) are scenarios of test_chaos.py."""

from __future__ import annotations

import asyncio

import pytest

from asgi_ipc import IPCChannelLayer, StoreCorrupted
from asgi_ipc.engine import BACK, Engine, Taken
from asgi_ipc.engine.layout import LAYOUT_VERSION, WORD
from asgi_ipc.engine.queues import C_HEAD, M_DATA, P_REFS
from asgi_ipc.observe import figures

from .helpers import MiB, shm_path

KiB = 1024
NODE_BYTES = 64
# A payload block: its header, its reference count and its length word, then the bytes.
PAYLOAD_OVERHEAD = 3 * WORD
DAY_MS = 86_400_000


class Receive:
    def __init__(self, channel: bytes) -> None:
        self.channel = channel


def take(engine: Engine, channel: bytes) -> tuple[bytes, int, int] | None:
    """The next message of ``channel`` taken in one hold: (bytes, expiry, epoch), or None."""
    taken = Taken()
    engine.take([Receive(channel)], taken)
    if not taken.handed:
        return None
    _receive, data, expires, _lent = taken.handed[0]
    return data, expires, taken.epoch


def used(engine: Engine) -> int:
    return engine.inspect()["channel_memory"]["used"]


def group_send(engine: Engine, group: bytes, data: bytes, expiry_ms: int = 60_000,
               capacity: int = 100) -> tuple[int, int]:
    return engine.group_send(group, data, lambda _name: capacity, expiry_ms, DAY_MS)


def with_records(engine: Engine, channels: list[bytes]) -> None:
    """Give each channel a record, empty again: what a consumer's channel has while its
    receive waits. All sends come first, so that no send's sweep finds a record idle."""
    for channel in channels:
        engine.send(channel, b"x", 100, 60_000)
    for channel in channels:
        assert take(engine, channel)[0] == b"x"


async def test_a_10_kib_group_send_to_1000_members_takes_the_payload_once(prefix):
    layer = IPCChannelLayer(prefix=prefix, channel_memory=16 * MiB, group_memory=MiB)
    members = [f"member.{n}" for n in range(1000)]
    for channel in members:
        await layer.group_add("everyone", channel)
        await layer.send(channel, {"first": True})
    for channel in members:
        assert await layer.receive(channel) == {"first": True}
    before = figures(prefix, check=True)
    message = {"type": "big", "body": bytes(range(256)) * 40}  # 10 KiB
    await layer.group_send("everyone", message)
    after = figures(prefix, check=True)
    assert after.problems == [] and after.messages == 1000
    added = after.channel_memory.used - before.channel_memory.used
    assert added <= 10 * KiB + 1000 * NODE_BYTES + 4 * KiB, f"{added} B for one group_send"
    for channel in members:
        assert await layer.receive(channel) == message
    drained = figures(prefix, check=True)
    assert drained.problems == [] and drained.messages == 0
    assert drained.channel_memory.used == before.channel_memory.used
    assert drained.counters["delivered"] == 1000 and drained.counters["received"] == 2000
    await layer.close()


def test_expired_shared_copies_free_the_payload_with_the_last_one(prefix):
    clock = [10**12]
    engine = Engine(prefix, 4 * MiB, MiB, clock=lambda: clock[0])
    members = [b"m%d" % n for n in range(6)]
    for channel in members:
        engine.group_add(b"g", channel)
    engine.group_add(b"first", members[1])
    with_records(engine, members)
    empty = used(engine)
    data = b"p" * 3000
    assert group_send(engine, b"g", data, expiry_ms=1000) == (6, 0)
    shared = used(engine) - empty
    assert len(data) + PAYLOAD_OVERHEAD + 6 * NODE_BYTES <= shared
    assert shared < len(data) + PAYLOAD_OVERHEAD + 7 * NODE_BYTES
    clock[0] += 2000

    # Each way an expired message goes: found by a receive, dropped before an append to its
    # channel (here refused: capacity 0), and reclaimed oldest first by a group_send's expiry.
    assert take(engine, members[0]) is None
    state = engine.inspect()
    assert state["problems"] == [] and state["messages"] == 5
    assert used(engine) - empty >= len(data)  # the other copies still reach the payload
    assert group_send(engine, b"first", b"new", capacity=0) == (1, 1)
    state = engine.inspect()
    assert state["problems"] == [] and state["messages"] == 2
    assert used(engine) - empty >= len(data)
    assert group_send(engine, b"nobody", b"new") == (0, 0)
    state = engine.inspect()
    assert state["problems"] == [] and state["messages"] == 0
    assert used(engine) == empty
    assert state["counters"]["expired"] == 6
    engine.close()


def test_flush_takes_shared_copies_and_the_store_is_usable_after(prefix):
    engine = Engine(prefix, 4 * MiB, MiB)
    members = [b"m%d" % n for n in range(3)]
    for channel in members:
        engine.group_add(b"g", channel)
    group_send(engine, b"g", b"q" * 500)
    engine.flush()
    state = engine.inspect()
    assert state["problems"] == [] and state["messages"] == 0 and used(engine) == 0
    for channel in members:  # a flush takes the groups too
        engine.group_add(b"g", channel)
    assert group_send(engine, b"g", b"r" * 500) == (3, 0)
    assert [take(engine, channel)[0] for channel in members] == [b"r" * 500] * 3
    state = engine.inspect()
    assert state["problems"] == [] and state["messages"] == 0
    engine.close()


def test_inline_and_shared_messages_queue_in_order_in_one_channel(prefix):
    engine = Engine(prefix, 4 * MiB, MiB)
    for channel in (b"a", b"b"):
        engine.group_add(b"g", channel)
    with_records(engine, [b"a", b"b"])
    empty = used(engine)
    two, four = b"two" * 100, b"four" * 100
    engine.send(b"a", b"one", 100, 60_000)
    inline = used(engine)
    group_send(engine, b"g", two)
    assert used(engine) - inline < len(two) + PAYLOAD_OVERHEAD + 3 * NODE_BYTES
    engine.send(b"a", b"three", 100, 60_000)
    group_send(engine, b"g", four)
    assert engine.verify() == [] and engine.inspect()["messages"] == 6
    assert take(engine, b"a")[0] == b"one"
    # A receive handed the shared copy is cancelled: the copy goes back first, inline.
    data, expires, epoch = take(engine, b"a")
    assert data == two
    assert engine.put_back(b"a", data, expires, epoch, Taken(None)) == BACK
    assert engine.verify() == []
    assert take(engine, b"b")[0] == two  # the last reference to the first payload
    assert engine.verify() == []
    assert [take(engine, b"a")[0] for _ in range(3)] == [two, b"three", four]
    assert take(engine, b"a") is None
    assert take(engine, b"b")[0] == four
    state = engine.inspect()
    assert state["problems"] == [] and state["messages"] == 0 and used(engine) == empty
    engine.close()


def test_verify_reports_a_wrong_count_or_reference_and_a_receive_refuses_it(prefix):
    engine = Engine(prefix, 4 * MiB, MiB)
    for channel in (b"a", b"b"):
        engine.group_add(b"g", channel)
    group_send(engine, b"g", b"s" * 200)
    words = engine.words
    queues = engine.queues
    node = words[queues.find(b"a", queues.hash.of(b"a")) + C_HEAD]
    payload = words[node + M_DATA]

    words[payload + P_REFS] += 1
    problems = engine.verify()
    assert problems == [f"payload block {payload} counts 3 references, 2 messages reference it"]
    words[payload + P_REFS] -= 1
    assert engine.verify() == []

    for wrong in (1, len(words) - 1, node):  # the header, the store's last word, the node itself
        words[node + M_DATA] = wrong
        problems = engine.verify()
        assert any(f"references {wrong}, not a payload block" in p for p in problems), problems
        with pytest.raises(StoreCorrupted):
            take(engine, b"a")
        words[node + M_DATA] = payload
        assert engine.verify() == []  # the failed receive was rolled back
    assert take(engine, b"a")[0] == take(engine, b"b")[0] == b"s" * 200
    assert engine.verify() == [] and engine.inspect()["messages"] == 0
    engine.close()


def test_a_store_of_the_layout_before_shared_payloads_is_refused(prefix):
    async def make():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=256 * KiB)
        await layer.send("c", {"a": 1})
        await layer.close()

    asyncio.run(make())
    with open(shm_path(prefix), "r+b") as f:
        f.seek(WORD)
        f.write((2).to_bytes(WORD, "little"))
    expected = f"layout version 2, this asgi_ipc reads version {LAYOUT_VERSION}"
    with pytest.raises(StoreCorrupted, match=expected):
        asyncio.run(IPCChannelLayer(prefix=prefix).send("c", {}))
