"""The cross-process halves of the workloads: coroutines that each run in a worker process of
``pool.py`` as ``role(conn, spec, params)`` and return what they counted and when.

Every role counts what it received intact and in order, so that the main process can compare
it with what was sent: a speed figure is only worth reading when the two are equal. A receiver
gives up (and says it ``stalled``) when nothing arrived for ``stall_seconds``, so a lost wake-up
shows as a count short rather than a hang. A receiver says it is ready only once its
subscriptions are live at the server (``layers.subscribed``), as the pub/sub layers lose what is
published before.

The ping-pong is timed the same way over a layer and over the floor (two bare asyncio
processes bouncing Unix datagrams): ``ping_loop`` and ``echo_loop`` take the transport as two
coroutine functions, so only the transport differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .layers import (
    DATA,
    SEQ_BASE,
    STOP,
    clock,
    guarded,
    opened,
    padded_body,
    send_retrying,
    subscribed,
)
from .pool import handshake

# --- ping-pong ---------------------------------------------------------------------------------


async def ping_loop(
    send: Callable[[int], Awaitable[None]],
    receive: Callable[[], Awaitable[int | None]],
    params: dict,
) -> dict:
    """Send ``seq`` and wait for its echo, ``warmup`` rounds untimed then timed rounds until
    ``rounds`` or ``seconds``; ``receive`` returns the sequence number that came back."""
    warmup, rounds = params["warmup"], params["rounds"]
    latencies: list[float] = []
    state = {"replies": 0}

    async def run() -> None:
        deadline = None
        for i in range(warmup + rounds):
            if i == warmup:
                deadline = clock() + params["seconds"]
            elif deadline is not None and i >= warmup + 100 and clock() > deadline:
                break
            started = time.perf_counter()
            await send(SEQ_BASE + i)
            seq = await receive()
            elapsed = time.perf_counter() - started
            if seq == SEQ_BASE + i:
                state["replies"] += 1
            if i >= warmup:
                latencies.append(elapsed)

    finished = await guarded(
        run(), lambda: state["replies"] + len(latencies), params["stall_seconds"]
    )
    rounds_done = len(latencies)
    return {
        "rounds": rounds_done,
        "replies": state["replies"],
        "sent": warmup + rounds_done,
        "stalled": not finished,
        "latencies": latencies,
    }


async def echo_loop(bounce: Callable[[], Awaitable[bool]], params: dict) -> dict:
    """Call ``bounce`` (receive one message, send it back; False on the stop) until the stop."""
    state = {"echoed": 0}

    async def run() -> None:
        while await bounce():
            state["echoed"] += 1

    finished = await guarded(run(), lambda: state["echoed"], params["stall_seconds"])
    return {"echoed": state["echoed"], "stalled": not finished}


async def role_ping(conn: Any, spec: dict, params: dict) -> dict:
    async with opened(spec) as layer:
        inbox = await layer.new_channel()
        await subscribed(layer)
        peers = handshake(conn, {"inbox": inbox})
        target = peers[params["peer"]]["inbox"]
        body = padded_body(params["size"])

        async def send(seq: int) -> None:
            await layer.send(target, {"type": DATA, "seq": seq, "body": body})

        async def receive() -> int | None:
            return (await layer.receive(inbox)).get("seq")

        result = await ping_loop(send, receive, params)
        await layer.send(target, {"type": STOP})
    return result


async def role_echo(conn: Any, spec: dict, params: dict) -> dict:
    async with opened(spec) as layer:
        inbox = await layer.new_channel()
        await subscribed(layer)
        peers = handshake(conn, {"inbox": inbox})
        target = peers[params["peer"]]["inbox"]

        async def bounce() -> bool:
            message = await layer.receive(inbox)
            if message["type"] == STOP:
                return False
            await layer.send(target, message)
            return True

        return await echo_loop(bounce, params)


# The floor: what asgi_ipc's wake-up path costs at the least, with no store. Each process binds
# a Unix datagram socket at a path (as the layer's doorbells are), sends with ``sendto`` and
# waits in its event loop for the reply (``loop.sock_recv``: a reader callback resolving a
# future, as a doorbell does). A datagram is the 8-byte sequence number padded to ``size``; the
# stop is the sequence number 0.
_SEQ = struct.Struct("!Q")


@contextlib.contextmanager
def _datagram_socket(path: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind(path)
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def role_floor_ping(conn: Any, spec: dict, params: dict) -> dict:
    with _datagram_socket(os.path.join(spec["dir"], "ping")) as sock:
        peers = handshake(conn, {"address": sock.getsockname()})
        target = peers[params["peer"]]["address"]
        loop = asyncio.get_running_loop()
        padding = b"x" * max(params["size"] - _SEQ.size, 0)

        async def send(seq: int) -> None:
            sock.sendto(_SEQ.pack(seq) + padding, target)

        async def receive() -> int | None:
            data = await loop.sock_recv(sock, 65536)
            return _SEQ.unpack_from(data)[0] if len(data) >= _SEQ.size else None

        result = await ping_loop(send, receive, params)
        sock.sendto(_SEQ.pack(0), target)
    return result


async def role_floor_echo(conn: Any, spec: dict, params: dict) -> dict:
    with _datagram_socket(os.path.join(spec["dir"], "echo")) as sock:
        peers = handshake(conn, {"address": sock.getsockname()})
        target = peers[params["peer"]]["address"]
        loop = asyncio.get_running_loop()

        async def bounce() -> bool:
            data = await loop.sock_recv(sock, 65536)
            if data[: _SEQ.size] == _SEQ.pack(0):
                return False
            sock.sendto(data, target)
            return True

        return await echo_loop(bounce, params)


# --- one-way and fan-out -------------------------------------------------------------------------


async def role_producer(conn: Any, spec: dict, params: dict) -> dict:
    async with opened(spec) as layer:
        peers = handshake(conn, {})
        targets = [peers[i]["inbox"] for i in params["consumers"]]
        me, limit = params["index"], params["limit"]
        body = padded_body(params["size"], producer=me)
        sent = [0] * len(targets)
        retries = 0
        start = clock()
        deadline = start + params["seconds"]
        total = 0
        # Spread over the consumers so that every consumer hears from every producer.
        while total < limit and (total % 64 or clock() < deadline):
            t = (total + me) % len(targets)
            retries += await send_retrying(
                layer,
                targets[t],
                {"type": DATA, "seq": SEQ_BASE + sent[t], "producer": me, "body": body},
            )
            sent[t] += 1
            total += 1
        end = clock()
        for t, target in enumerate(targets):
            retries += await send_retrying(
                layer, target, {"type": STOP, "producer": me, "sent": sent[t]}
            )
    return {"start": start, "end": end, "sent": total, "retries": retries}


async def role_consumer(conn: Any, spec: dict, params: dict) -> dict:
    async with opened(spec) as layer:
        inbox = await layer.new_channel()
        await subscribed(layer)
        handshake(conn, {"inbox": inbox})
        producers = params["producers"]
        received = [0] * producers
        announced: dict[int, int] = {}
        state = {"disorder": 0}

        async def run() -> None:
            while len(announced) < producers:
                message = await layer.receive(inbox)
                p = message["producer"]
                if message["type"] == STOP:
                    announced[p] = message["sent"]
                    continue
                if message["seq"] - SEQ_BASE != received[p]:
                    state["disorder"] += 1
                received[p] += 1

        finished = await guarded(
            run(), lambda: sum(received) + len(announced), params["stall_seconds"]
        )
        end = clock()
    in_order = sum(received) - state["disorder"]
    return {
        "received": in_order,
        "announced": sum(announced.values()),
        "end": end,
        "stalled": not finished,
    }


async def role_member(conn: Any, spec: dict, params: dict) -> dict:
    """Some members of a group, each channel drained by its own task, as consumers do."""
    async with opened(spec) as layer:
        channels = [await layer.new_channel() for _ in range(params["members"])]
        for channel in channels:
            await layer.group_add(params["group"], channel)
        await subscribed(layer)
        handshake(conn, {"members": len(channels)})
        counts = [0] * len(channels)
        stopped = [False] * len(channels)
        state = {"disorder": 0, "announced": 0}

        async def drain(i: int, channel: str) -> None:
            while True:
                message = await layer.receive(channel)
                if message["type"] == STOP:
                    stopped[i] = True
                    state["announced"] += message["sent"]
                    return
                if message["seq"] - SEQ_BASE != counts[i]:
                    state["disorder"] += 1
                counts[i] += 1

        work = asyncio.gather(*(drain(i, c) for i, c in enumerate(channels)))
        finished = await guarded(
            work, lambda: sum(counts) + state["announced"], params["stall_seconds"]
        )
        end = clock()
        for channel in channels:
            await layer.group_discard(params["group"], channel)
    return {
        "received": sum(counts) - state["disorder"],
        "announced": state["announced"],
        "members": len(channels),
        "waiting": stopped.count(False),
        "end": end,
        "stalled": not finished,
    }


async def role_group_sender(conn: Any, spec: dict, params: dict) -> dict:
    async with opened(spec) as layer:
        handshake(conn, {})
        body = padded_body(params["size"])
        group, limit = params["group"], params["limit"]
        start = clock()
        deadline = start + params["seconds"]
        sent = 0
        while sent < limit and (sent < 2 or clock() < deadline):
            await layer.group_send(group, {"type": DATA, "seq": SEQ_BASE + sent, "body": body})
            sent += 1
        end = clock()
        await layer.group_send(group, {"type": STOP, "sent": sent})
    return {"start": start, "end": end, "sent": sent}



# --- reaping (not a pool role: half of these processes are killed) -----------------------------


def reap_member(conn: Any, spec: dict, params: dict) -> None:
    """A process of ``members`` consumers for the ``reap`` workload: each channel made with
    new_channel(), added to every group of ``groups`` and drained by a task of its own. Says
    ``("ready", None)`` once every receive waits, then runs until it is killed, or until told
    to stop: it then answers with the messages its consumers received."""

    async def run() -> None:
        async with opened(spec) as layer:
            channels = [await layer.new_channel() for _ in range(params["members"])]
            for channel in channels:
                for group in params["groups"]:
                    await layer.group_add(group, channel)
            received = [0]

            async def drain(channel: str) -> None:
                while True:
                    await layer.receive(channel)
                    received[0] += 1

            drains = [asyncio.ensure_future(drain(channel)) for channel in channels]
            await asyncio.sleep(0.2)  # every drain waits in receive()
            conn.send(("ready", None))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
        conn.send(("done", received[0]))

    asyncio.run(run())
