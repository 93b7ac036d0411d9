"""Parcels (engine/queues.py, "Parcels"): a group_send lends its message once to each process
that owns members whose lists are empty, and that process takes it into its lent messages at
its next lock hold. Each member still gets each message once and in order with direct sends,
capacity still counts them, and a dead owner, a flush or a kill in the middle leaves a sound
store."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from asgi_ipc import IPCChannelLayer
from asgi_ipc.engine.queues import C_COUNT, PARCEL_MEMBERS

from . import workers
from .helpers import PATIENCE, MiB, wait_until

CONFIG = {"channel_memory": 8 * MiB, "group_memory": 2 * MiB, "capacity": 100}
GROUP = "parcels"


class Owner:
    """A child process that made ``count`` channels with new_channel(), each in GROUP, and
    receives only when told (``workers.parcel_owner``)."""

    def __init__(self, children: list, prefix: str, count: int, config: dict = CONFIG) -> None:
        self.process, self.conn = workers.start_piped(
            workers.parcel_owner, prefix, config, count, GROUP
        )
        children.append(self.process)
        assert self.conn.poll(PATIENCE), "the owner never got ready"
        _ready, self.pid, self.names = self.conn.recv()

    def ask(self, *command):
        self.conn.send(command)
        assert self.conn.poll(PATIENCE), f"the owner did not answer {command[0]!r}"
        return self.conn.recv()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.join(PATIENCE)


def _counts(store, names: list[str]) -> list[int]:
    """The count of each channel's record (0 without one)."""
    queues = store.queues

    def read() -> list[int]:
        recs = [queues.find(n.encode(), queues.hash.of(n.encode())) for n in names]
        return [store.words[rec + C_COUNT] if rec else 0 for rec in recs]

    return store.locked(read)


def _reap_all(store) -> None:
    store.look_for_dead()
    for _ in range(1000):
        if not store.reaping():
            return
        store.reap()
    raise AssertionError("reaping makes no progress")


def test_one_parcel_per_owner_in_order_with_direct_sends(prefix, children):
    owner = Owner(children, prefix, 100)
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    direct = owner.names[:10]
    run = asyncio.new_event_loop().run_until_complete
    run(layer.group_send(GROUP, {"g": 0}))
    report = store.inspect()
    # One parcel for the 100 members, no node: channel memory holds the parcel, the payload
    # and the records, nothing more.
    assert (report["parcels"], report["counters"]["parcels"]) == (1, 1)
    assert report["counters"]["delivered"] == 100
    assert report["messages"] == 100
    with_parcel = report["channel_memory"]["used"]
    for name in direct:
        run(layer.send(name, {"d": 0}))
    run(layer.group_send(GROUP, {"g": 1}))
    report = store.inspect()
    # The members with a message queued take the node path; the 90 others, a second parcel.
    assert (report["parcels"], report["counters"]["parcels"]) == (2, 2)
    assert report["messages"] == 210
    assert report["problems"] == []
    assert report["channel_memory"]["used"] > with_parcel
    got = owner.ask("receive", {name: 3 if name in direct else 2 for name in owner.names})
    for name in owner.names:
        expected = [{"g": 0}, {"d": 0}, {"g": 1}] if name in direct else [{"g": 0}, {"g": 1}]
        assert got[name] == expected, name
    report = wait_until(
        lambda: (r := store.inspect())["parcels"] == 0 and not any(_counts(store, owner.names))
        and r, "the owner to settle what it received",
    )
    assert report["problems"] == []
    assert report["counters"]["received"] == 210
    assert owner.ask("try", 0.05) == 0
    run(layer.close())


def test_capacity_counts_parcels_and_what_is_lent(prefix, children):
    config = {**CONFIG, "capacity": 2}
    owner = Owner(children, prefix, 20, config)
    layer = IPCChannelLayer(prefix=prefix, **config)
    store = layer.engine()
    run = asyncio.new_event_loop().run_until_complete
    for n in range(3):
        run(layer.group_send(GROUP, {"g": n}))
    counters = store.inspect()["counters"]
    assert (counters["delivered"], counters["group_full"], counters["parcels"]) == (40, 20, 2)
    assert _counts(store, owner.names) == [2] * 20
    # Received one each: the other is lent to the owner, and still counts.
    got = owner.ask("receive", {name: 1 for name in owner.names})
    assert all(messages == [{"g": 0}] for messages in got.values())
    run(layer.group_send(GROUP, {"g": "over"}))
    counters = store.inspect()["counters"]
    assert (counters["delivered"], counters["group_full"]) == (40, 40)
    got = owner.ask("receive", {name: 1 for name in owner.names})
    assert all(messages == [{"g": 1}] for messages in got.values())
    wait_until(lambda: not any(_counts(store, owner.names)), "the owner to settle")
    run(layer.group_send(GROUP, {"g": 3}))
    got = owner.ask("receive", {name: 1 for name in owner.names})
    assert all(messages == [{"g": 3}] for messages in got.values())
    assert store.verify() == []
    run(layer.close())


def test_parcels_of_a_killed_owner_are_freed(prefix, children):
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    used = store.inspect()["channel_memory"]["used"]
    owner = Owner(children, prefix, 100)
    run = asyncio.new_event_loop().run_until_complete
    for n in range(3):
        run(layer.group_send(GROUP, {"g": n, "body": "x" * 1000}))
    assert store.inspect()["parcels"] == 3
    owner.kill()
    _reap_all(store)
    report = store.inspect()
    assert report["problems"] == []
    assert (report["parcels"], report["parcels_to_free"]) == (0, 0)
    assert report["counters"]["reaped_messages"] == 300
    assert report["channel_memory"]["used"] == used
    run(layer.close())


def test_a_flush_takes_parcels(prefix, children):
    owner = Owner(children, prefix, 20)
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    run = asyncio.new_event_loop().run_until_complete
    run(layer.group_send(GROUP, {"g": 0}))
    assert store.inspect()["parcels"] == 1
    run(layer.flush())
    report = store.inspect()
    assert (report["problems"], report["parcels"]) == ([], 0)
    assert owner.ask("try", 0.05) == 0
    assert store.verify() == []
    run(layer.close())


def _cut(children, target, *args) -> tuple:
    child, conn = workers.start_piped(target, *args)
    children.append(child)
    assert conn.poll(PATIENCE)
    result = conn.recv()
    if result[0] == "stalled":
        child.kill()
    child.join(PATIENCE)
    return result


def test_a_group_send_cut_anywhere_lends_all_or_nothing(prefix, children):
    owner = Owner(children, prefix, 20)
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    run = asyncio.new_event_loop().run_until_complete
    # Two members with a message queued take the node path, the others a parcel.
    for name in owner.names[:2]:
        run(layer.send(name, {"d": 0}))
    before = store.inspect()
    cut = 1
    while True:
        result = _cut(children, workers.group_send_after_journaled_writes, prefix, CONFIG,
                      GROUP, {"g": cut}, cut)
        report = store.inspect()  # its hold rolls back what the killed one left
        assert report["problems"] == [], cut
        if result[0] == "done":
            break
        assert _counts(store, owner.names) == [1, 1] + [0] * 18, cut
        assert (report["parcels"], report["counters"]["delivered"]) == (0, 0), cut
        assert report["channel_memory"]["used"] == before["channel_memory"]["used"], cut
        cut += 1
    assert cut > 20  # every write of it was cut at
    assert _counts(store, owner.names) == [2, 2] + [1] * 18
    assert report["parcels"] == 1
    got = owner.ask("receive", {name: 2 if i < 2 else 1 for i, name in enumerate(owner.names)})
    assert got[owner.names[0]] == [{"d": 0}, {"g": cut}]
    assert got[owner.names[5]] == [{"g": cut}]
    run(layer.close())


def test_a_drain_cut_anywhere_takes_all_or_nothing(prefix, children):
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    used = store.inspect()["channel_memory"]["used"]
    run = asyncio.new_event_loop().run_until_complete
    cut = 1
    while True:
        owner = Owner(children, prefix, PARCEL_MEMBERS)
        run(layer.group_send(GROUP, {"g": cut}))
        received = store.inspect()["counters"]["received"]
        owner.conn.send(("stall", cut, {name: 1 for name in owner.names}))
        assert owner.conn.poll(PATIENCE)
        result = owner.conn.recv()
        if result[0] == "done":
            assert all(got == [{"g": cut}] for got in result[2].values())
            break
        owner.kill()
        report = store.inspect()
        assert report["problems"] == [], cut
        # Drained for good (and lost with its process), or still pending.
        drained = report["counters"]["received"] - received
        assert (report["parcels"], drained) in ((1, 0), (0, PARCEL_MEMBERS)), cut
        _reap_all(store)
        report = store.inspect()
        assert report["problems"] == [], cut
        assert report["channel_memory"]["used"] == used, cut
        run(layer.group_discard(GROUP, "unused"))  # a hold that finds nothing left to do
        cut += 1
    assert cut > 5
    owner.kill()
    _reap_all(store)
    assert store.verify() == []
    run(layer.close())


def test_a_message_given_back_goes_before_a_parcel_made_meanwhile(prefix):
    """A receive handed its message, then cancelled before it sees it, while a group_send
    lends the channel's next message in a parcel: the message given back still comes first."""

    async def run() -> None:
        owner = IPCChannelLayer(prefix=prefix, **CONFIG)
        sender = IPCChannelLayer(prefix=prefix, **CONFIG)
        channels = [await owner.new_channel() for _ in range(PARCEL_MEMBERS)]
        for channel in channels:
            await owner.group_add(GROUP, channel)
        first = channels[0]
        loop = asyncio.get_running_loop()
        receive = asyncio.ensure_future(owner.receive(first))
        await asyncio.sleep(0.1)  # waiting, registered on its channel
        parcels = owner.engine().inspect()["counters"]["parcels"]

        def group_send_then_cancel() -> None:
            # After the hold that handed the message, before the receive resumes: the
            # channel's list is empty, so the group_send lends to this process in a parcel.
            sending = threading.Thread(
                target=lambda: asyncio.run(sender.group_send(GROUP, {"n": 2})))
            sending.start()
            sending.join()
            receive.cancel()

        armed = [True]

        def after_commit() -> None:
            if armed[0]:
                armed[0] = False
                loop.call_soon(group_send_then_cancel)

        owner.engine().inject(on_commit=after_commit)
        await sender.send(first, {"n": 1})
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(receive, PATIENCE)
        assert owner.engine().inspect()["counters"]["parcels"] == parcels + 1
        got = [await asyncio.wait_for(owner.receive(first), PATIENCE) for _ in range(2)]
        assert got == [{"n": 1}, {"n": 2}]
        for channel in channels[1:]:
            assert await asyncio.wait_for(owner.receive(channel), PATIENCE) == {"n": 2}
        assert owner.engine().verify() == []
        await owner.close()
        await sender.close()

    asyncio.run(run())


def test_members_of_one_process_each_get_a_message_of_their_own(prefix):
    """The members of a group in one process are handed one bytes object per group_send, which
    the layer decodes once and copies: still, no member's message is another's, whether its
    values are all immutable (copied) or not (decoded again), and a change made to one is seen
    in no other."""

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **CONFIG)
        channels = [await layer.new_channel() for _ in range(PARCEL_MEMBERS + 4)]
        for channel in channels:
            await layer.group_add(GROUP, channel)
        parcels = layer.engine().inspect()["counters"]["parcels"]
        flat = {"type": "chat.message", "text": "héllo", "n": 1, "f": 0.5, "b": b"\0", "x": None}
        nested = {"type": "chat.message", "list": [1, {"deep": [2]}], "map": {"k": "v"}}
        for message in (flat, nested):
            await layer.group_send(GROUP, message)
            got = [await asyncio.wait_for(layer.receive(c), PATIENCE) for c in channels]
            assert got == [message] * len(channels)
            assert len({id(m) for m in got}) == len(channels)
            got[0]["type"] = "changed"
            got[1]["added"] = True
            if "list" in message:
                got[2]["list"].append(3)
                got[3]["list"][1]["deep"].append(4)
                got[4]["map"]["k"] = "changed"
                assert len({id(m["list"]) for m in got}) == len(channels)
            assert got[5:] == [message] * (len(channels) - 5)
        assert layer.engine().inspect()["counters"]["parcels"] == parcels + 2
        await layer.close()

    asyncio.run(run())
