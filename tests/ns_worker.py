"""A process of the namespace, other-user and slot-table tests, run as a script (possibly under
``unshare``) with the tree under test on PYTHONPATH:

    python ns_worker.py ROLE PREFIX [ARG]

Each role prints one line per step it reaches and flushes it, so the test can follow along.
Before it opens its layer a role raises the layer's ``check_interval`` to an hour: the
periodic check that makes up for lost rings never runs, and a ring lost turns into a hang the
test reports as a failure instead of a one-second delay nobody notices.
"""

from __future__ import annotations

import asyncio
import sys

from asgi_ipc import IPCChannelLayer
from asgi_ipc.engine.layout import SLOTS
from asgi_ipc.engine.lock import OwnDescription

CONFIG = {"channel_memory": 1024 * 1024, "group_memory": 256 * 1024, "capacity": 1000}


def say(*words: object) -> None:
    print(*words, flush=True)


async def ping(layer: IPCChannelLayer, rounds: int) -> None:
    """Wait for the test's start, play ``rounds`` round trips with pong, then wait for stop."""
    assert await layer.receive("ping") == {"start": True}
    for n in range(rounds):
        await layer.send("pong", {"n": n})
        assert await layer.receive("ping") == {"n": n}
    say("done")
    assert await layer.receive("ping") == {"stop": True}


async def pong(layer: IPCChannelLayer) -> None:
    while (message := await layer.receive("pong")) != {"stop": True}:
        await layer.send("ping", message)


async def wait(layer: IPCChannelLayer) -> None:
    """Wait on a channel nobody sends to, until killed."""
    await layer.receive("doomed")


async def idle(layer: IPCChannelLayer) -> None:
    """Wait for one message; then report how many datagrams the doorbell read meanwhile."""
    message = await layer.receive("idle")
    say("datagrams", layer.receiver().doorbell.datagrams, message["n"])


async def attach(layer: IPCChannelLayer) -> None:
    """Send once (which attaches to the store), then stay attached, never waiting, until stdin
    closes."""
    await layer.send("attached", {})
    say("attached")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def hold_slots(layer: IPCChannelLayer) -> None:
    """Hold every slot byte (so no process can claim a slot) until stdin closes."""
    store = layer.engine()
    own = OwnDescription(store.segment.fd)  # as a waiting process holds its slot byte
    held = sum(store.slots.try_lock(own.fd, slot) for slot in range(SLOTS))
    say("holding", held)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


ROLES = {
    "ping": ping, "pong": pong, "wait": wait, "idle": idle, "attach": attach,
    "hold-slots": hold_slots,
}


async def main() -> None:
    role, prefix, *args = sys.argv[1:]
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    layer.check_interval = 3600.0
    try:
        await ROLES[role](layer, *map(int, args))
    finally:
        await layer.close()
    say("exit")


if __name__ == "__main__":
    asyncio.run(main())
