"""Where the time of a cross-process ping-pong goes: the median timeline of one round trip.

Two processes bounce a 100-byte message through asgi_ipc. Both stamp the entry and exit of the
steps of a hop (the send's lock hold, the append, the ring, the doorbell's callback, the lock hold
that takes the message) with CLOCK_MONOTONIC, which one machine shares, and the parent prints the
median time of each stamp from the start of a round trip. The stamps cost a few microseconds, so
the total runs above ``asgi-ipc bench``'s p50; the shape is what it is for:

    python benchmarks/pingpong_timeline.py [rounds]
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import secrets
import statistics
import sys
import time

STEPS = [
    ("asgi_ipc.engine", "Engine", "send", "send txn"),
    ("asgi_ipc.engine.lock", "StoreLock", "acquire", "lock"),
    ("asgi_ipc.doorbell", "Ringer", "ring", "ring (sendto)"),
    ("asgi_ipc.doorbell", "Doorbell", "_on_readable", "doorbell callback"),
]
# Methods of each engine's ChannelQueues, stamped on the instance: the compiled class cannot be
# changed, but its instances take attributes of their own, which the engine's calls find first.
QUEUE_STEPS = [("append", "append"), ("pop", "pop")]


def _stamped(original, label: str, marks: list):
    clock = time.perf_counter

    def stamped(*args, **kwargs):
        marks.append((f"{label} >", clock()))
        try:
            return original(*args, **kwargs)
        finally:
            marks.append((f"{label} <", clock()))

    return stamped


def _stamp_steps(marks: list) -> None:
    import importlib

    from asgi_ipc.engine import Engine

    for module, cls, name, label in STEPS:
        owner = getattr(importlib.import_module(module), cls)
        setattr(owner, name, _stamped(getattr(owner, name), label, marks))
    built = Engine.__init__

    def init(self, *args, **kwargs):
        built(self, *args, **kwargs)
        for name, label in QUEUE_STEPS:
            setattr(self.queues, name, _stamped(getattr(self.queues, name), label, marks))

    Engine.__init__ = init


def _player(role: str, prefix: str, rounds: int, results) -> None:
    from asgi_ipc import IPCChannelLayer

    marks: list = []
    _stamp_steps(marks)
    me, other = f"timeline.{role}", f"timeline.{'echo' if role == 'ping' else 'ping'}"

    async def play() -> None:
        layer = IPCChannelLayer(prefix=prefix)
        if role == "ping":
            await asyncio.sleep(0.3)  # the echo is waiting by then
            for _ in range(rounds):
                marks.append(("round", time.perf_counter()))
                await layer.send(other, {"body": b"x" * 80})
                await layer.receive(me)
        else:
            for _ in range(rounds):
                await layer.send(other, await layer.receive(me))
        await layer.close()

    asyncio.run(play())
    results.put((role, marks))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    prefix = "timeline" + secrets.token_hex(4)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    players = [ctx.Process(target=_player, args=(r, prefix, rounds, results)) for r in
               ("echo", "ping")]
    try:
        for p in players:
            p.start()
        marks = dict(results.get(timeout=120) for _ in players)
        for p in players:
            p.join(30)
    finally:
        from asgi_ipc import unlink

        unlink(prefix)
    events = sorted((t, f"{role}: {label}") for role, ms in marks.items() for label, t in ms)
    starts = [i for i, (_t, label) in enumerate(events) if label == "ping: round"]
    steady = list(zip(starts[rounds // 5 : -1], starts[rounds // 5 + 1 :], strict=True))
    shapes = collections.Counter(tuple(label for _t, label in events[a:b]) for a, b in steady)
    shape, count = shapes.most_common(1)[0]
    same = [events[a:b] for a, b in steady if tuple(label for _t, label in events[a:b]) == shape]
    print(f"median of {count} round trips of the most common shape ({len(steady)} measured)")
    for k, label in enumerate(shape):
        offset = statistics.median((trip[k][0] - trip[0][0]) * 1e6 for trip in same)
        print(f"{offset:8.1f} us  {label}")
    total = statistics.median((events[b][0] - events[a][0]) * 1e6 for a, b in steady)
    print(f"{total:8.1f} us  round trip")


if __name__ == "__main__":
    main()
