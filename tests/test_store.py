"""What asgi_ipc promises beyond the shared contract: failed calls change nothing, memory full
and expiry behave, corrupt or foreign objects are refused clearly, and OS objects are private."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time

import msgpack
import pytest
from channels.exceptions import ChannelFull, MessageTooLarge

import asgi_ipc
from asgi_ipc import GroupMemoryFull, IPCChannelLayer, StoreClosed, StoreCorrupted
from asgi_ipc.engine import QUEUED, Taken, open_engine
from asgi_ipc.engine.layout import (
    COUNTERS,
    H_LOCK_PID,
    H_SWEEP_CHANNEL,
    H_SWEEP_GROUP,
    LAYOUT_VERSION,
)

from .helpers import MiB, shm_path, verify_clean, wait_until, write_object
from .test_signals import lock_is_free
from .test_wakeup import waiters

# The counters count refusals too (a ChannelFull): test_observe checks them.
HINT_WORDS = (H_LOCK_PID, H_SWEEP_CHANNEL, H_SWEEP_GROUP, *COUNTERS.values())


def layer_for(prefix, **config):
    config.setdefault("channel_memory", 1 * MiB)
    config.setdefault("group_memory", 256 * 1024)
    return IPCChannelLayer(prefix=prefix, **config)


def snapshot(layer) -> bytes:
    """The whole segment, less the words that are hints or counters rather than state, and
    less the undo journal's entries, which are scratch space once the count that covers them
    is 0."""
    store = layer.engine()
    words = store.words
    saved = [words[i] for i in HINT_WORDS]
    for i in HINT_WORDS:
        words[i] = 0
    data = bytearray(store.segment.mm)
    for i, value in zip(HINT_WORDS, saved, strict=True):
        words[i] = value
    g = store.geometry
    data[g.journal * 8 : g.channel_index * 8] = bytes((g.channel_index - g.journal) * 8)
    return bytes(data)


async def test_failed_calls_leave_the_store_byte_for_byte_unchanged(prefix):
    layer = layer_for(prefix, capacity=2)
    await layer.send("c.full", {"a": 1})
    await layer.send("c.full", {"a": 2})
    await layer.group_add("g", "c.member")
    before = snapshot(layer)
    failing = [
        (ChannelFull, layer.send("c.full", {"a": 3})),
        (TypeError, layer.send("c.x", ["not", "a", "dict"])),
        (TypeError, layer.send("bad name", {"a": 1})),
        (TypeError, layer.send("c.x", {"bad": {1, 2}})),
        (TypeError, layer.send("c.x", {"huge": 2**64})),
        (MessageTooLarge, layer.send("c.x", {"blob": b"x" * (1024 * 1024)})),
        (TypeError, layer.group_add("bad!group", "c.x")),
        (TypeError, layer.group_send("g", {"bad": object()})),
    ]
    for expected, call in failing:
        with pytest.raises(expected) as info:
            await call
        assert str(info.value) or expected is ChannelFull
        assert snapshot(layer) == before, f"{expected.__name__} changed the store"
    assert layer.engine().verify() == []
    await layer.close()


async def test_error_messages_name_the_problem(prefix):
    layer = layer_for(prefix, capacity=1)
    with pytest.raises(TypeError, match="must be a dict"):
        await layer.send("c", "text")
    with pytest.raises(TypeError, match="msgpack"):
        await layer.send("c", {"s": {1}})
    with pytest.raises(MessageTooLarge, match="limit is 1048576"):
        await layer.send("c", {"b": b"x" * (1024 * 1024)})
    await layer.send("c", {})
    with pytest.raises(ChannelFull, match="capacity"):
        await layer.send("c", {})
    await layer.close()


async def test_full_channel_memory_raises_channel_full_then_recovers(prefix):
    layer = layer_for(prefix, channel_memory=256 * 1024, capacity=100000)
    blob = b"x" * 4000
    sent = 0
    with pytest.raises(ChannelFull, match="channel memory"):
        while True:
            await layer.send("c.fill", {"blob": blob})
            sent += 1
    assert 50 < sent < 70  # 256 KiB holds ~62 messages of 4 KB
    before = snapshot(layer)
    with pytest.raises(ChannelFull):
        await layer.send("c.other", {"blob": blob})
    assert snapshot(layer) == before
    for _ in range(sent):
        await layer.receive("c.fill")
    # Drained and merged: one message as large as half the memory fits again.
    await layer.send("c.other", {"blob": b"y" * (120 * 1024)})
    assert (await layer.receive("c.other"))["blob"] == b"y" * (120 * 1024)
    report = layer.engine().inspect()
    assert report["problems"] == [] and report["messages"] == 0
    assert report["channel_memory"]["used"] < 1024  # at most the emptied channel's record
    await layer.close()


async def test_expired_messages_of_unread_channels_are_reclaimed(prefix):
    layer = layer_for(prefix, expiry=0.2, capacity=1000)
    for i in range(300):
        await layer.send(f"c.abandoned{i % 30}", {"i": i})
    assert layer.engine().inspect()["messages"] == 300
    await asyncio.sleep(0.3)
    # Every send reclaims a couple of expired messages wherever they are queued, and sweeps
    # four buckets of the channel index (2048 of them here) for idle records.
    for i in range(600):
        await layer.send("c.busy", {"i": i})
        await layer.receive("c.busy")
    report = layer.engine().inspect()
    assert report["messages"] == 0 and report["channels"] == 0
    # What is left are records of emptied channels that the sweep has not passed yet.
    assert report["channel_memory"]["used"] <= 128 * report["idle_records"]
    assert report["problems"] == []
    await layer.close()


async def test_full_memory_reclaims_expired_messages_first(prefix):
    layer = layer_for(prefix, channel_memory=256 * 1024, expiry=0.2, capacity=100000)
    blob = b"x" * 4000
    with pytest.raises(ChannelFull):
        for i in range(1000):
            await layer.send(f"c.gone{i}", {"blob": blob})
    await asyncio.sleep(0.3)
    for _ in range(50):  # all of them fit again as the expired ones are reclaimed
        await layer.send("c.new", {"blob": blob})
    await layer.close()


async def test_full_group_memory_raises_and_changes_nothing(prefix):
    layer = layer_for(prefix, group_memory=64 * 1024)
    added = 0
    with pytest.raises(GroupMemoryFull, match="group memory is full"):
        while True:
            await layer.group_add("big", f"c.member{added:06d}")
            added += 1
    # ~50 KiB of group memory, about 64 bytes a membership here.
    assert added > 500
    before = snapshot(layer)
    with pytest.raises(GroupMemoryFull):
        await layer.group_add("another", "c.x")
    assert snapshot(layer) == before
    for n in range(3):  # room for a group record and a membership
        await layer.group_discard("big", f"c.member{n:06d}")
    await layer.group_add("another", "c.x")
    assert layer.engine().verify() == []
    await layer.close()


def test_memberships_per_mib_of_group_memory(prefix):
    # The bound the documentation gives: at least 4000 memberships of new_channel() names.
    async def count():
        layer = layer_for(prefix, group_memory=1 * MiB)
        added = 0
        try:
            while True:
                await layer.group_add(f"room{added % 100}", f"specific.ipc!{added:032x}")
                added += 1
        except GroupMemoryFull:
            pass
        await layer.close()
        return added

    assert asyncio.run(count()) >= 4000


def test_unlink_removes_the_object_and_close_keeps_the_data(prefix):
    async def run():
        layer = layer_for(prefix)
        await layer.send("c.kept", {"a": 1})
        await layer.close()
        again = layer_for(prefix)
        assert await again.receive("c.kept") == {"a": 1}
        await again.close()

    asyncio.run(run())
    assert os.path.exists(shm_path(prefix))
    assert asgi_ipc.unlink(prefix) is True
    assert not os.path.exists(shm_path(prefix))
    assert asgi_ipc.unlink(prefix) is False


def test_objects_are_private_and_sparse(prefix):
    async def run():
        layer = IPCChannelLayer(prefix=prefix)  # the default 100 MiB + 20 MiB
        await layer.send("c", {"a": 1})
        info = os.stat(shm_path(prefix))
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_size > 120 * MiB
        # Only reserved pages cost memory: journal, indexes and the first chunk of the heap.
        assert info.st_blocks * 512 < 8 * MiB
        await layer.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "bad", ["", "../etc", "a/b", "x" * 21, ".hidden", "-dash", "sp ace", "é", None, 42]
)
def test_prefix_is_validated(bad):
    with pytest.raises(ValueError, match="prefix"):
        IPCChannelLayer(prefix=bad)


@pytest.mark.parametrize(
    "config",
    [{"capacity": 0}, {"capacity": 1.5}, {"expiry": 0}, {"group_expiry": -1},
     {"channel_memory": 1000}, {"group_memory": "big"}],
)
def test_bad_options_are_refused(config):
    with pytest.raises(ValueError):
        IPCChannelLayer(prefix="unused", **config)


def test_existing_store_keeps_its_sizes_and_warns(prefix, caplog):
    async def run():
        first = layer_for(prefix, channel_memory=1 * MiB)
        await first.send("c", {"a": 1})
        with caplog.at_level(logging.WARNING):
            second = layer_for(prefix, channel_memory=2 * MiB)
            assert await second.receive("c") == {"a": 1}
        assert "exists with channel_memory=1048576" in caplog.text
        assert second.engine().geometry.channel_memory == 1 * MiB
        await first.close()
        await second.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "content", [os.urandom(8192), b"\x01" * 100, b"\x01" * 10000],
    ids=["random", "short", "ones"],
)
def test_foreign_objects_are_refused_clearly(prefix, content):
    write_object(prefix, content)

    async def run():
        layer = layer_for(prefix)
        with pytest.raises(StoreCorrupted) as info:
            await layer.send("c", {"a": 1})
        assert f"asgi-ipc unlink --prefix {prefix}" in str(info.value)

    asyncio.run(run())


def test_other_layout_version_and_truncation_are_refused(prefix):
    async def run():
        layer = layer_for(prefix)
        await layer.send("c", {"a": 1})
        await layer.close()

    asyncio.run(run())
    with open(shm_path(prefix), "r+b") as f:
        f.seek(8)
        f.write((99).to_bytes(8, "little"))
    with pytest.raises(StoreCorrupted, match="layout version 99"):
        asyncio.run(layer_for(prefix).send("c", {}))
    with open(shm_path(prefix), "r+b") as f:
        f.seek(8)
        f.write(LAYOUT_VERSION.to_bytes(8, "little"))
        f.truncate(64 * 1024)
    with pytest.raises(StoreCorrupted, match="truncated"):
        asyncio.run(layer_for(prefix).send("c", {}))


def test_an_uninitialised_object_is_initialised(prefix):
    # What a creator that died before sizing its object leaves: an empty object. A tool that
    # only attaches leaves it for a layer to initialise with the sizes it is configured with.
    write_object(prefix, b"")
    with pytest.raises(asgi_ipc.StoreError, match="not initialised yet"):
        open_engine(prefix)
    assert os.stat(shm_path(prefix)).st_size == 0

    async def run():
        layer = layer_for(prefix)
        await layer.send("c", {"a": 1})
        assert await layer.receive("c") == {"a": 1}
        await layer.close()

    asyncio.run(run())


async def test_a_process_waiting_on_thousands_of_channels_survives_a_flush(prefix):
    """Registering 9000 waits again after a flush is more than one journal holds: it must be
    done in steps, and the process must go on working."""
    waiting = layer_for(prefix, channel_memory=16 * MiB)
    other = layer_for(prefix, channel_memory=16 * MiB)
    receives = [asyncio.ensure_future(waiting.receive(f"c.{i}")) for i in range(9000)]
    await asyncio.sleep(0.5)
    await other.flush()
    await waiting.send("c.x", {"after": "flush"})
    assert await waiting.receive("c.x") == {"after": "flush"}
    await other.send("c.17", {"to": 17})
    assert await asyncio.wait_for(receives[17], 3) == {"to": 17}
    for receive in receives:
        receive.cancel()
    await asyncio.gather(*receives, return_exceptions=True)
    assert other.engine().verify() == []
    await waiting.close()
    await other.close()


async def test_memory_full_of_a_dead_process_registrations_is_reclaimed(prefix):
    """A process registered on thousands of channels dies (its slot is taken back): a send
    that finds memory full reclaims the stale registrations in steps and succeeds."""
    dying = layer_for(prefix, channel_memory=1 * MiB)
    # It plays a dead process, which runs no periodic check: a check after the slot is taken
    # back would claim a slot again and register its receives anew (on a loaded machine, the
    # registering below outlasts the interval).
    dying.check_interval = 3600.0
    other = layer_for(prefix, channel_memory=1 * MiB)
    store = dying.engine()
    receives = []

    def all_registered() -> bool:
        doorbell = store.seat
        return doorbell is None or len(doorbell.registered) == len(receives)

    while all_registered():  # until registering finds no room (that receive waits on)
        receives.append(asyncio.ensure_future(dying.receive(f"c.{len(receives)}")))
        await asyncio.sleep(0)
    assert not any(receive.done() for receive in receives)
    doorbell = store.seat
    store.locked(store.slots.release, doorbell.slot, doorbell.token)  # as the reaper does
    for size in (200, 100_000):
        await other.send(f"c.size{size}", {"blob": b"x" * size})
    assert other.engine().verify() == []
    for receive in receives:
        receive.cancel()
    await asyncio.gather(*receives, return_exceptions=True)
    await dying.close()
    await other.close()


async def test_group_send_into_fragmented_memory_copies_one_by_one(prefix):
    """Memory full but for holes of one message each: a group_send finds no room to cut its
    copies from one piece and places them one by one, skipping (and counting) the rest."""
    layer = layer_for(prefix, channel_memory=256 * 1024, capacity=10**6)
    body = {"pad": b"x" * 80}
    sent = 0
    with pytest.raises(ChannelFull):
        while True:
            await layer.send(f"c.fill{sent % 2}", body)
            sent += 1
    holes = (sent + 1) // 2
    for _ in range(holes):
        await layer.receive("c.fill0")  # every other block of the heap is free now
    members = [f"c.member{i}" for i in range(holes + 50)]
    for channel in members:
        await layer.group_add("g", channel)
    store = layer.engine()
    taken, skipped = store.group_send(
        b"g", msgpack.packb(body), lambda name: 10**6, 60_000, 86_400_000
    )
    assert taken == len(members) and 0 < skipped < len(members)
    assert store.verify() == []
    assert store.inspect()["messages"] == sent - holes + len(members) - skipped
    await layer.close()


async def test_group_send_to_more_members_than_one_run_reaches_each_once(prefix):
    layer = layer_for(prefix, channel_memory=4 * MiB, group_memory=1 * MiB)
    members = [f"c.m{i}" for i in range(1300)]  # more than two runs of copies
    for channel in members:
        await layer.group_add("big", channel)
    for n in range(2):
        await layer.group_send("big", {"n": n})
    store = layer.engine()
    assert store.verify() == []
    assert store.inspect()["messages"] == 2 * len(members)
    for channel in members:
        assert [await layer.receive(channel) for _ in range(2)] == [{"n": 0}, {"n": 1}]
    assert store.inspect()["messages"] == 0 and store.verify() == []
    await layer.close()


async def test_an_error_in_the_middle_of_registering_a_receive_rolls_its_hold_back(prefix):
    """A StoreCorrupted raised after each journaled write, in turn, of a receive's registration
    on a new channel: the whole lock hold is rolled back and the receive gets the error (the
    half-made registration used to be committed, and the store no longer verified)."""
    layer = layer_for(prefix)
    store = layer.engine()
    first = asyncio.ensure_future(layer.receive("reg.first"))  # the process takes its seat
    while store.seat is None or waiters(store, "reg.first") != 1:
        await asyncio.sleep(0.01)
    faulted: list[int] = []
    writes = [0, 0]  # writes seen, and the one to fail after (0: none)

    def fault(_word: int) -> None:
        if writes[1]:
            writes[0] += 1
            if writes[0] == writes[1]:
                faulted.append(writes[1])
                raise StoreCorrupted(f"injected after write {writes[1]}")

    store.inject(on_write=fault)
    for n in range(1, 100):
        channel = f"reg.{n}"
        writes[:] = [0, n]
        receive = asyncio.ensure_future(layer.receive(channel))
        while not receive.done() and waiters(store, channel) != 1:
            await asyncio.sleep(0.01)
        writes[1] = 0
        if not receive.done():  # fewer than n writes: registered, nothing failed
            break
        with pytest.raises(StoreCorrupted, match=f"after write {n}"):
            receive.result()
        assert store.verify() == [], f"after a fault at write {n}"
        assert waiters(store, channel) == 0
        assert channel.encode() not in store.seat.registered
    assert faulted == list(range(1, n)) and n > 2, faulted
    await layer.send(channel, {"registered": "after all"})
    assert await asyncio.wait_for(receive, 20) == {"registered": "after all"}
    assert store.verify() == []
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await layer.close()


# Rounds of close() racing two threads: enough for the race to land at each point of a hold
# (a thread spinning for the lock, blocked on it, holding it) many times over.
ROUNDS = 100


def test_close_racing_other_threads_fails_their_calls_with_store_closed_only(prefix):
    """Threads send and add to groups in a loop while another thread closes the layer: every
    call cut off fails with StoreClosed (it used to be OSError, ValueError or a false
    StoreCorrupted), the store verifies and its lock is free."""
    watcher = layer_for(prefix)
    errors: list[BaseException] = []
    for _ in range(ROUNDS):
        layer = layer_for(prefix)
        store = layer.engine()
        done = [0, 0]

        def work(i: int, store=store, done=done) -> None:
            try:
                while True:
                    if i:
                        store.group_add(b"race", b"race.%d" % (done[i] % 50))
                    else:
                        store.send(b"race.%d" % (done[i] % 50), b"x" * 100, 10**6, 60_000)
                    done[i] += 1
            except BaseException as exc:  # whatever it is, the test says which
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda done=done: min(done) >= 10, what="both threads to be working")
        asyncio.run(layer.close())
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()
        assert lock_is_free(prefix)
        assert watcher.engine().verify() == []
    assert len(errors) == 2 * ROUNDS
    assert [e for e in errors if not isinstance(e, StoreClosed)] == [], errors
    asyncio.run(watcher.flush())
    asyncio.run(watcher.close())


async def cancel_after_the_take(layer, other, channel: str, cancel_inside: bool):
    """A receive on ``channel`` waits; ``other`` sends it a message; the receive is cancelled
    right after the lock hold that takes the message for it: inside the hold, as a signal
    handler's cancel lands (``cancel_inside``), or before the receive resumes, once
    ``other``'s sends have taken every byte of channel memory that the take freed."""
    store, loop = layer.engine(), asyncio.get_running_loop()
    waiting = asyncio.ensure_future(layer.receive(channel))
    for _ in range(6000):
        if waiters(store, channel):
            break
        await asyncio.sleep(0.01)
    received, fired = COUNTERS["received"], []
    taken = store.words[received]

    def fill_then_cancel() -> None:
        # Large, then as large as the message taken, so that no gap it would fit is left.
        for filler in (msgpack.packb({"filler": "x" * 100}), msgpack.packb({"n": 0})):
            while other.engine().send(b"filler", filler, 10**6, 60_000) == QUEUED:
                pass
        waiting.cancel()

    def on_commit() -> None:
        if not fired and store.words[received] != taken:  # the take that handed it over
            fired.append(True)
            if cancel_inside:
                waiting.cancel()
            else:
                loop.call_soon(fill_then_cancel)  # before the receive resumes

    store.inject(on_commit=on_commit)
    await other.send(channel, {"n": 1})
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert fired


async def test_a_cancelled_receive_keeps_its_message_when_sends_took_the_memory(prefix):
    """The take freed the message's memory and other sends took it before the cancelled
    receive could put the message back: this process keeps it for the next receive of its
    channel here (it used to be lost: 44 of 1 063 acknowledged messages in 20 s)."""
    layer, other = layer_for(prefix), layer_for(prefix)
    await cancel_after_the_take(layer, other, "c", cancel_inside=False)
    assert await asyncio.wait_for(layer.receive("c"), 10) == {"n": 1}
    verify_clean(layer)
    await layer.close()
    await other.flush()
    await other.close()


async def test_a_kept_message_goes_back_to_its_channel_once_memory_frees(prefix, caplog):
    """The same, and then memory frees: the periodic check puts the message back for any
    process to receive; a layer closed while it still has no room logs the loss."""
    layer, other = layer_for(prefix), layer_for(prefix)
    await cancel_after_the_take(layer, other, "c", cancel_inside=False)
    while await asyncio.wait_for(other.receive("filler"), 10) and other.engine().queues.\
            has_messages(b"filler"):
        pass
    assert await asyncio.wait_for(other.receive("c"), 10) == {"n": 1}
    await cancel_after_the_take(layer, other, "d", cancel_inside=False)
    with caplog.at_level(logging.ERROR, logger="asgi_ipc"):
        await layer.close()
    assert "1 message(s) taken by cancelled receives were lost on close" in caplog.text
    verify_clean(other)
    await other.flush()
    await other.close()


async def test_a_cancel_landing_in_the_middle_of_serving_receives_loses_nothing(prefix):
    """asyncio's Ctrl-C handling cancels the main task from a signal handler, so the cancel
    can land after the receives to serve were chosen and before their messages are handed
    over: the message goes back, no callback fails, and the next receive gets it."""
    layer, other = layer_for(prefix), layer_for(prefix)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    await cancel_after_the_take(layer, other, "c", cancel_inside=True)
    assert await asyncio.wait_for(layer.receive("c"), 10) == {"n": 1}
    await other.send("c", {"n": 2})
    assert await asyncio.wait_for(layer.receive("c"), 10) == {"n": 2}
    assert errors == []
    verify_clean(layer)
    await layer.close()
    await other.close()


def test_close_waits_for_a_long_hold_in_another_thread(prefix, caplog):
    """One thread is in the middle of a long write (a hook stops it for 3 s, as a group_send
    to 400 000 members would take) when another closes the layer: close() waits for the hold
    to end, however long, instead of releasing the lock under the write; another attachment
    gets the lock only then, finding nothing to roll back."""
    layer = layer_for(prefix)
    store = layer.engine()
    other = open_engine(prefix)  # another open file description: another process's lock
    writing = threading.Event()

    def stop_in_the_middle(_word: int) -> None:
        if not writing.is_set():
            writing.set()
            time.sleep(3)

    store.inject(on_write=stop_in_the_middle)
    outcomes: dict[str, object] = {}

    def run(name: str, call) -> None:
        try:
            outcomes[name] = call()
        except BaseException as exc:  # whatever it is, the test says which
            outcomes[name] = exc

    sender = threading.Thread(
        target=run, args=("send", lambda: store.send(b"long", b"x" * 100, 10, 60_000))
    )
    sender.start()
    assert writing.wait(60)
    closer = threading.Thread(target=run, args=("close", lambda: asyncio.run(layer.close())))
    closer.start()
    with caplog.at_level(logging.WARNING, logger="asgi_ipc"):
        assert other.locked(lambda: other.queues.has_messages(b"long"))
    sender.join(60)
    closer.join(60)
    assert outcomes == {"send": QUEUED, "close": None}
    assert "rolling back" not in caplog.text
    assert other.verify() == []
    other.close()


def test_calls_after_close_raise_store_closed_and_touch_no_other_file(prefix, tmp_path):
    """An engine kept after its layer closed: its calls raise StoreClosed, even once another
    file has the descriptor number the store had (they used to open /proc/self/fd/<number>,
    that other file, lock it and call the store corrupt)."""
    layer = layer_for(prefix)
    store = layer.engine()
    asyncio.run(layer.send("closed", {"n": 1}))
    number = store.segment.fd
    asyncio.run(layer.close())
    unrelated = tmp_path / "unrelated"
    unrelated.write_bytes(b"\0" * 4096)
    fd = os.open(unrelated, os.O_RDWR)
    try:
        if fd != number:
            os.dup2(fd, number)
        for call in (
            lambda: store.send(b"closed", b"x", 10, 60_000),
            store.verify,
            lambda: store.put_back(b"closed", b"x", 2**62, 0, Taken(None)),
        ):
            with pytest.raises(StoreClosed):
                call()
        opened = [
            entry for entry in os.listdir("/proc/self/fd")
            if int(entry) not in (fd, number)
            and os.path.realpath(f"/proc/self/fd/{entry}") == str(unrelated)
        ]
        assert opened == [], "a call after close opened another file"
    finally:
        if fd != number:
            os.close(number)
        os.close(fd)
    again = layer_for(prefix)
    assert asyncio.run(again.receive("closed")) == {"n": 1}
    assert again.engine().verify() == []
    asyncio.run(again.close())
