"""Processes in different PID and network namespaces sharing one /dev/shm, as containers that
share an IPC namespace do: they ring each other, keep their slots, and see each other die; and
``asgi-ipc unlink`` run in another PID namespace sees that they use the store.

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
from asgi_ipc.observe import figures

from .helpers import Worker, cli, doorbells, shm_path, slot_table, wait_until

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


# "Elsewhere": ``asgi-ipc unlink`` run in a PID namespace of its own, where no pid of the store's
# users can be seen.


def send_once(prefix: str, channel: str, message: dict) -> None:
    """Send from a layer of this process that is closed again at once: the test itself holds
    the store open only for that long."""
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    send(layer, channel, message)
    asyncio.run(layer.close())


def test_unlink_elsewhere_is_refused_while_a_process_waits(prefix, workers):  # noqa: F811
    send_once(prefix, "created", {})
    waiter = Worker(NEW_PID_NAMESPACE, "wait", prefix)
    workers.append(waiter)
    wait_until(lambda: figures(prefix).waiting_processes, "the waiter to wait")
    for under in (NEW_PID_NAMESPACE, []):
        refused = cli("unlink", "--prefix", prefix, under=under)
        assert refused.returncode == 2, refused
        assert "open in 1 process, with receives waiting in 1 process slot" in refused.stderr
        assert os.path.exists(shm_path(prefix))
    # Its pid is shown where it can be seen, as seen from there.
    assert str(inner_pid(waiter.proc.pid)) in refused.stderr
    # The waiter still shares the store with the processes that come later.
    send_once(prefix, "doomed", {"not": "lost"})
    waiter.expect("exit")
    assert waiter.proc.wait(PATIENCE_EXIT) == 0
    removed = cli("unlink", "--prefix", prefix, under=NEW_PID_NAMESPACE)
    assert removed.returncode == 0, removed
    assert "removed the store" in removed.stdout and not os.path.exists(shm_path(prefix))


def test_unlink_elsewhere_is_refused_while_a_sender_is_attached(prefix, workers):  # noqa: F811
    sender = Worker(NEW_PID_NAMESPACE, "attach", prefix)
    workers.append(sender)
    sender.expect("attached")
    refused = cli("unlink", "--prefix", prefix, under=NEW_PID_NAMESPACE)
    assert refused.returncode == 2, refused
    assert "open in 1 process, with no receive waiting" in refused.stderr
    assert "none of them in this PID namespace" in refused.stderr
    assert os.path.exists(shm_path(prefix))
    forced = cli("unlink", "--prefix", prefix, "--force", under=NEW_PID_NAMESPACE)
    assert forced.returncode == 0, forced
    assert not os.path.exists(shm_path(prefix))
    sender.stop()
    assert sender.proc.returncode == 0
