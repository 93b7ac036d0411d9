"""Receives that wait in event loops that come and go, in several threads: none is ever left
waiting for ever. The check that makes up for lost rings outlives the loop that started it and
its own errors; ``close()`` ends every pending receive in every loop; a full channel memory
delays a receive instead of failing it.

A lost ring is made deterministically: a child process commits a send, stops just before it
rings (``workers.stall_before_ringing``) and is SIGKILLed. Timeouts are generous: they only turn
a receive left waiting for ever into a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading

import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull

from asgi_ipc import IPCChannelLayer, StoreClosed, StoreError
from asgi_ipc.doorbell import doorbell_address

from . import workers
from .helpers import wait_until
from .test_wakeup import CONFIG, receive, start, waiters

pytestmark = pytest.mark.timeout(120)

HANG = 20  # seconds after which a receive counts as waiting for ever


class LoopThread:
    """An event loop running in a thread of its own, as a server or asgiref thread has."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(HANG)
        self.loop.close()


@pytest.fixture
def layer(prefix):
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    yield layer
    asyncio.run(layer.close())


def lose_a_ring(children, layer: IPCChannelLayer, op: str, args: tuple) -> None:
    """Run ``op`` in a child that is killed after its commit, before it rings anyone."""
    child, conn = start(children, workers.stall_before_ringing, layer.prefix, CONFIG, op, args)
    state, _payload = receive(conn)
    assert state == "stalled"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)


def test_async_to_sync_receives_in_many_threads_survive_a_lost_ring(layer, children):
    """Each thread receives through async_to_sync, in loops made and closed per call; the loop
    of the first waiting receive closes while the others wait; a ring lost after that is still
    made up for in every thread."""
    store = layer.engine()
    channels = [f"sync.{i}" for i in range(4)]
    results: dict[str, list] = {channel: [] for channel in channels}
    for channel in channels:
        async_to_sync(layer.send)(channel, {"n": 0})
        async_to_sync(layer.group_add)("sync", channel)

    def first() -> None:
        async_to_sync(layer.receive)("sync.first")

    def each(channel: str) -> None:
        for _ in range(2):  # the first returns at once: a loop that came and went
            results[channel].append(async_to_sync(layer.receive)(channel))

    starter = threading.Thread(target=first, daemon=True)
    starter.start()
    wait_until(lambda: waiters(store, "sync.first") == 1, what="the first receive to wait")
    threads = [threading.Thread(target=each, args=(c,), daemon=True) for c in channels]
    for thread in threads:
        thread.start()
    for channel in channels:
        wait_until(lambda c=channel: waiters(store, c) == 1, what=f"{channel} to wait")
    async_to_sync(layer.send)("sync.first", {"go": True})
    starter.join(HANG)
    assert not starter.is_alive()
    lose_a_ring(children, layer, "group_send", ("sync", {"n": 1}))
    for thread in threads:
        thread.join(HANG)
    assert results == {channel: [{"n": 0}, {"n": 1}] for channel in channels}
    assert store.verify() == []


def test_a_receive_keeps_its_safety_net_after_the_loop_that_started_it_closed(layer, children):
    store = layer.engine()
    a, b = LoopThread(), LoopThread()
    try:
        in_a = a.submit(layer.receive("loop.a"))  # waits first: its loop adds the reader
        wait_until(lambda: waiters(store, "loop.a") == 1, what="the receive in A to wait")
        in_b = b.submit(layer.receive("loop.b"))
        wait_until(lambda: waiters(store, "loop.b") == 1, what="the receive in B to wait")
        asyncio.run(layer.send("loop.a", {"to": "a"}))
        assert in_a.result(HANG) == {"to": "a"}
        a.close()
        lose_a_ring(children, layer, "send", ("loop.b", {"lost": "ring"}))
        assert in_b.result(HANG) == {"lost": "ring"}
        # A ring still reaches B, though the reader was first added by A, now closed.
        again = b.submit(layer.receive("loop.b"))
        wait_until(lambda: waiters(store, "loop.b") == 1, what="B to wait again")
        asyncio.run(layer.send("loop.b", {"rung": True}))
        assert again.result(HANG) == {"rung": True}
    finally:
        b.close()
        if not a.loop.is_closed():
            a.close()


async def test_a_check_that_fails_once_is_tried_again(layer, children):
    store = layer.engine()
    failures = []
    has_messages = store.queues.has_messages

    def fails_once(name: bytes) -> bool:
        if not failures:
            failures.append(name)
            raise OSError("a check that fails once")
        return has_messages(name)

    store.queues.has_messages = fails_once  # only the periodic check asks this
    waiting = asyncio.ensure_future(layer.receive("retry"))
    for _ in range(HANG * 100):
        if failures:
            break
        await asyncio.sleep(0.01)
    assert failures == [b"retry"]
    lose_a_ring(children, layer, "send", ("retry", {"after": "failure"}))
    assert await asyncio.wait_for(waiting, HANG) == {"after": "failure"}


def test_close_ends_the_receives_waiting_in_every_loop(layer):
    store, receiver = layer.engine(), layer.receiver()
    loops = [LoopThread(), LoopThread()]
    try:
        pending = [t.submit(layer.receive(f"closing.{i}")) for i, t in enumerate(loops)]
        for i in range(len(loops)):
            wait_until(lambda i=i: waiters(store, f"closing.{i}") == 1, what="receives to wait")
        asyncio.run(layer.close())
        for future in pending:
            with pytest.raises(StoreClosed):
                future.result(HANG)
        with pytest.raises(StoreClosed):
            asyncio.run(asyncio.wait_for(receiver.receive(b"closing.0"), HANG))
        # The layer opens its store again, and serves receives as before.
        again = loops[0].submit(layer.receive("closing.0"))
        asyncio.run(layer.send("closing.0", {"open": "again"}))
        assert again.result(HANG) == {"open": "again"}
    finally:
        for t in loops:
            t.close()


async def test_a_receive_waits_while_channel_memory_is_full(prefix):
    layer = IPCChannelLayer(
        prefix=prefix, channel_memory=256 * 1024, group_memory=64 * 1024, capacity=10**6
    )
    # Fill channel memory down to the last crumb, so no registration fits anywhere.
    for size in (4096, 256, 16, 0):
        while True:
            try:
                await layer.send("full", {"b": b"x" * size})
            except ChannelFull:
                break
    waiting = asyncio.ensure_future(layer.receive("ours"))
    await asyncio.sleep(0.2)
    assert not waiting.done(), waiting
    assert await layer.receive("full") == {"b": b"x" * 4096}
    await layer.send("ours", {"room": "again"})
    assert await asyncio.wait_for(waiting, HANG) == {"room": "again"}
    assert layer.engine().verify() == []
    await layer.flush()
    await layer.close()


def test_an_interrupted_lock_hold_settles_every_receive_it_took(layer):
    """A KeyboardInterrupt in the lock hold that serves receives gathered together escapes the
    loop, and still leaves none of those receives waiting for ever."""
    store = layer.engine()
    pop = store.queues.pop

    def interrupted(name: bytes, *args):
        if name == b"cut.1":
            raise KeyboardInterrupt
        return pop(name, *args)

    async def both():
        # Two tasks in one pass of the loop: the second is gathered and served in a callback.
        return await asyncio.gather(
            layer.receive("cut.0"), layer.receive("cut.1"), return_exceptions=True
        )

    loop = asyncio.new_event_loop()
    try:
        store.queues.pop = interrupted
        task = loop.create_task(both())
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(task)
        del store.queues.pop
        loop.run_until_complete(layer.send("cut.0", {"n": 0}))
        first, second = loop.run_until_complete(asyncio.wait_for(task, HANG))
    finally:
        loop.close()
    assert first == {"n": 0}
    assert isinstance(second, StoreError) and "KeyboardInterrupt" in str(second)
    assert store.verify() == []


@pytest.mark.parametrize("then", ["awaited", "cancelled"])
def test_an_interrupt_right_after_the_commit_of_a_take_loses_no_message(layer, then):
    """A KeyboardInterrupt landing right after the commit of the lock hold that took a waiting
    receive's message: the message was taken for good, so the receive gets it, or puts it back
    when it is cancelled (it used to get the interrupt's error, and the message was lost)."""
    store = layer.engine()
    pop = store.queues.pop
    popped: list = []

    def popping(*args):
        found = pop(*args)
        if found is not None:
            popped.append(found)
        return found

    def interrupt_once() -> None:
        if popped and not fired:
            fired.append(True)
            raise KeyboardInterrupt

    fired: list[bool] = []
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(layer.receive("after.commit"))
        for _ in range(HANG * 100):
            if waiters(store, "after.commit") == 1:
                break
            loop.run_until_complete(asyncio.sleep(0.01))
        assert waiters(store, "after.commit") == 1
        # The channel queues' own pop is wrapped on the instance, to see the message taken.
        store.queues.pop = popping
        store.inject(on_commit=interrupt_once)
        # Sent from another loop: the ring waits on the doorbell until this loop runs again.
        asyncio.run(layer.send("after.commit", {"n": 1}))
        with pytest.raises(KeyboardInterrupt):  # out of the doorbell's callback
            loop.run_until_complete(asyncio.wait_for(asyncio.shield(task), HANG))
        del store.queues.pop
        store.journal.commit_hook = None
        assert fired and len(popped) == 1
        if then == "awaited":
            outcome = asyncio.gather(task, return_exceptions=True)
            assert loop.run_until_complete(asyncio.wait_for(outcome, HANG)) == [{"n": 1}]
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                loop.run_until_complete(task)
            again = layer.receive("after.commit")
            assert loop.run_until_complete(asyncio.wait_for(again, HANG)) == {"n": 1}
    finally:
        loop.close()
    assert store.verify() == []


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
async def test_an_exception_right_after_a_queued_message_is_taken_loses_no_message(
    layer, raised
):
    """A receive whose message is queued takes it in a lock hold of its own, with no receive
    to track. An exception landing right after that hold's commit: a KeyboardInterrupt (a
    signal handler's) puts the message back first in its channel, for the next receive; any
    other error leaves it to the receive, which the message was taken for for good."""
    store = layer.engine()
    for n in (1, 2):
        await layer.send("queued", {"n": n})
    fired: list[bool] = []
    # The engine's two ways to take, wrapped on the instance to see which one the receive took.
    holds: list[str] = []

    def counted(name: str):
        method = getattr(store, name)

        def call(*args):
            holds.append(name)
            return method(*args)

        return call

    store.take, store.take_queued = counted("take"), counted("take_queued")

    def once() -> None:
        if not fired:
            fired.append(True)
            raise raised("right after the commit")

    store.inject(on_commit=once)
    try:
        if raised is KeyboardInterrupt:
            with pytest.raises(KeyboardInterrupt):
                await layer.receive("queued")
        else:
            assert await layer.receive("queued") == {"n": 1}
    finally:
        store.journal.commit_hook = None
        del store.take, store.take_queued
    assert fired and holds == ["take_queued"]
    rest = [{"n": 1}, {"n": 2}] if raised is KeyboardInterrupt else [{"n": 2}]
    assert [await asyncio.wait_for(layer.receive("queued"), HANG) for _ in rest] == rest
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("queued"), 0.2)
    assert store.verify() == []


async def test_a_periodic_check_that_fails_forgets_the_registrations_it_made(prefix):
    """Receives wait unregistered while channel memory is full; the periodic check that
    registers them once memory frees fails after the first registration and is rolled back.
    The seat must forget that registration too (it used to keep it, so no check registered
    the channel again, and a receive trusted a record the rollback had freed)."""
    layer = IPCChannelLayer(
        prefix=prefix, channel_memory=256 * 1024, group_memory=64 * 1024, capacity=10**6
    )
    store = layer.engine()
    for size in (4096, 256, 16, 0):  # down to the last crumb: no registration fits
        while True:
            try:
                await layer.send("full", {"b": b"x" * size})
            except ChannelFull:
                break
    receives = {c: asyncio.ensure_future(layer.receive(c)) for c in ("check.a", "check.b")}
    while store.seat is None or len(store.seat.waiting_channels()) < 2:
        await asyncio.sleep(0.01)
    assert not store.seat.registered
    failures: list[int] = []

    def fail_once(_word: int) -> None:
        # A write after the check noted its first registration: the second one's.
        if not failures and store.seat is not None and store.seat.registered:
            failures.append(len(store.seat.registered))
            raise OSError("injected fault in the periodic check")

    store.inject(on_write=fail_once)
    for _ in range(8):  # room again: the checker thread registers the receives
        assert await layer.receive("full") == {"b": b"x" * 4096}
    for _ in range(HANG * 100):
        if failures:
            break
        await asyncio.sleep(0.01)
    assert failures == [1]
    # Every registration the seat records is in the store: the failed check's was forgotten.
    assert all(waiters(store, c.decode()) == 1 for c in store.seat.registered), (
        store.seat.registered
    )
    # Memory the rolled-back registration had is used again, then a message for each receive:
    # the checks that follow register them and hand them their messages.
    await layer.send("check.filler", {"f": 1})
    for channel in receives:
        await layer.send(channel, {"to": channel})
    for channel, waiting in receives.items():
        assert await asyncio.wait_for(waiting, HANG) == {"to": channel}
    assert await layer.receive("check.filler") == {"f": 1}
    assert store.verify() == []
    await layer.flush()
    await layer.close()


async def test_a_forked_child_closing_its_copy_leaves_the_parents_doorbell_alone(layer):
    """A child forked while its parent waits inherits the parent's doorbell; closing the child's
    copy of the layer must not remove the parent's socket, or no ring would reach the parent."""
    waiting = asyncio.ensure_future(layer.receive("forked.parent"))
    store = layer.engine()
    await asyncio.sleep(0)
    while store.seat is None or waiters(store, "forked.parent") != 1:
        await asyncio.sleep(0.01)
    socket_path = doorbell_address(store.wake_dir, store.seat.token)
    assert os.path.exists(socket_path)
    pid = os.fork()
    if pid == 0:  # the child: close its copy and leave at once
        code = 1
        try:
            asyncio.new_event_loop().run_until_complete(layer.close())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(socket_path), "the child removed its parent's doorbell"
    await layer.send("forked.parent", {"still": "rung"})
    assert await asyncio.wait_for(waiting, HANG) == {"still": "rung"}


async def test_close_closes_everything_even_when_leaving_the_store_fails(layer):
    """close() whose last lock hold fails (here: no descriptor left for this thread's lock)
    still ends the pending receives, removes the doorbell and closes the store."""
    waiting = asyncio.ensure_future(layer.receive("failing.close"))
    store = layer.engine()
    while store.seat is None or waiters(store, "failing.close") != 1:
        await asyncio.sleep(0.01)
    socket_path = doorbell_address(store.wake_dir, store.seat.token)
    lock = store.segment.lock

    def no_handle():
        raise StoreError("no descriptor left for this thread's lock")

    lock.handle = no_handle
    await layer.close()
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(waiting, HANG)
    assert store.segment.closed
    assert not os.path.exists(socket_path)


async def test_a_child_forked_after_the_store_was_unlinked_takes_a_slot_of_its_own(layer, prefix):
    """The child opens the store again through /proc (its name is gone): its own open file
    description, so its slot byte lock conflicts with its parent's instead of sharing it."""
    import asgi_ipc

    waiting = asyncio.ensure_future(layer.receive("unlinked.parent"))
    store = layer.engine()
    while store.seat is None or waiters(store, "unlinked.parent") != 1:
        await asyncio.sleep(0.01)
    parent_slot, parent_token = store.seat.slot, store.seat.token
    asgi_ipc.unlink(prefix)  # as `asgi-ipc unlink --force` would, with processes attached
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)

            async def wait_once():
                child = asyncio.ensure_future(layer.receive("unlinked.child"))
                # The doorbell inherited from the parent is forgotten at the child's first
                # lock hold; the child's own comes with the slot it claims.
                while getattr(layer.engine().seat, "token", parent_token) == parent_token:
                    await asyncio.sleep(0.01)
                os.write(write_end, b"%d" % layer.engine().seat.slot)
                child.cancel()

            asyncio.new_event_loop().run_until_complete(wait_once())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    child_slot = int(os.read(read_end, 16) or b"-1")
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_slot >= 0 and child_slot != parent_slot
    assert store.slots.token(parent_slot) == store.seat.token
    waiting.cancel()
