"""Runs a fixed round of operations on a (corrupted) store and prints what each did, as one
JSON line, for tests/test_compiled.py to compare between the two engines.

    python corrupt_worker.py PREFIX

Each outcome is the result, or the class of the exception raised. Not its cause: a word read
as an index that lies past the store is an IndexError in pure Python, and in the compiled
engine an IndexError or, past 2**63, an OverflowError; the store turns either into the same
StoreCorrupted."""

from __future__ import annotations

import asyncio
import json
import sys

import asgi_ipc
from asgi_ipc import IPCChannelLayer

CONFIG = {"channel_memory": 1 << 20, "group_memory": 1 << 20}
CHANNELS = ("c.one", "c.two", "c.three")


def outcome(result: object = None, exc: BaseException | None = None) -> list:
    if exc is None:
        return ["ok", repr(result)]
    return [type(exc).__name__]


async def run(prefix: str) -> dict:
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    results = []

    async def attempt(call) -> None:
        try:
            results.append(outcome(await asyncio.wait_for(call, 2)))
        except asyncio.TimeoutError:
            results.append(["waits"])
        except Exception as exc:
            results.append(outcome(exc=exc))

    for channel in CHANNELS:
        await attempt(layer.receive(channel))
        await attempt(layer.send(channel, {"n": channel}))
    await attempt(layer.group_send("g", {"to": "all"}))
    for channel in CHANNELS:
        await attempt(layer.receive(channel))
    try:
        problems = layer.engine().verify()
    except Exception as exc:
        problems = outcome(exc=exc)
    await layer.close()
    return {"engine": asgi_ipc.ENGINE, "results": results, "verify": problems}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1]))), flush=True)
