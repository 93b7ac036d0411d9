"""Processes in different PID and network namespaces sharing one /dev/shm, as containers that
share an IPC namespace do: they ring each other, keep their slots, and see each other die.

Each process runs under ``unshare`` (as root) with the periodic check raised to an hour (see
``ns_worker.py``), so every round trip below was made by a ring: a ring lost, or a slot taken
from a live process, hangs the round trips and fails the test.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from asgi_ipc import IPCChannelLayer

from .helpers import Worker, doorbells, slot_table, wait_until

pytestmark = pytest.mark.timeout(180)

ROUNDS = 50
PATIENCE_EXIT = 30
NEW_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
NEW_NET_NAMESPACE = ["unshare", "--net", "--kill-child"]
CONFIG = {"channel_memory": 1024 * 1024, "group_memory": 256 * 1024}


@pytest.fixture
def layer(prefix):
    """The test's own layer: it sends, and reads the slot table; it never waits."""
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    yield layer
    asyncio.run(layer.close())


def send(layer: IPCChannelLayer, channel: str, message: dict) -> None:
    asyncio.run(layer.send(channel, message))


def play(layer, workers, ping_wrapper: list[str], pong_wrapper: list[str]) -> None:  # noqa: F811
    prefix = layer.prefix
    pong = Worker(pong_wrapper, "pong", prefix)
    workers.append(pong)
    wait_until(lambda: len(slot_table(layer)) == 1, "pong to wait")
    ping = Worker(ping_wrapper, "ping", prefix, ROUNDS)
    workers.append(ping)
    wait_until(lambda: len(slot_table(layer)) == 2, "ping to wait")
    before = slot_table(layer)
    assert len(doorbells(prefix)) == 2
    send(layer, "ping", {"start": True})
    ping.expect("done")
    assert slot_table(layer) == before, "a live process's slot was taken"
    send(layer, "ping", {"stop": True})
    send(layer, "pong", {"stop": True})
    for worker in (ping, pong):
        worker.expect("exit")
        assert worker.proc.wait(PATIENCE_EXIT) == 0
    assert slot_table(layer) == []
    assert doorbells(prefix) == []


def test_round_trips_between_pid_namespaces(layer, workers):  # noqa: F811
    play(layer, workers, NEW_PID_NAMESPACE, NEW_PID_NAMESPACE)


def test_round_trips_between_network_namespaces(layer, workers):  # noqa: F811
    play(layer, workers, [], NEW_NET_NAMESPACE)


def inner_pid(unshare_pid: int) -> int:
    """The pid (in our namespace) of the process ``unshare --fork`` started."""
    with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as children:
        (pid,) = map(int, children.read().split())
    return pid


def test_a_process_killed_in_another_pid_namespace_is_found_dead(layer, workers):  # noqa: F811
    prefix = layer.prefix
    victim = Worker(NEW_PID_NAMESPACE, "wait", prefix)
    workers.append(victim)
    ((slot, token),) = wait_until(lambda: slot_table(layer), "the victim to wait")
    assert doorbells(prefix) == [f"{token:016x}"]
    os.kill(inner_pid(victim.proc.pid), signal.SIGKILL)
    victim.proc.wait(PATIENCE_EXIT)
    # A send rings the dead doorbell: refused, and the slot byte is unlocked, so the sender
    # removes the socket and frees the slot at its next lock hold.
    send(layer, "doomed", {"too": "late"})
    assert doorbells(prefix) == []
    assert slot_table(layer) == []
    assert layer.engine().inspect()["waiting_processes"] == []
    # The message is there (taking it needs no slot); a new waiter gets a slot and a doorbell
    # of its own.
    assert asyncio.run(layer.receive("doomed")) == {"too": "late"}
    assert slot_table(layer) == []
    again = Worker(NEW_PID_NAMESPACE, "wait", prefix)
    workers.append(again)
    ((_slot, new_token),) = wait_until(lambda: slot_table(layer), "a new process to wait")
    assert new_token != token and doorbells(prefix) == [f"{new_token:016x}"]
    again.proc.kill()
    again.proc.wait(PATIENCE_EXIT)
