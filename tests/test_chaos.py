"""Processes killed with SIGKILL: at random moments while they send, receive and change group
memberships, and at chosen points in the middle of a write while they hold the store lock.

What must hold whatever the moment of the kill: the store walks clean, an acknowledged message
is received exactly once (a receiver killed between taking a message and logging it can lose
that one message, nothing else), a cut-off operation has no effect at all, a cut-off flush is
finished by the next process, and the next operation of another process does not wait for
anything (a second at most, which is generous: recovery takes microseconds).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter

import pytest

from asgi_ipc import IPCChannelLayer

from . import workers
from .helpers import ENGINES, MiB

pytestmark = pytest.mark.timeout(180)

ctx = workers.context()
NEXT_OPERATION_BOUND = 1.0  # seconds from a kill to the end of another process's operation
VOLATILE = ("lock_holder", "waiting_processes", "epoch", "problems", "expired_bytes", "now")


def _kill(child) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)


def _read_log(path: str) -> list[str]:
    """Whole lines only: a kill may cut off the last one mid-line."""
    try:
        with open(path) as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return data.split("\n")[:-1]


# --- random kills --------------------------------------------------------------------------

RECEIVE_CHANNELS = ["chaos.r0", "chaos.r1"]
GROUP = "chaos.all"
KILLS = 100


class Incarnation:
    """One process started for a slot; its replacement after a kill is another incarnation."""

    def __init__(self, slot: tuple[str, int], number: int, log: str, channel: str | None):
        self.slot, self.number, self.log, self.channel = slot, number, log, channel
        self.process = None

    @property
    def role(self) -> str:
        return self.slot[0]

    def ready(self) -> bool:
        return os.path.exists(self.log) and os.path.getsize(self.log) > 0


def _start(slot, number, prefix, tmp_path, children) -> Incarnation:
    role, index = slot
    log = str(tmp_path / f"{role}.{index}.{number}")
    channel = RECEIVE_CHANNELS[index % 2] if role == "recv" else None
    target, args = {
        # Incarnation numbers are unique, so they serve as sender ids.
        "send": (workers.chaos_sender, (prefix, number, RECEIVE_CHANNELS, log)),
        "gsend": (workers.chaos_group_sender, (prefix, number, GROUP, log)),
        "recv": (workers.chaos_receiver, (prefix, channel, log)),
        "churn": (workers.chaos_churner, (prefix, index, log)),
    }[role]
    incarnation = Incarnation(slot, number, log, channel)
    incarnation.process = ctx.Process(target=target, args=args, daemon=True)
    incarnation.process.start()
    children.append(incarnation.process)
    return incarnation


def _expected_and_extra(incarnations):
    """Acknowledged deliveries (kind, sender, seq, channel), and the one delivery per sender
    that may have happened without an acknowledgement: the send its kill cut off."""
    acked, maybe = set(), set()
    for inc in incarnations:
        if inc.role not in ("send", "gsend"):
            continue
        lines = [line for line in _read_log(inc.log) if line != "ready"]
        seqs = [int(line.split()[0]) for line in lines]
        assert seqs == list(range(len(seqs))), f"{inc.log}: acknowledgements out of order"
        if inc.role == "send":
            for line in lines:
                seq, channel = line.split()
                acked.add(("s", inc.number, int(seq), channel))
            cut = len(seqs)
            maybe.add(("s", inc.number, cut, RECEIVE_CHANNELS[cut % 2]))
        elif inc.role == "gsend":
            for seq in [*seqs, len(seqs)]:
                for channel in RECEIVE_CHANNELS:
                    (acked if seq < len(seqs) else maybe).add(("g", inc.number, seq, channel))
    return acked, maybe


def _possible_memberships(incarnations, slot: int):
    """For each (group, channel) of the churner slot, the memberships its log allows at the end:
    what the last acknowledged call left, or either state if a kill cut that call off."""
    groups, channels = workers.churn_keys(slot)
    possible = {(g, c): {False} for g in groups for c in channels}
    for inc in incarnations:
        if inc.slot != ("churn", slot):
            continue
        lines = [line for line in _read_log(inc.log) if line != "ready"]
        for k, line in enumerate(lines):
            words = line.split()
            if words[0] != "try" or words[1] == "send":
                continue
            key, now = (words[2], words[3]), words[1] == "add"
            done = k + 1 < len(lines) and lines[k + 1] == "ok"
            possible[key] = {now} if done else possible[key] | {now}
            if not done:
                assert k == len(lines) - 1, f"{inc.log}: a call neither returned nor was killed"
    return possible


def _queued(store, channels) -> int:
    return sum(n for n, name, _waiting in store.inspect()["deepest"] if name in channels)


async def _drain(layer, channel: str, quiet: float = 0.05) -> list[dict]:
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(layer.receive(channel), quiet))
        except asyncio.TimeoutError:
            return got


def test_random_kills_lose_nothing_acknowledged(prefix, tmp_path, children):
    rng = random.Random()
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    layer = IPCChannelLayer(prefix=prefix, **workers.CHAOS_CONFIG)
    store = layer.engine()
    for channel in RECEIVE_CHANNELS:
        run(layer.group_add(GROUP, channel))
    slots = [("send", 0), ("send", 1), ("gsend", 0), ("churn", 0)] + [("recv", i) for i in range(4)]
    numbers = iter(range(1, 10**6))
    incarnations: list[Incarnation] = []
    current: dict = {}
    for slot in slots:
        current[slot] = _start(slot, next(numbers), prefix, tmp_path, children)
        incarnations.append(current[slot])
    kills = Counter()
    next_operation: list[float] = []
    killed_holding_lock = 0

    def kill(inc: Incarnation) -> None:
        _kill(inc.process)
        log = _read_log(inc.log)
        assert inc.process.exitcode == -signal.SIGKILL, f"{inc.log} died by itself: {log[-1:]}"
        kills[inc.role] += 1

    try:
        started = time.monotonic()
        while sum(kills.values()) < KILLS:
            assert time.monotonic() - started < 60, "children do not get going"
            ready = [inc for inc in current.values() if inc.ready()]
            if not ready:
                time.sleep(0.002)
                continue
            victim = rng.choice(ready)
            time.sleep(rng.uniform(0, 0.02))
            # Approximate (the holder may let go in between), but shows the kills do land
            # inside lock holds.
            killed_holding_lock += store.segment.lock_holder() == victim.process.pid
            kill(victim)
            t0 = time.monotonic()
            run(asyncio.wait_for(layer.send("chaos.probe", {"after": victim.number}), 10))
            reply = run(asyncio.wait_for(layer.receive("chaos.probe"), 10))
            next_operation.append(time.monotonic() - t0)
            assert reply == {"after": victim.number}
            current[victim.slot] = _start(victim.slot, next(numbers), prefix, tmp_path, children)
            incarnations.append(current[victim.slot])
        run_time = time.monotonic() - started
        # Stop the writers first, let the receivers catch up, then stop them too.
        for inc in current.values():
            if inc.role != "recv":
                kill(inc)
        deadline = time.monotonic() + 20
        while _queued(store, RECEIVE_CHANNELS) and time.monotonic() < deadline:
            time.sleep(0.05)
        for inc in current.values():
            if inc.role == "recv":
                kill(inc)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()

    assert store.verify() == []
    received = []
    for inc in incarnations:
        if inc.role == "recv":
            for line in _read_log(inc.log):
                if line != "ready":
                    kind, sender, seq = line.split()
                    received.append((kind, int(sender), int(seq), inc.channel))
    for channel in RECEIVE_CHANNELS:
        for message in run(_drain(layer, channel)):
            received.append((message["k"], message["id"], message["q"], channel))

    acked, maybe = _expected_and_extra(incarnations)
    duplicates = [item for item, n in Counter(received).items() if n > 1]
    assert duplicates == [], f"received more than once: {duplicates[:10]}"
    unexpected = set(received) - acked - maybe
    assert unexpected == set(), f"received but never sent: {sorted(unexpected)[:10]}"
    lost = acked - set(received)
    # A receiver killed between its take and its log line loses that message: one per kill.
    assert len(lost) <= kills["recv"], (
        f"{len(lost)} acknowledged messages never received, more than the {kills['recv']} "
        f"receiver kills can explain: {sorted(lost)[:10]}"
    )
    assert len(acked) > 1000, "the senders hardly sent anything"

    # Memberships: every (group, channel) is as the churners' acknowledged calls left it.
    groups, channels = workers.churn_keys(0)
    for channel in channels:
        run(_drain(layer, channel, 0.01))
    member_of = {key: False for key in _possible_memberships(incarnations, 0)}
    for group in groups:
        run(layer.group_send(group, {"k": "probe", "g": group}))
    for channel in channels:
        for message in run(_drain(layer, channel, 0.01)):
            member_of[(message["g"], channel)] = True
    possible = _possible_memberships(incarnations, 0)
    wrong = {key: (member_of[key], possible[key]) for key in possible
             if member_of[key] not in possible[key]}
    assert wrong == {}, f"memberships differ from what the acknowledged calls left: {wrong}"

    assert store.verify() == []
    assert sum(kills.values()) >= KILLS
    slowest = max(next_operation)
    assert slowest < NEXT_OPERATION_BOUND, (
        f"an operation after a kill took {slowest:.3f} s ({kills}, {killed_holding_lock} "
        f"kills while holding the lock, {run_time:.1f} s)"
    )
    run(layer.flush())
    report = store.inspect()
    assert (report["messages"], report["channels"], report["groups"]) == (0, 0, 0)
    run(layer.close())
    loop.close()


# --- kills in the middle of a write --------------------------------------------------------

CONFIG = {"channel_memory": MiB, "group_memory": 256 * 1024, "capacity": 100}
GROUPS = ["g", "h"]
BYSTANDER = [{"b": 1}, {"b": 2, "pad": "x" * 300}]


async def _setup_base(layer):
    """What every scenario starts from, besides its own setup."""
    for message in BYSTANDER:
        await layer.send("bystander", message)
    await layer.group_add("h", "m2")


async def _victim_messages(layer, count):
    for n in range(count):
        await layer.send("victim", {"v": n})


async def _fragment(layer):
    for n in range(4):
        await layer.send("victim", {"v": n})
    await layer.receive("victim")  # a free block between used ones


async def _nothing(layer):
    pass


async def _two_members(layer):
    await layer.group_add("g", "m1")
    await layer.group_add("g", "m2")


async def _shared_copies(layer):
    """A group_send to two members: one payload, a shared node in each channel."""
    await _two_members(layer)
    await layer.group_send("g", {"s": 1})


async def _last_shared_copy(layer):
    await _shared_copies(layer)
    await layer.receive("m2")


# name: (setup, operation, arguments, channel contents after setup, group members after setup)
SCENARIOS = {
    "send to a new channel": (
        _nothing, "send", ("victim", {"x": "new"}), {}, {}),
    "send to a channel holding messages": (
        lambda layer: _victim_messages(layer, 2), "send", ("victim", {"x": "new"}),
        {"victim": [{"v": 0}, {"v": 1}]}, {}),
    "send into fragmented memory": (
        _fragment, "send", ("victim", {"x": "new"}),
        {"victim": [{"v": 1}, {"v": 2}, {"v": 3}]}, {}),
    "receive": (
        lambda layer: _victim_messages(layer, 2), "receive", ("victim",),
        {"victim": [{"v": 0}, {"v": 1}]}, {}),
    "group_add creating the group": (
        _nothing, "group_add", ("g", "m1"), {}, {}),
    "group_add to an existing group": (
        lambda layer: layer.group_add("g", "m2"), "group_add", ("g", "m1"), {}, {"g": {"m2"}}),
    "group_add renewing a membership": (
        lambda layer: layer.group_add("g", "m1"), "group_add", ("g", "m1"), {}, {"g": {"m1"}}),
    "group_discard of the last member": (
        lambda layer: layer.group_add("g", "m1"), "group_discard", ("g", "m1"), {},
        {"g": {"m1"}}),
    "group_send": (
        lambda layer: layer.group_add("g", "m1"), "group_send", ("g", {"x": "all"}), {},
        {"g": {"m1"}}),
    "group_send to two members": (
        _two_members, "group_send", ("g", {"x": "all"}), {}, {"g": {"m1", "m2"}}),
    "group_send to members holding shared copies": (
        _shared_copies, "group_send", ("g", {"x": "all"}),
        {"m1": [{"s": 1}], "m2": [{"s": 1}]}, {"g": {"m1", "m2"}}),
    "receive of a shared copy": (
        _shared_copies, "receive", ("m1",),
        {"m1": [{"s": 1}], "m2": [{"s": 1}]}, {"g": {"m1", "m2"}}),
    "receive of the last shared copy, which frees the payload": (
        _last_shared_copy, "receive", ("m1",), {"m1": [{"s": 1}]}, {"g": {"m1", "m2"}}),
}
NO_ALLOCATION = {"group_add renewing a membership"}


def _figures(store) -> dict:
    report = store.inspect()
    assert report["problems"] == []
    return {k: v for k, v in report.items() if k not in VOLATILE}


async def _contents(layer, store) -> tuple[dict, dict]:
    """Every queued message by channel, then every group's members (found by probing); empties
    the channels on the way."""

    def depths():
        return {name: count for count, name, _w in store.inspect()["deepest"] if count}

    async def take_all():
        return {name: [await layer.receive(name) for _ in range(count)]
                for name, count in depths().items()}

    queued = await take_all()
    members = {}
    for group in GROUPS:
        await layer.group_send(group, {"probe": group})
        got = await take_all()
        if got:
            members[group] = set(got)
    return queued, members


def _stalled_child(children, target, *args, engine=None):
    child, parent_end = workers.start_piped(target, *args, engine=engine)
    children.append(child)
    assert parent_end.poll(30), "the child neither stalled nor finished"
    return child, parent_end.recv()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_while_holding_the_lock_mid_write(prefix, children, scenario, engine):
    """A child running ``engine`` is stopped after each journaled write of an operation and
    killed; the next operation finds the store as it was before. The writes are listed by a
    first run of the pure-Python engine, whose frames name the function that made each; a
    compiled child must make the same writes, word for word."""
    setup, op, args, queued, members = SCENARIOS[scenario]
    queued = {"bystander": BYSTANDER, **queued}
    members = {"h": {"m2"}, **members}
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()

    def prepare() -> dict:
        run(layer.flush())
        run(_setup_base(layer))
        run(setup(layer))
        return _figures(store)

    def run_through(engine: str) -> list[tuple[str, int]]:
        prepare()
        child, (state, writes) = _stalled_child(
            children, workers.stall_after_journaled_writes, prefix, CONFIG, op, args, 10**9,
            engine=engine,
        )
        child.join(10)
        assert state == "done" and writes
        return writes

    # A first run to completion lists the journaled writes of the operation, and who made them.
    writers = [writer for writer, _word in run_through("python")]
    words = [word for _writer, word in run_through("python")]
    if engine != "python":
        assert [word for _writer, word in run_through(engine)] == words
    in_heap = [w for w in writers if w.startswith("heap.")]
    if scenario not in NO_ALLOCATION:
        assert in_heap, "the operation never reached the allocator"
    assert len(in_heap) < len(writers), "the operation never linked anything"

    # A cut after every journaled write: in the allocator, in the linking, and after the last.
    for cut in range(1, len(writers) + 1):
        before = prepare()
        child, (state, so_far) = _stalled_child(
            children, workers.stall_after_journaled_writes, prefix, CONFIG, op, args, cut,
            engine=engine,
        )
        where = (f"{scenario}, {engine}: cut after journaled write {cut} of {len(writers)} "
                 f"({writers[cut - 1]}, word {so_far[-1][1]})")
        assert state == "stalled", where
        assert store.segment.lock_holder() == child.pid, f"{where}: the child lets go of the lock"
        _kill(child)
        t0 = time.monotonic()
        after = _figures(store)  # takes the lock, so recovers first
        elapsed = time.monotonic() - t0
        assert elapsed < NEXT_OPERATION_BOUND, f"{where}: the next operation took {elapsed:.3f} s"
        assert after == before, f"{where}: the cut-off operation left a trace"
        assert run(_contents(layer, store)) == (queued, members), where
        assert store.verify() == [], where
    run(layer.close())
    loop.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_in_the_middle_of_flush_is_finished_by_the_next_process(prefix, children, engine):
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    store = layer.engine()

    async def fill():
        for n in range(50):
            await layer.send(f"c{n % 7}", {"n": n, "pad": "y" * (n * 10)})
            await layer.group_add(f"g{n % 5}", f"c{n % 7}")

    steps = None
    for stall_at in range(20):
        run(fill())
        child, (state, done) = _stalled_child(
            children, workers.stall_in_flush, prefix, CONFIG, stall_at, engine=engine
        )
        if state == "done":
            # Counting the steps of a whole flush ends the loop.
            steps = done
            child.join(10)
            break
        assert store.segment.lock_holder() == child.pid
        _kill(child)
        t0 = time.monotonic()
        report = store.inspect()
        elapsed = time.monotonic() - t0
        where = f"flush killed after {done}"
        assert elapsed < NEXT_OPERATION_BOUND, f"{where}: the next operation took {elapsed:.3f} s"
        assert report["problems"] == [], where
        assert (report["messages"], report["channels"], report["groups"],
                report["memberships"], report["channel_memory"]["used"],
                report["group_memory"]["used"]) == (0, 0, 0, 0, 0, 0), where
        run(layer.send("after", {"ok": stall_at}))
        assert run(asyncio.wait_for(layer.receive("after"), 2)) == {"ok": stall_at}
    assert steps is not None and stall_at == len(steps) >= 5, steps
    run(layer.close())
    loop.close()
