"""The channels of a process that is gone are reaped: new_channel() makes the process their
owner, and once it is killed or closes its layer, their memberships in every group and the
messages queued on them are removed by whichever process notices, in bounded lock holds; a
reaper killed at any write leaves a sound store, and the reaping resumes. The channels of a
process that lives, however slow, and channels that belong to no process are left alone.

Nothing here is timed: every wait has a generous deadline only to turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest

from asgi_ipc import IPCChannelLayer

from . import workers
from .helpers import ENGINES, PATIENCE, MiB, slot_table, wait_until

pytestmark = pytest.mark.timeout(600)

# A capacity of 2: the two messages queued on every channel before the kill fill it, so a
# group_send that still counted the dead members would log them as over capacity.
CONFIG = {"channel_memory": 8 * MiB, "group_memory": 4 * MiB, "capacity": 2}
GROUPS = [f"reap.g{n}" for n in range(5)]
VOLATILE = ("lock_holder", "waiting_processes", "problems", "expired_bytes", "now")


class Owner:
    """A child process that made ``count`` channels, added each to every group of ``groups``,
    and receives on them (``workers.own_and_consume``)."""

    def __init__(self, children: list, prefix: str, count: int, groups: list[str]) -> None:
        self.process, self.conn = workers.start_piped(
            workers.own_and_consume, prefix, CONFIG, count, groups
        )
        children.append(self.process)
        self.pid = 0
        self.names: list[str] = []

    def ready(self) -> None:
        assert self.conn.poll(PATIENCE), "an owner never got ready"
        _ready, self.pid, self.names = self.conn.recv()

    def ask(self, command: str):
        self.conn.send(command)
        assert self.conn.poll(PATIENCE), f"an owner did not answer {command!r}"
        return self.conn.recv()

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.join(PATIENCE)


def _owners(children, prefix, processes, count, groups=GROUPS) -> list[Owner]:
    owners = [Owner(children, prefix, count, groups) for _ in range(processes)]
    for owner in owners:
        owner.ready()
    return owners


def _reap_all(store) -> None:
    """Look for dead owners and reap what they owned, as a periodic check does."""
    store.look_for_dead()
    for _ in range(1000):  # far more holds than any reaping here takes
        if not store.reaping():
            return
        store.reap()
    raise AssertionError("reaping makes no progress")


@pytest.mark.parametrize("leave", ["SIGKILL", "close"])
def test_the_channels_of_processes_gone_are_reaped(prefix, children, caplog, leave):
    """1000 consumers in 10 processes, each channel in 5 groups; 5 of the processes are killed
    (or close their layer): their 500 channels, 2500 memberships and every message queued on
    them go, the next group_send to each group reaches the 500 live members and logs nothing
    about capacity, and the store is sound."""
    processes, per_process = 10, 100
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    owners = _owners(children, prefix, processes, per_process)
    gone, live = owners[: processes // 2], owners[processes // 2 :]
    everyone = processes * per_process

    # Every channel gets two messages, its capacity, while nobody takes any.
    for owner in owners:
        owner.signal(signal.SIGSTOP)
    for n in range(2):
        run(layer.group_send(GROUPS[0], {"before": n}))
    before = store.inspect()
    assert (before["owned_channels"], before["memberships"], before["messages"]) == (
        everyone, everyone * len(GROUPS), 2 * everyone
    )

    taken_by_gone = 0
    if leave == "SIGKILL":
        for owner in gone:
            owner.kill()
        for owner in live:
            owner.signal(signal.SIGCONT)
    else:
        for owner in owners:
            owner.signal(signal.SIGCONT)
        for owner in gone:
            closed, counts = owner.ask("close")
            assert closed == "closed"
            taken_by_gone += sum(counts.values())
        # close() reaps what its process owned before it returns.
        report = store.inspect()
        assert (report["channels_to_reap"], report["owned_channels"]) == (0, everyone // 2)

    def reaped():
        report = store.inspect()
        done = (report["channels_to_reap"], report["owned_channels"], report["memberships"],
                report["messages"]) == (0, everyone // 2, everyone // 2 * len(GROUPS), 0)
        return done and report

    report = wait_until(reaped, "the channels of the processes gone to be reaped")
    assert report["problems"] == []
    counters = report["counters"]
    assert (counters["reaped_channels"], counters["reaped_memberships"],
            counters["reaped_messages"]) == (
        everyone // 2, everyone // 2 * len(GROUPS), everyone - taken_by_gone
    )
    assert report["group_memory"]["used"] < before["group_memory"]["used"]

    caplog.set_level(logging.INFO, logger="asgi_ipc.layer")
    delivered = counters["delivered"]
    for number, group in enumerate(GROUPS, 3):
        run(layer.group_send(group, {"after": group}))
        # Taken by every live consumer before the next, so none is ever at capacity.
        wait_until(lambda n=number: all(
            count == n for owner in live for count in owner.ask("counts").values()
        ), f"every live consumer to receive its message of {group}")
    assert store.inspect()["counters"]["delivered"] - delivered == len(GROUPS) * everyone // 2
    assert [r.getMessage() for r in caplog.records if "over capacity" in r.getMessage()] == []
    assert store.verify() == []
    run(layer.close())
    loop.close()


def test_a_stopped_process_keeps_its_channels(prefix, children):
    """A process stopped for 5 s holds its slot byte all along: it is not gone, whatever the
    periodic checks, rings and reapers of other processes look at meanwhile."""
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    slow, other = _owners(children, prefix, 2, 20)
    before = store.inspect()
    slow.signal(signal.SIGSTOP)
    try:
        run(layer.group_send(GROUPS[0], {"while": "stopped"}))
        time.sleep(5)  # the other process's checks look for dead owners once a second
        _reap_all(store)
        during = store.inspect()
    finally:
        slow.signal(signal.SIGCONT)
    assert (during["owned_channels"], during["memberships"], during["channels_to_reap"]) == (
        before["owned_channels"], before["memberships"], 0
    ) == (40, 40 * len(GROUPS), 0)
    assert [during["counters"][f"reaped_{what}"] for what in ("channels", "memberships",
                                                              "messages")] == [0, 0, 0]
    for owner in (slow, other):
        wait_until(lambda o=owner: set(o.ask("counts").values()) == {1},
                   "every consumer to receive the message sent while one was stopped")
    assert store.verify() == []
    run(layer.close())
    loop.close()


def test_channels_that_no_process_owns_are_left_alone(prefix, children):
    """A plain channel, and a process-specific one that no process made or waited on, outlive
    the process that added them to a group: any process may consume them later."""
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    (owner,) = _owners(children, prefix, 1, 2, groups=["g"])
    owner.signal(signal.SIGSTOP)
    for channel in ("plain", "specific.nobody!1"):
        run(layer.group_add("g", channel))
    run(layer.group_send("g", {"to": "all"}))
    owner.kill()
    _reap_all(store)
    report = store.inspect()
    assert (report["memberships"], report["messages"], report["owned_channels"]) == (2, 2, 0)
    assert report["counters"]["reaped_channels"] == 2
    for channel in ("plain", "specific.nobody!1"):
        assert run(asyncio.wait_for(layer.receive(channel), PATIENCE)) == {"to": "all"}
    assert store.verify() == []
    run(layer.close())
    loop.close()


def test_a_slot_taken_again_does_not_inherit_the_channels_of_its_dead_process(
    prefix, children
):
    """A process takes the slot of one that died before anyone noticed: the dead one's channels
    are reaped, the new one's are its own."""
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()
    (dead,) = _owners(children, prefix, 1, 3, groups=["g"])
    ((slot, _token),) = slot_table(layer)
    dead.kill()
    (heir,) = _owners(children, prefix, 1, 3, groups=["g"])
    assert [s for s, _token in slot_table(layer)] == [slot]
    _reap_all(store)
    report = store.inspect()
    assert (report["owned_channels"], report["memberships"]) == (3, 3)
    assert report["counters"]["reaped_memberships"] == 3
    assert store.verify() == []
    asyncio.run(layer.close())


def test_a_consumer_idle_for_an_hour_keeps_its_channels_until_it_closes(prefix):
    """Ownership has nothing to do with time: channels made and never received on, in groups,
    stay while their process lives, through sends and whole sweeps an hour later; they go
    when it closes. A group_discard takes its membership off the channel's list."""
    clock = [1_000_000_000_000]
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    owner = IPCChannelLayer(prefix=prefix, **CONFIG)
    owner.clock = lambda: clock[0]
    other = IPCChannelLayer(prefix=prefix, **CONFIG)
    other.clock = owner.clock
    store = other.engine()
    names = [run(owner.new_channel()) for _ in range(3)]
    for name in names:
        for group in ("g", "h"):
            run(owner.group_add(group, name))
    run(owner.group_discard("h", names[1]))
    assert store.verify() == []
    clock[0] += 3600 * 1000
    for n in range(100):
        run(other.send(f"busy{n}", {"n": n}))
    store.locked(store.queues.sweep, clock[0], store.queues.index.mask + 1, 10**6)
    _reap_all(store)
    report = store.inspect()
    assert (report["owned_channels"], report["memberships"]) == (3, 5)
    assert report["counters"]["reaped_channels"] == 0
    run(owner.close())
    report = store.inspect()
    assert (report["owned_channels"], report["memberships"], report["problems"]) == (0, 0, [])
    assert report["counters"]["reaped_memberships"] == 5
    run(other.close())
    loop.close()


# --- a reaper killed at every journaled write -------------------------------------------------


def _dead_owner(children, prefix, layer) -> None:
    """A process that owned two channels, each in two groups with a message of a group_send
    (shared with a bystander) and one of its own queued, died; nobody noticed yet."""
    run = asyncio.run
    (owner,) = _owners(children, prefix, 1, 2, groups=["g", "h"])
    owner.signal(signal.SIGSTOP)
    run(layer.group_add("g", "bystander"))
    run(layer.group_send("g", {"to": "g"}))
    run(layer.send(owner.names[0], {"to": "one"}))
    owner.kill()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_reaper_killed_at_every_journaled_write(prefix, children, engine):
    """A child reaping the channels of a dead process is stopped after each journaled write
    and killed: the store walks clean, and the next reaper finishes the work as if nothing had
    happened. Each cut starts from the same store, copied back byte for byte."""
    # Its messages must outlive the test however slow the machine: at the default expiry, a
    # loaded run took past a minute, and the bystander's message expired before the last receive.
    layer = IPCChannelLayer(prefix=prefix, **CONFIG, expiry=24 * 3600)
    store = layer.engine()
    _dead_owner(children, prefix, layer)
    mapping = store.segment.mm
    pristine = store.locked(bytes, mapping)

    def restore() -> None:
        mapping[:] = pristine

    def reap_in_child(stall_at: int) -> tuple[str, int]:
        store.locked(restore)
        child, conn = workers.start_piped(
            workers.reap_after_journaled_writes, prefix, CONFIG, stall_at, engine=engine
        )
        children.append(child)
        assert conn.poll(PATIENCE), "the reaper neither stalled nor finished"
        return child, conn.recv()

    def figures() -> dict:
        report = store.inspect()
        assert report["problems"] == []
        return {k: v for k, v in report.items() if k not in VOLATILE}

    child, (state, writes) = reap_in_child(10**9)
    child.join(PATIENCE)
    assert state == "done"
    reaped = figures()
    assert (reaped["owned_channels"], reaped["memberships"], reaped["messages"]) == (0, 1, 1)
    assert [reaped["counters"][f"reaped_{what}"] for what in ("channels", "memberships",
                                                              "messages")] == [2, 4, 3]
    for cut in range(1, writes + 1):
        child, (state, so_far) = reap_in_child(cut)
        where = f"{engine}: reaper killed after journaled write {cut} of {writes}"
        assert (state, so_far) == ("stalled", cut), where
        assert store.segment.lock_holder() == child.pid, where
        child.kill()
        child.join(PATIENCE)
        assert store.verify() == [], where
        _reap_all(store)
        assert figures() == reaped, where
    assert asyncio.run(asyncio.wait_for(layer.receive("bystander"), PATIENCE)) == {"to": "g"}
    asyncio.run(layer.close())
