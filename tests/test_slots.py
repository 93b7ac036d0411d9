"""A full process-slot table: only the receive that needs a slot fails, clearly; the process
goes on sending and taking messages, and waits again once a slot frees.

A helper process holds every slot byte (what ``SLOTS`` waiting processes would hold), so no
thousand processes are needed.
"""

from __future__ import annotations

import asyncio

import pytest

from asgi_ipc import IPCChannelLayer, StoreError
from asgi_ipc.engine.layout import SLOTS
from asgi_ipc.engine.slots import ProcessSlots

from .helpers import Worker

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
