"""One side of the mixed-engine exchange of tests/test_compiled.py, run as a script.

    python engine_worker.py PREFIX ME PEER COUNT

Joins group "both" with channel ME, then at once sends COUNT messages to PEER and COUNT
group_sends to "both", while receiving on ME everything meant for it: COUNT from PEER and
2 x COUNT group messages (its own and PEER's). Prints one JSON line: the engine it ran, where
its journal module came from, and what it received from whom, in order."""

from __future__ import annotations

import asyncio
import json
import sys

import asgi_ipc
import asgi_ipc.engine.journal
from asgi_ipc import IPCChannelLayer


async def main(prefix: str, me: str, peer: str, count: int) -> dict:
    layer = IPCChannelLayer(prefix=prefix, capacity=100_000)
    await layer.group_add("both", me)
    print("ready", flush=True)
    sys.stdin.readline()  # both are members before anyone sends

    async def send() -> None:
        for i in range(count):
            await layer.send(peer, {"from": me, "i": i})
            await layer.group_send("both", {"from": me, "g": i})

    async def receive() -> dict:
        got: dict[str, list[int]] = {}
        for _ in range(3 * count):
            message = await layer.receive(me)
            key = message["from"] + (".g" if "g" in message else "")
            got.setdefault(key, []).append(message.get("i", message.get("g")))
        return got

    got, _ = await asyncio.wait_for(asyncio.gather(receive(), send()), 120)
    await layer.group_discard("both", me)
    await layer.close()
    return {"engine": asgi_ipc.ENGINE, "journal": asgi_ipc.engine.journal.__file__, "got": got}


if __name__ == "__main__":
    prefix, me, peer, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    print(json.dumps(asyncio.run(main(prefix, me, peer, count))), flush=True)
