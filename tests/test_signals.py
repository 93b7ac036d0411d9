"""An exception from a signal handler, landing anywhere in an operation, never leaves the store
lock held: the interrupted process carries on, and so does every other process.

A spawned child runs sends, receives of messages it knows are there, group_add, group_send and
group_discard in a loop in its main thread, with a one-shot ``ITIMER_REAL`` of a random few
microseconds re-armed every round and a SIGALRM handler that raises whenever it lands in
asgi_ipc's code. It catches the exception and goes on, until thousands have landed; in a variant
a second thread works with the same layer all along. Then the child must still send and
receive, and this process must find the lock free, send, receive and verify a sound store. (A
lock left held shows as a child that hangs on its own next operation.)
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import random
import signal
import threading

import pytest

from asgi_ipc import IPCChannelLayer

from .helpers import MiB, shm_path, verify_clean

spawn = multiprocessing.get_context("spawn")

INTERRUPTS = 3000  # exceptions the child must have taken from its handler
MAX_ROUNDS = 60_000
# Generous: only a hang (the old behaviour) gets anywhere near it.
HANG = 60


class Interrupt(Exception):
    """What the child's SIGALRM handler raises (or KeyboardInterrupt, in a variant)."""


def _layer(prefix: str) -> IPCChannelLayer:
    return IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB,
                           capacity=1_000_000)


def _other_thread(layer: IPCChannelLayer, stop: threading.Event, done: list) -> None:
    """With the main thread's layer, in an event loop of its own, send and receive on a channel
    of its own until told to stop. Signal handlers never run here, but the process-directed
    SIGALRM may well be delivered to this thread, and the handler then runs in the main one."""
    async def run():
        while not stop.is_set():
            await layer.send("sig.thread", {"n": done[0]})
            await asyncio.wait_for(layer.receive("sig.thread"), HANG)
            done[0] += 1

    asyncio.run(run())


def _in_the_store(frame) -> bool:
    """True if ``frame`` runs asgi_ipc code, or code asgi_ipc called, rather than the event
    loop's or this test's own: where the handler raises, so that the interrupts test the
    store, not asyncio's tolerance of exceptions in its internals."""
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}asgi_ipc{os.sep}" in name:
            return True
        if f"{os.sep}asyncio{os.sep}" in name:
            return False
        frame = frame.f_back
    return False


def interrupted_child(prefix: str, raising: str, threaded: bool, conn) -> None:
    kind = KeyboardInterrupt if raising == "KeyboardInterrupt" else Interrupt
    fired = [0]

    def handler(signum, frame):
        if not _in_the_store(frame):
            signal.setitimer(signal.ITIMER_REAL, 1e-5)  # try again in a moment
            return
        fired[0] += 1
        raise kind

    signal.signal(signal.SIGALRM, handler)
    layer = _layer(prefix)
    stop, done = threading.Event(), [0]
    if threaded:
        helper = threading.Thread(target=_other_thread, args=(layer, stop, done))
        helper.start()
    counts = {"rounds": 0, "interrupted": 0, "gave_up": 0}

    async def one_round(i: int, present: int) -> int:
        await layer.send("sig.main", {"i": i})
        present += 1
        await layer.group_add("sig.group", "sig.member")
        await layer.group_send("sig.group", {"i": i})
        await layer.group_discard("sig.group", "sig.member")
        if present:
            # A receive cut short may have taken a message it never returned: give up
            # waiting for one that may be gone after a while.
            give_up = asyncio.get_running_loop().call_later(0.5, asyncio.current_task().cancel)
            try:
                await layer.receive("sig.main")
            finally:
                give_up.cancel()
            present -= 1
        return present

    async def rounds() -> None:
        present = 0  # messages known to be on sig.main: sends that returned, less receives
        while fired[0] < INTERRUPTS and counts["rounds"] < MAX_ROUNDS:
            counts["rounds"] += 1
            try:
                signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-6, 3e-4))
                present = await one_round(counts["rounds"], present)
            except kind:
                counts["interrupted"] += 1
            except asyncio.CancelledError:
                counts["gave_up"] += 1
                present = 0
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)

    loop = asyncio.new_event_loop()
    main = loop.create_task(rounds())
    while not main.done():
        try:
            loop.run_until_complete(main)
        except kind:  # raised in a callback the loop runs (a doorbell's), not in the task
            counts["interrupted"] += 1
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    async def still_works():
        await layer.send("sig.after", {"ok": 1})
        return await asyncio.wait_for(layer.receive("sig.after"), HANG)

    after = loop.run_until_complete(still_works())
    stop.set()
    if threaded:
        helper.join(HANG)
    conn.send({
        "fired": fired[0], **counts, "after": after,
        "thread_rounds": done[0], "thread_alive": threaded and helper.is_alive(),
    })
    conn.recv()  # stay attached, idle, while the parent checks the store
    loop.run_until_complete(layer.close())
    loop.close()


def lock_is_free(prefix: str) -> bool:
    """Ask without waiting, on a descriptor of our own, whether anyone holds the store lock."""
    fd = os.open(shm_path(prefix), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.mark.parametrize(
    ("raising", "threaded"),
    [("Interrupt", False), ("KeyboardInterrupt", False), ("Interrupt", True)],
    ids=["exception", "keyboard-interrupt", "with-a-second-thread"],
)
def test_exceptions_from_a_signal_handler_never_leave_the_lock_held(
    prefix, children, raising, threaded
):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=interrupted_child, args=(prefix, raising, threaded, child_end))
    child.start()
    children.append(child)
    for _ in range(HANG):
        if parent_end.poll(1) or not child.is_alive():
            break
    assert parent_end.poll(0), (
        f"the interrupted child hung or died (exit code {child.exitcode}): its own next "
        f"operation waited on a lock it never released"
    )
    report = parent_end.recv()
    assert report["fired"] >= INTERRUPTS, report
    assert report["after"] == {"ok": 1}
    if threaded:
        assert not report["thread_alive"], "the second thread hung on the lock"
        assert report["thread_rounds"] > 0
    # The child is idle and still attached: nobody may hold the lock now.
    assert lock_is_free(prefix), "the child is idle but still holds the store lock"

    async def from_here():
        layer = _layer(prefix)
        await layer.send("sig.parent", {"from": "parent"})
        received = await asyncio.wait_for(layer.receive("sig.parent"), HANG)
        stats = layer.engine().inspect()
        verify_clean(layer)
        await layer.close()
        return received, stats

    received, stats = asyncio.run(from_here())
    assert received == {"from": "parent"}
    assert stats["problems"] == []
    parent_end.send("done")
    child.join(HANG)
    assert child.exitcode == 0


def nested_child(prefix: str, conn) -> None:
    layer = _layer(prefix)
    store = layer.engine()
    def nested() -> str | None:
        try:
            store.send(b"sig.nested", b"\x80", 10, 60_000)
        except RuntimeError as exc:
            return str(exc)
        return None

    outcome = store.locked(nested)

    async def still_works():
        await layer.send("sig.nested", {"ok": 1})
        return await asyncio.wait_for(layer.receive("sig.nested"), HANG)

    conn.send((outcome, asyncio.run(still_works())))
    asyncio.run(layer.close())


def test_taking_the_lock_inside_its_own_hold_is_refused_not_run_nor_waited_on(prefix, children):
    """A signal handler calling the store while its thread is in the middle of an operation
    would find the lock its own: it gets a clear error (it used to wait on itself forever)."""
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=nested_child, args=(prefix, child_end))
    child.start()
    children.append(child)
    assert parent_end.poll(HANG), "the nested lock hold hung"
    outcome, after = parent_end.recv()
    assert outcome is not None and "taken again by the thread that holds it" in outcome
    assert after == {"ok": 1}
    child.join(HANG)
    assert child.exitcode == 0
    assert lock_is_free(prefix)
    layer = _layer(prefix)
    verify_clean(layer)
    asyncio.run(layer.close())
