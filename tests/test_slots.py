"""A full process-slot table: only the receive that needs a slot fails, clearly; the process
goes on sending and taking messages, and waits again once a slot frees. A process that forks
while it waits does not lend its slot to the child: once it dies its slot is found dead.

A helper process holds every slot byte (what ``SLOTS`` waiting processes would hold), so no
thousand processes are needed.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from asgi_ipc import IPCChannelLayer, StoreError
from asgi_ipc.engine.layout import SLOTS
from asgi_ipc.engine.slots import ProcessSlots

from .helpers import Worker, doorbells, gone, slot_table, wait_until
from .workers import forking_waiter, observed_layer

pytestmark = pytest.mark.timeout(120)

CONFIG = {"channel_memory": 1024 * 1024, "group_memory": 256 * 1024}


def test_a_full_slot_table_fails_only_the_receive_that_needs_a_slot(
    prefix, workers, monkeypatch  # noqa: F811
):
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    holder = Worker([], "hold-slots", prefix)
    workers.append(holder)
    assert holder.expect("holding") == ["holding", str(SLOTS)]

    # Every slot byte tried by this process, and whether the global lock was held meanwhile.
    tried: list[int | None] = []
    real_try_lock = ProcessSlots.try_lock

    def try_lock(slots, fd, slot):
        tried.append(store.segment.lock_holder())
        return real_try_lock(slots, fd, slot)

    monkeypatch.setattr(ProcessSlots, "try_lock", try_lock)

    async def run() -> None:
        with pytest.raises(StoreError, match=f"all {SLOTS} process slots") as failed:
            await asyncio.wait_for(layer.receive("empty"), 10)
        assert "several prefixes" in str(failed.value)
        assert len(tried) == SLOTS and set(tried) == {None}, "the table was scanned locked"
        assert store.segment.lock_holder() is None
        # The same process sends, and takes what is there, as before.
        await layer.send("c", {"n": 1})
        assert await layer.receive("c") == {"n": 1}
        await layer.group_add("g", "c")
        await layer.group_send("g", {"n": 2})
        assert await layer.receive("c") == {"n": 2}
        # Another receive that needs a slot fails at once, without looking at the table again.
        with pytest.raises(StoreError, match=f"all {SLOTS} process slots"):
            await asyncio.wait_for(layer.receive("empty"), 10)
        assert len(tried) == SLOTS

    asyncio.run(run())
    holder.stop()
    assert holder.proc.returncode == 0

    async def after() -> None:
        # Once a slot is free again, a receive waits and is woken by a send.
        async def waiting() -> asyncio.Task:
            while True:
                receive = asyncio.ensure_future(layer.receive("later"))
                await asyncio.sleep(0.05)
                if not receive.done():
                    return receive
                assert isinstance(receive.exception(), StoreError)
                await asyncio.sleep(0.2)

        receive = await asyncio.wait_for(waiting(), 30)
        await layer.send("later", {"n": 3})
        assert await asyncio.wait_for(receive, 10) == {"n": 3}
        assert store.inspect()["problems"] == []
        await layer.close()

    asyncio.run(after())


def test_a_child_forked_by_a_waiting_process_does_not_keep_its_slot_alive(prefix, children):
    """The child of a waiting process inherits every descriptor its parent had at the fork;
    none of them may hold the parent's slot byte. Once the parent is dead (the child still
    living), it is not waiting, a ring finds its doorbell dead, and its slot is freed."""
    layer = observed_layer(prefix)  # the test's own: it sends, it never waits
    store = layer.engine()
    try:
        with forking_waiter(children, prefix, "forked.wait") as (waiter, pid, forked):
            assert store.inspect()["waiting_processes"] == [pid]
            ((_slot, token),) = slot_table(layer)
            assert doorbells(prefix) == [f"{token:016x}"]
            os.kill(pid, signal.SIGKILL)
            # Not join(timeout): that waits for a pipe the forked child holds open too.
            wait_until(lambda: waiter.exitcode is not None, "the waiter to die")
            assert waiter.exitcode == -signal.SIGKILL and not gone(forked)
            assert store.inspect()["waiting_processes"] == []
            # A ring finds nobody at the doorbell and the slot byte free: the sender removes the
            # socket and frees the slot at its next lock hold.
            asyncio.run(layer.send("forked.wait", {"too": "late"}))
            assert doorbells(prefix) == []
            assert slot_table(layer) == []
            assert store.inspect()["problems"] == []
    finally:
        asyncio.run(layer.close())
