"""Run inside a mount namespace whose /dev/shm is a small tmpfs (see test_small_shm.py):
``python small_shm_child.py SCENARIO PREFIX``. Prints one JSON object of what happened; the
test asserts on it. Every process it starts runs in the same namespace."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time

from channels.exceptions import ChannelFull

import asgi_ipc
from asgi_ipc import GroupMemoryFull, IPCChannelLayer, SharedMemoryTooSmall
from tests.helpers import PATIENCE, MiB, cli

MESSAGE = {"type": "m", "text": "x" * 1000}


def layer_for(prefix: str, channel_memory: int) -> IPCChannelLayer:
    return IPCChannelLayer(prefix=prefix, channel_memory=channel_memory, group_memory=MiB,
                           capacity=1 << 30)


def fill_tmpfs(name: str) -> None:
    """Take every free page of /dev/shm with a file of our own."""
    fd = os.open(f"/dev/shm/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (MiB, 4096):
            while True:
                try:
                    os.write(fd, bytes(chunk))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def fill_inodes() -> list[str]:
    """Take every free inode of /dev/shm with empty files of our own: their paths."""
    taken: list[str] = []
    while True:
        path = f"/dev/shm/inode.{len(taken)}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return taken
        taken.append(path)


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def send_until_full(layer: IPCChannelLayer, limit: int) -> tuple[int, str]:
    sent = 0
    try:
        while sent < limit:
            await layer.send("c", MESSAGE)
            sent += 1
    except ChannelFull:
        return sent, "ChannelFull"
    return sent, "no error"


async def too_large(prefix: str) -> dict:
    layer = layer_for(prefix, 64 * MiB)
    try:
        await layer.send("c", MESSAGE)
        outcome = "created"
    except SharedMemoryTooSmall as exc:
        outcome = str(exc)
    await layer.close()
    return {"outcome": outcome, "left": sorted(os.listdir("/dev/shm"))}


async def fills_up(prefix: str) -> dict:
    layer = layer_for(prefix, 8 * MiB)
    for _ in range(10):
        await layer.send("c", MESSAGE)  # the store fits, and is in use
    fill_tmpfs("filler")
    report: dict = {}
    report["sent"], report["writer"] = await send_until_full(layer, 100000)
    # Another process, and this one again, after the first refusal.
    other = subprocess.run([sys.executable, __file__, "send", prefix], capture_output=True,
                           text=True, timeout=120)
    report["other"] = (other.returncode, other.stdout.strip(), other.stderr[-2000:])
    report["writer_again"] = (await send_until_full(layer, 10))[1]
    added = 0
    try:
        while added < 100000:
            await layer.group_add("g", f"member.{added:06d}")
            added += 1
        report["group_add"] = "no error"
    except GroupMemoryFull:
        report["group_add"] = "GroupMemoryFull"
    report["members"] = added
    stats = cli("stats", "--prefix", prefix, timeout=120)
    verify = cli("verify", "--prefix", prefix, timeout=120)
    report["stats"] = (stats.returncode, stats.stderr[-2000:])
    report["verify"] = (verify.returncode, verify.stdout.strip())
    report["problems"] = layer.engine().verify()
    received = 0
    for _ in range(report["sent"] + 10):
        received += await layer.receive("c") == MESSAGE
    report["received"] = received
    report["send_after_receive"] = (await send_until_full(layer, 1))[1]
    # A flush gives the heaps' pages back; once something else has taken them, the store must
    # not write to them as if they were still its own.
    await layer.flush()
    fill_tmpfs("filler2")
    report["after_flush"] = await send_until_full(layer, 100000)
    report["problems_after_flush"] = layer.engine().verify()
    await layer.close()
    asgi_ipc.unlink(prefix)
    os.unlink("/dev/shm/filler")
    os.unlink("/dev/shm/filler2")
    return report


async def receive_after_flush(prefix: str) -> dict:
    """A registration lingers on "c", whose record lies past the first page of the heap; a
    flush gives that page back to the kernel and /dev/shm fills up: the next receive on "c"
    must wait, not die of SIGBUS reading the record without the lock."""
    layer = layer_for(prefix, 8 * MiB)
    for i in range(500):  # channels and messages that push "c" past the heap's first page
        await layer.send(f"before.{i}", MESSAGE)
    waiting = asyncio.ensure_future(layer.receive("c"))
    while not layer.engine().inspect(check=False)["waiting_processes"]:
        await asyncio.sleep(0.01)  # registered on "c"
    await layer.send("c", MESSAGE)
    report: dict = {"first": await waiting == MESSAGE}
    await layer.flush()
    fill_tmpfs("filler")
    try:
        await asyncio.wait_for(layer.receive("c"), 1)
        report["second"] = "received"
    except asyncio.TimeoutError:
        report["second"] = "waited"
    report["problems"] = layer.engine().verify()
    os.unlink("/dev/shm/filler")
    await layer.send("c", MESSAGE)
    report["third"] = await layer.receive("c") == MESSAGE
    await layer.close()
    asgi_ipc.unlink(prefix)
    return report


async def no_inode_for_store(prefix: str) -> dict:
    fillers = fill_inodes()
    layer = layer_for(prefix, MiB)
    try:
        await layer.send("c", MESSAGE)
        outcome = ["created", ""]
    except Exception as exc:
        outcome = [type(exc).__name__, str(exc)]
    await layer.close()
    for path in fillers:
        os.unlink(path)
    return {"outcome": outcome, "left": sorted(os.listdir("/dev/shm"))}


def send_from_another_process(prefix: str, n: int) -> None:
    subprocess.run([sys.executable, __file__, "send_one", prefix, str(n)], check=True,
                   timeout=120)


async def no_inode_to_wait(prefix: str) -> dict:
    layer = layer_for(prefix, MiB)
    await layer.send("warm", MESSAGE)  # the store exists; nothing has waited on it yet
    assert await layer.receive("warm") == MESSAGE
    store, receiver = layer.engine(), layer.receiver()
    report: dict = {}
    fillers = fill_inodes()
    first = asyncio.ensure_future(layer.receive("c"))
    await until(lambda: store.seat is not None or first.done(), "the receive to wait")
    report["without_doorbell"] = receiver.doorbell is None
    await asyncio.to_thread(send_from_another_process, prefix, 0)
    report["first"] = await asyncio.wait_for(first, PATIENCE)
    for path in fillers:
        os.unlink(path)
    # A receive waiting again keeps the periodic check running, which binds the doorbell.
    second = asyncio.ensure_future(layer.receive("c"))
    await until(lambda: receiver.doorbell is not None, "the doorbell to be bound")
    report["bound_later"] = True
    report["wake_dir_mode"] = f"{os.stat(store.wake_dir).st_mode & 0o7777:04o}"
    report["sockets"] = len(os.listdir(store.wake_dir))
    await asyncio.to_thread(send_from_another_process, prefix, 1)
    assert await asyncio.wait_for(second, PATIENCE) == {"n": 1}
    third = asyncio.ensure_future(layer.receive("c"))
    await until(lambda: receiver.doorbell.readers, "the doorbell to be read")
    await asyncio.to_thread(send_from_another_process, prefix, 0)
    report["third"] = await asyncio.wait_for(third, PATIENCE)
    report["problems"] = store.verify()
    await layer.close()
    asgi_ipc.unlink(prefix)
    report["left"] = sorted(os.listdir("/dev/shm"))
    return report


async def send_one(prefix: str, n: str) -> dict:
    layer = layer_for(prefix, MiB)
    await layer.send("c", {"n": int(n)})
    await layer.close()
    return {}


async def send(prefix: str) -> dict:
    layer = layer_for(prefix, 8 * MiB)
    sent, outcome = await send_until_full(layer, 10)
    await layer.close()
    return {"sent": sent, "outcome": outcome}


if __name__ == "__main__":
    scenario, prefix, *args = sys.argv[1:]
    run = {
        "too_large": too_large, "fills_up": fills_up, "send": send, "send_one": send_one,
        "no_inode_for_store": no_inode_for_store, "no_inode_to_wait": no_inode_to_wait,
        "receive_after_flush": receive_after_flush,
    }[scenario]
    print(json.dumps(asyncio.run(run(prefix, *args))))
