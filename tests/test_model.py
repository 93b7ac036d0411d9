"""The layer against a reference model, driven from two processes at once.

A Hypothesis state machine runs in the test process; each operation is carried out either on the
test process's own layer or, through a command pipe, on the layer of a child process attached to
the same store. The model is a dict of deques (channels) and a dict of dicts (group -> channel ->
time of the last group_add), with the capacities, group_send's skipping of full members, flush,
and expiry. Time is a fake clock: the layers' ``clock``, which every operation reads, is
replaced in both processes by the clock the machine advances, so that expiry is exact and free.

After every step the store must walk clean. Targeted cases with the same clock follow: expiring
far more messages or memberships than one operation usually touches.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import asgi_ipc
from asgi_ipc import IPCChannelLayer

from . import workers
from .helpers import ENGINES, MiB

pytestmark = pytest.mark.timeout(300)

KiB = 1024
EXPIRY_MS, GROUP_EXPIRY_MS = 10_000, 30_000
CONFIG = {
    "channel_memory": 256 * KiB,
    "group_memory": 64 * KiB,
    "expiry": EXPIRY_MS / 1000,
    "group_expiry": GROUP_EXPIRY_MS / 1000,
    "capacity": 3,
    "channel_capacity": {"m.tiny*": 1},
}
CHANNELS = ["m.a", "m.b", "m.c", "m.tiny"]
GROUPS = ["g1", "g2"]
EMPTY_WAIT = 0.05  # how long a receive must find nothing where the model holds nothing
START_MS = 1_700_000_000_000

CLOCK = [START_MS]  # what the layers' clock returns in this process


def capacity(channel: str) -> int:
    return 1 if channel.startswith("m.tiny") else CONFIG["capacity"]


processes = st.sampled_from(["here", "child"])
channels = st.sampled_from(CHANNELS)
groups = st.sampled_from(GROUPS)


class TwoProcesses(RuleBasedStateMachine):
    """Set up by the test: ``conn`` to the child's model_server, ``base`` prefix."""

    conn = None
    base = ""
    numbers = itertools.count()

    def __init__(self):
        super().__init__()
        CLOCK[0] = START_MS
        self.prefix = f"{self.base}.{next(self.numbers)}"
        self.loop = asyncio.new_event_loop()
        self.layer = IPCChannelLayer(prefix=self.prefix, **CONFIG)
        self.layer.clock = lambda: CLOCK[0]
        self.store = self.layer.engine()
        self.call_child("open", self.prefix, CONFIG)
        self.queues = {c: deque() for c in CHANNELS}  # (message number, expires at)
        self.members = {g: {} for g in GROUPS}  # channel -> time of its last group_add
        self.sent = itertools.count()

    def teardown(self):
        try:
            self.call_child("close")
            self.loop.run_until_complete(self.layer.close())
            self.loop.close()
        finally:
            asgi_ipc.unlink(self.prefix)

    # --- running an operation in either process --------------------------------------------

    def call_child(self, *command):
        self.conn.send(command)
        assert self.conn.poll(10), f"the child did not answer {command}"
        return self.conn.recv()

    def run(self, where, method, *args, timeout=None):
        if where == "child":
            return self.call_child("op", CLOCK[0], method, args, timeout)
        coro = getattr(self.layer, method)(*args)
        try:
            if timeout is not None:
                coro = asyncio.wait_for(coro, timeout)
            return ("ok", self.loop.run_until_complete(coro))
        except asyncio.TimeoutError:
            return ("timeout", None)
        except Exception as exc:
            return ("error", f"{type(exc).__name__}: {exc}")

    # --- the model -------------------------------------------------------------------------

    def live(self, channel: str) -> deque:
        queue = self.queues[channel]
        while queue and queue[0][1] <= CLOCK[0]:
            queue.popleft()  # expired: no receive may return it
        return queue

    def live_members(self, group: str) -> list[str]:
        oldest = CLOCK[0] - GROUP_EXPIRY_MS
        members = self.members[group]
        for channel in [c for c, added in members.items() if added < oldest]:
            del members[channel]
        return sorted(members, key=members.get)

    # --- rules -----------------------------------------------------------------------------

    @rule(where=processes, channel=channels)
    def send(self, where, channel):
        number = next(self.sent)
        result = self.run(where, "send", channel, {"n": number})
        if len(self.live(channel)) >= capacity(channel):
            assert result[0] == "error" and result[1].startswith("ChannelFull"), result
        else:
            assert result == ("ok", None)
            self.queues[channel].append((number, CLOCK[0] + EXPIRY_MS))

    @rule(where=processes, channel=channels)
    def receive(self, where, channel):
        queue = self.live(channel)
        if queue:
            # A safety net only: the message is there, the receive must not wait at all.
            assert self.run(where, "receive", channel, timeout=5) == (
                "ok", {"n": queue.popleft()[0]})
        else:
            assert self.run(where, "receive", channel, timeout=EMPTY_WAIT) == ("timeout", None)

    @rule(waiting=processes, channel=channels)
    def receive_woken_by_the_other_process(self, waiting, channel):
        """A receive waits on an empty channel; the other process sends; the receive returns
        the message."""
        if self.live(channel):
            return self.receive(waiting, channel)
        number = next(self.sent)
        sender = "child" if waiting == "here" else "here"
        if waiting == "child":
            assert self.call_child("begin_receive", CLOCK[0], channel) == ("ok", False)
        else:
            pending = self.loop.create_task(self.layer.receive(channel))
            self.loop.run_until_complete(asyncio.sleep(0.01))
            assert not pending.done()
        assert self.run(sender, "send", channel, {"n": number}) == ("ok", None)
        if waiting == "child":
            got = self.call_child("end_receive", CLOCK[0], 5)
        else:
            got = ("ok", self.loop.run_until_complete(asyncio.wait_for(pending, 5)))
        assert got == ("ok", {"n": number})

    @rule(where=processes, group=groups, channel=channels)
    def group_add(self, where, group, channel):
        assert self.run(where, "group_add", group, channel) == ("ok", None)
        self.members[group][channel] = CLOCK[0]

    @rule(where=processes, group=groups, channel=channels)
    def group_discard(self, where, group, channel):
        assert self.run(where, "group_discard", group, channel) == ("ok", None)
        self.members[group].pop(channel, None)

    @rule(where=processes, group=groups)
    def group_send(self, where, group):
        number = next(self.sent)
        assert self.run(where, "group_send", group, {"n": number}) == ("ok", None)
        for channel in self.live_members(group):
            if len(self.live(channel)) < capacity(channel):  # full members are skipped
                self.queues[channel].append((number, CLOCK[0] + EXPIRY_MS))

    @rule(where=processes, channel=channels)
    def drain(self, where, channel):
        """Receive until the channel is empty: checks a whole queue's order and expiry."""
        while self.live(channel):
            self.receive(where, channel)
        self.receive(where, channel)

    @rule(where=processes, group=groups, channel=channels, late=st.sampled_from([0, 1]))
    def membership_at_its_expiry(self, where, group, channel, late):
        """A group_send exactly when a membership expires, or a millisecond after."""
        self.group_add(where, group, channel)
        self.advance_clock(GROUP_EXPIRY_MS + late)
        self.group_send(where, group)
        self.drain(where, channel)

    # A flush wipes out everything the other rules build up: one draw in ten flushes.
    @rule(where=processes, really=st.sampled_from([False] * 9 + [True]))
    def flush(self, where, really):
        if not really:
            return
        assert self.run(where, "flush") == ("ok", None)
        for queue in self.queues.values():
            queue.clear()
        for members in self.members.values():
            members.clear()

    # Both sides of both expiry boundaries.
    @rule(ms=st.sampled_from(
        [1, 1_000, EXPIRY_MS - 1, EXPIRY_MS, GROUP_EXPIRY_MS, GROUP_EXPIRY_MS + 1]
    ))
    def advance_clock(self, ms):
        CLOCK[0] += ms

    @invariant()
    def store_walks_clean(self):
        assert self.store.verify() == []


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_agree_with_the_model(prefix, engine):
    """This process and a child running ``engine`` (the other one than this process's makes a
    pair of a compiled and a pure-Python engine) agree with the model."""
    child, parent_end = workers.start_piped(workers.model_server, engine=engine)
    TwoProcesses.conn, TwoProcesses.base = parent_end, prefix
    try:
        run_state_machine_as_test(
            TwoProcesses,
            settings=settings(
                max_examples=50,
                stateful_step_count=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        parent_end.send(("exit",))
        assert parent_end.poll(10) and parent_end.recv() == ("ok", None)
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
        # An example that failed before its teardown leaves its store behind.
        for path in glob.glob(f"/dev/shm/asgi_ipc.{prefix}.*"):
            asgi_ipc.unlink(path.rsplit("asgi_ipc.", 1)[1])


# --- expiring a lot at once ----------------------------------------------------------------
# Far more expired entries than one operation's undo journal could hold entries for.

MANY = 12_000


@pytest.mark.parametrize("operation", ["send", "receive"])
async def test_a_deep_channel_whose_messages_all_expired_still_works(prefix, operation):
    CLOCK[0] = START_MS
    layer = IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, capacity=MANY + 1,
                            expiry=EXPIRY_MS / 1000)
    layer.clock = lambda: CLOCK[0]
    try:
        for n in range(MANY):
            await layer.send("deep", {"n": n})
        CLOCK[0] += EXPIRY_MS
        if operation == "send":
            await layer.send("deep", {"n": "fresh"})
            assert await asyncio.wait_for(layer.receive("deep"), 2) == {"n": "fresh"}
        else:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive("deep"), EMPTY_WAIT)
        assert layer.engine().verify() == []
    finally:
        await layer.close()


async def test_a_large_group_whose_memberships_all_expired_still_works(prefix):
    CLOCK[0] = START_MS
    layer = IPCChannelLayer(prefix=prefix, group_memory=8 * MiB,
                            group_expiry=GROUP_EXPIRY_MS / 1000)
    layer.clock = lambda: CLOCK[0]
    try:
        for n in range(MANY):
            await layer.group_add("crowd", f"member.{n}")
        CLOCK[0] += GROUP_EXPIRY_MS + 1
        await layer.group_add("crowd", "member.new")
        await layer.group_send("crowd", {"to": "the living"})
        assert await asyncio.wait_for(layer.receive("member.new"), 2) == {"to": "the living"}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive("member.0"), EMPTY_WAIT)
        assert layer.engine().verify() == []
    finally:
        await layer.close()
