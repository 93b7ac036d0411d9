"""MultiHostChannelLayer across hosts, with a real redis-server on loopback.

Hosts are simulated on this machine: each is a mount namespace with its own tmpfs at /dev/shm
(``Host``: an anchor process made with ``unshare --mount``, and worker processes entered into
its namespace with ``nsenter``), so each has a store of its own, with its own host id, as two
machines would. The workers are tests/mh_worker.py roles. Timings are printed, not asserted;
the bounds asserted (a takeover within 5 s) are liveness checks only.

The tests that need no second host run in this process: two prefixes with the same ``site``
are two hosts to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import pytest
from channels.exceptions import ChannelFull

import asgi_ipc
from asgi_ipc.multihost import MultiHostChannelLayer
from asgi_ipc.multihost import layer as layer_module
from asgi_ipc.multihost.redis_side import RedisUnavailable, pack

from .helpers import ROOT, MiB, django_check, new_prefix, pythonpath

pytestmark = pytest.mark.timeout(300)

WORKER = str(ROOT / "tests" / "mh_worker.py")
PATIENCE = 60.0


@pytest.fixture
def url(redis_url):
    if redis_url is None or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs redis-server, unshare and nsenter")
    return redis_url


def command_stats(url: str) -> dict[str, int]:
    import redis

    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return {name: figures["calls"] for name, figures in stats.items()}


# The commands of the connection that reads the figures.
MEASURING = {"cmdstat_info", "cmdstat_hello", "cmdstat_client|setinfo"}


def grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        name: calls - before.get(name, 0) for name, calls in after.items()
        if calls != before.get(name, 0) and name not in MEASURING
    }


# --- simulated hosts -----------------------------------------------------------------------


class Proc:
    """One mh_worker.py role in a host's mount namespace."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=pythonpath(ROOT)),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")

    def expect(self, word: str, timeout: float = PATIENCE) -> list[str]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.proc.args[4:7]} said nothing in {timeout} s") from None
        assert line.split()[:1] == [word], f"expected {word!r}, got {line!r}"
        return line.split()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


class Host:
    """A mount namespace with a tmpfs of its own at /dev/shm, and the workers run in it."""

    def __init__(self, prefix: str, url: str) -> None:
        self.prefix, self.url = prefix, url
        self.anchor = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs -o size=256m tmpfs /dev/shm && echo ready && exec sleep 100000"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.anchor.stdout is not None
        assert self.anchor.stdout.readline().strip() == "ready"
        self.procs: list[Proc] = []

    def run(self, role: str, *args: object) -> Proc:
        proc = Proc([
            "nsenter", f"--mount=/proc/{self.anchor.pid}/ns/mnt", sys.executable, WORKER,
            role, self.prefix, self.url, *map(str, args),
        ])
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        self.anchor.kill()
        self.anchor.wait(30)


@pytest.fixture
def hosts(url):
    """Make hosts of one site (one prefix, in namespaces of their own); all gone at the end."""
    made: list[Host] = []
    prefix = new_prefix()

    def make(n: int) -> list[Host]:
        for _ in range(n):
            made.append(Host(prefix, url))
        return made[-n:]

    yield make
    for host in made:
        host.close()


def leaders(candidates: list[Proc], timeout: float = PATIENCE) -> tuple[Proc, float]:
    """The candidate that says it leads, and when it began to."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in candidates:
            try:
                line = proc.lines.get_nowait()
            except queue.Empty:
                continue
            words = line.split()
            if words[:1] == ["leading"]:
                return proc, float(words[2])
        time.sleep(0.001)
    raise AssertionError("no relay took over")


def start_candidates(host: Host, n: int) -> list[Proc]:
    candidates = [host.run("candidate") for _ in range(n)]
    for proc in candidates:
        proc.expect("candidate")
    return candidates


# --- across hosts --------------------------------------------------------------------------


def test_cross_host_send_receive_and_ping_pong(hosts):
    a, b = hosts(2)
    relay_a, relay_b = start_candidates(a, 1), start_candidates(b, 1)
    leaders(relay_a), leaders(relay_b)
    echo = b.run("echo")
    echo_channel = echo.expect("channel")[1]
    pinger = a.run("pinger", echo_channel, 300)
    _word, p50, p90 = pinger.expect("p50")
    print(f"\ncross-host ping-pong p50 {float(p50) * 1e3:.3f} ms, p90 {float(p90) * 1e3:.3f} ms")
    # And one-way, counted: every message once.
    receiver = b.run("receiver")
    channel = receiver.expect("channel")[1]
    sender = a.run("sender", channel, 500, 0)
    acked = json.loads(sender.expect("acked")[1])
    got = json.loads(receiver.expect("got")[1])
    assert acked == list(range(500)) and got == acked


def test_group_send_across_three_hosts_reaches_every_member_once(hosts):
    three = hosts(3)
    for host in three:
        leaders(start_candidates(host, 1))
    members = [host.run("members", "room", 20, 30) for host in three]
    for proc in members:
        assert proc.expect("ready")[1] == "20"
    sender = three[0].run("group-sender", "room", 30)
    sender.expect("sent")
    for proc in members:
        _word, copies, wrong = proc.expect("members")
        assert (int(copies), int(wrong)) == (20 * 30, 0)


def test_relay_killed_in_a_loop_loses_and_duplicates_nothing(hosts):
    a, b = hosts(2)
    leaders(start_candidates(a, 1))
    candidates = start_candidates(b, 3)
    leader, _ = leaders(candidates)
    receiver = b.run("receiver")
    channel = receiver.expect("channel")[1]
    sender = a.run("sender", channel, 6000, 0.0005)
    takeovers = []
    for _ in range(20):
        time.sleep(0.15)
        killed_at = time.time()
        os.kill(leader.proc.pid, signal.SIGKILL)
        leader.proc.wait(30)
        candidates.remove(leader)
        leader, began = leaders(candidates, timeout=5)
        takeovers.append(began - killed_at)
        candidates += start_candidates(b, 1)
    acked = json.loads(sender.expect("acked")[1])
    _word, got_text, times_text = receiver.expect("got")
    got, times = json.loads(got_text), json.loads(times_text)
    takeovers.sort()
    # What a kill costs the traffic: the longest waits between two deliveries (the sender
    # sends every 0.5 ms or so), which include the new leader's connection to Redis.
    waits = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    gaps = sorted(waits, reverse=True)[:len(takeovers)]
    print(f"\nelection after SIGKILL: median {takeovers[len(takeovers) // 2] * 1e3:.1f} ms, "
          f"max {takeovers[-1] * 1e3:.1f} ms; the {len(gaps)} longest gaps in delivery: "
          f"median {gaps[len(gaps) // 2] * 1e3:.1f} ms, max {gaps[0] * 1e3:.1f} ms; "
          f"{len(acked)} acknowledged, {len(got)} received")
    assert len(got) == len(set(got)), "duplicated"
    assert set(acked) - set(got) == set(), "lost"
    assert got == sorted(got)


def test_two_relays_racing_duplicate_nothing(hosts):
    a, b = hosts(2)
    leaders(start_candidates(a, 1))
    racers = [b.run("racer") for _ in range(2)]
    for proc in racers:
        proc.expect("candidate")
        proc.expect("leading")  # both lead: the election is off
    receiver = b.run("receiver")
    channel = receiver.expect("channel")[1]
    sender = a.run("sender", channel, 2000, 0.0002)
    acked = json.loads(sender.expect("acked")[1])
    got = json.loads(receiver.expect("got")[1])
    assert acked == list(range(2000))
    assert got == acked
    counters = json.loads(b.run("stats").expect("counters")[1])
    print(f"\nracing relays: {counters['relayed']} applied, {counters['relay_fenced']} fenced")
    assert counters["relay_fenced"] > 0, "the relays did not race"


# --- Redis stopped and started again -------------------------------------------------------


class OwnRedis:
    """A redis-server this test stops and starts again on the same port."""

    def __init__(self, persist: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix="asgi_ipc_mh_redis_")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.persist = persist
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, empty: bool = False) -> None:
        if empty:
            shutil.rmtree(self.dir)
            os.makedirs(self.dir)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else [
            "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--dir", self.dir, *persistence],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # with appendfsync always, every reply was written first
            self.proc.wait(30)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("empty", [False, True], ids=["persisted", "restarted-empty"])
def test_redis_stopped_and_restarted(url, empty):
    server = OwnRedis(persist=not empty)
    server.start()
    prefix = new_prefix()
    a, b = Host(prefix, server.url), Host(prefix, server.url)
    try:
        leaders(start_candidates(a, 1))
        leaders(start_candidates(b, 1))
        receiver = b.run("receiver")
        channel = receiver.expect("channel")[1]
        local = b.run("local", 4)
        local.expect("local-ready")
        sender = a.run("sender", channel, 1500, 0.002)
        time.sleep(1)
        server.stop()
        time.sleep(1.5)
        server.start(empty=empty)
        _word, rounds = local.expect("local")
        acked, unsure = map(json.loads, sender.expect("acked")[1:])
        got = json.loads(receiver.expect("got")[1])
        print(f"\nRedis {'restarted empty' if empty else 'restarted'}: {len(acked)} "
              f"acknowledged, {len(unsure)} refused or unsure, {len(got)} received; "
              f"{rounds} same-host round trips during the test")
        assert int(rounds) > 0
        assert len(got) == len(set(got)), "duplicated"
        assert set(got) <= set(acked) | set(unsure)
        assert unsure, "Redis was never found down"
        if empty:
            # What Redis held when it lost everything is gone; what came after arrives.
            assert set(acked[-200:]) <= set(got)
        else:
            assert set(acked) <= set(got), "lost"
    finally:
        a.close()
        b.close()
        server.close()


async def test_a_send_after_redis_restarted_connects_anew(prefix):
    """A send to another host runs on a connection its event loop kept from the last one
    (redis_side.Connections): after Redis restarted, the first send finds that connection
    closed and connects again, rather than failing on it."""
    server = OwnRedis(persist=True)
    server.start()
    other = new_prefix()
    a = MultiHostChannelLayer(prefix=prefix, site=prefix, hosts=[server.url], relay=False)
    b = MultiHostChannelLayer(prefix=other, site=prefix, hosts=[server.url])
    try:
        channel = await b.new_channel()
        await a.send(channel, {"n": 1})
        assert await asyncio.wait_for(b.receive(channel), 10) == {"n": 1}
        server.stop()
        server.start()
        await a.send(channel, {"n": 2})  # no RedisUnavailable: the kept connection was stale
        assert await asyncio.wait_for(b.receive(channel), 10) == {"n": 2}
    finally:
        await a.close()
        await b.close()
        asgi_ipc.unlink(other)
        server.close()


# --- one host, in this process ---------------------------------------------------------------


@pytest.fixture
def site(url, prefix):
    """Two hosts in this process: layers of two prefixes that meet in Redis as one site."""
    other = new_prefix()
    made: list[MultiHostChannelLayer] = []

    def make(which: int = 0, **config) -> MultiHostChannelLayer:
        config.setdefault("channel_memory", 4 * MiB)
        config.setdefault("group_memory", 1 * MiB)
        layer = MultiHostChannelLayer(
            prefix=(prefix, other)[which], site=prefix, hosts=[config.pop("hosts", url)],
            **config,
        )
        made.append(layer)
        return layer

    yield make

    async def tidy():
        for layer in made:
            await layer.close()

    asyncio.run(tidy())
    asgi_ipc.unlink(other)


async def test_same_host_traffic_issues_no_redis_command(site, url):
    first, second = site(0, relay=False, local_channels=["local.*"]), site(0, relay=False)
    channel = await first.new_channel()
    await first.send("local.warmup", {})  # opens the store
    await first.receive("local.warmup")
    before = command_stats(url)
    for n in range(200):
        await second.send(channel, {"n": n})
        assert (await first.receive(channel))["n"] == n
        await first.send("local.jobs", {"n": n})
        assert (await first.receive("local.jobs"))["n"] == n
    waiting = asyncio.ensure_future(first.receive(channel))
    await asyncio.sleep(0.05)
    waiting.cancel()
    assert grown(before, command_stats(url)) == {}
    # With a relay in the process, the relay's reads and beats are all there is.
    relayed = site(0)
    await relayed.send(channel, {"n": "relayed"})
    assert await first.receive(channel) == {"n": "relayed"}
    await asyncio.sleep(1.5)
    before = command_stats(url)
    for n in range(200):
        await relayed.send(channel, {"n": n})
        assert (await first.receive(channel))["n"] == n
    extra = grown(before, command_stats(url))
    assert set(extra) <= {"cmdstat_evalsha", "cmdstat_xread", "cmdstat_xtrim", "cmdstat_zadd",
                          "cmdstat_get", "cmdstat_exists", "cmdstat_xinfo", "cmdstat_pexpire",
                          "cmdstat_xlen"}, extra
    assert extra.get("cmdstat_evalsha", 0) <= 4, extra  # the relay beats once a second


async def applied(layer: MultiHostChannelLayer, url: str) -> None:
    """Wait until the relay of ``layer``'s host has applied every entry its inbox holds now
    (the inbox's key as redis_side.py documents it, the position as the store keeps it)."""
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    from asgi_ipc.engine.layout import H_RELAY_MS, H_RELAY_SEQ

    async with aioredis.Redis.from_url(url) as client:
        try:
            info = await client.xinfo_stream(f"{{{layer.site}}}:inbox:{layer.host_id():016x}")
        except ResponseError:  # no inbox: nothing to apply
            return
    ms, seq = (int(part) for part in info["last-generated-id"].decode().split("-"))
    words = layer.engine().words
    deadline = time.monotonic() + PATIENCE
    while (words[H_RELAY_MS], words[H_RELAY_SEQ]) < (ms, seq):
        assert time.monotonic() < deadline, "the relay never applied its inbox"
        await asyncio.sleep(0.005)


async def test_in_process_hosts_carry_channels_groups_and_flush(site, url):
    a, b = site(0), site(1)
    mine, theirs = await a.new_channel(), await b.new_channel()
    assert a.host_id() != b.host_id()
    await a.send(theirs, {"to": "b"})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"to": "b"}
    with pytest.raises(ValueError):
        await a.receive(theirs)
    # A group_add of another host's channel, and a group_send reaching both hosts once.
    await a.group_add("room", theirs)
    await a.group_add("room", mine)
    await a.group_add("room", "site.wide")
    # A group_add of b's channel reaches b's store through b's inbox: a group_send from any
    # other host comes after it in that inbox, one from b itself once b's relay applied it.
    await applied(b, url)
    await b.group_send("room", {"g": 1})
    assert await asyncio.wait_for(a.receive(mine), 5) == {"g": 1}
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"g": 1}
    assert await asyncio.wait_for(a.receive("site.wide"), 5) == {"g": 1}
    await b.group_discard("room", mine)  # through a's inbox
    await applied(a, url)
    await a.group_send("room", {"g": 2})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"g": 2}
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(a.receive(mine), 0.3)
    # A flush reaches the other host's store through its inbox.
    await a.send(theirs, {"before": "flush"})
    await applied(b, url)
    await a.flush()
    await applied(b, url)
    await a.send(theirs, {"after": "flush"})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"after": "flush"}
    assert b.engine().verify() == []


def relay_byte_locks(layer: MultiHostChannelLayer) -> Callable[[], tuple[int, int]]:
    """What reads (held, waited for): the OFD locks on the relay byte of ``layer``'s store, as
    /proc/locks lists them (a request still waiting has "->" after its number)."""
    from asgi_ipc.engine.layout import RELAY_BYTE

    st = os.fstat(layer.engine().segment.fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"

    def read() -> tuple[int, int]:
        held = waiting = 0
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                blocked = fields[1] == "->"
                fields = [fields[0], *fields[2:]] if blocked else fields
                if fields[1] == "OFDLCK" and fields[5] == inode and fields[6] == str(RELAY_BYTE):
                    waiting += blocked
                    held += not blocked
        return held, waiting

    return read


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def test_standbys_wait_in_the_kernel_and_one_takes_over_when_the_leader_closes(site):
    sender, leader = site(0), site(1)
    await leader.new_channel()  # opens the store: its relay leads
    await until(lambda: leader.relay().leading, "no relay led")
    locks = relay_byte_locks(leader)
    standby, closing = site(1), site(1)
    mine = await standby.new_channel()
    await closing.new_channel()
    # Both wait in their lock requests (no polling): the kernel lists them as blocked.
    await until(lambda: locks() == (1, 2), "the standbys are not waiting")
    # A standby's layer closes at once, though its request cannot be cut short: it stays
    # listed until it is granted, and a grant then goes with the dropped description.
    start = time.monotonic()
    await closing.close()
    print(f"\na waiting standby closed in {(time.monotonic() - start) * 1e3:.1f} ms")
    await leader.close()
    await until(lambda: standby.relay().leading, "the standby never took over")
    assert locks()[0] == 1
    await sender.send(mine, {"through": "the new leader"})
    assert await asyncio.wait_for(standby.receive(mine), PATIENCE) == {"through": "the new leader"}
    # Once the last candidate closes, nothing holds the byte or waits for it.
    await standby.close()
    await until(lambda: locks() == (0, 0), "the byte is still held or waited for")


async def test_a_full_inbox_raises_channel_full(site):
    a, b = site(0), site(1, relay=False, inbox_capacity=3)
    theirs = await b.new_channel()
    sender = site(0, inbox_capacity=3)
    for n in range(3):
        await sender.send(theirs, {"n": n})
    with pytest.raises(ChannelFull):
        await sender.send(theirs, {"n": 3})
    await a.close()


async def test_applied_entries_leave_a_small_inbox_before_they_fill_it(site):
    """The relay trims applied entries in runs, but never so many that they alone fill the
    inbox's bound: a receiver that keeps up never makes the sender's inbox look full."""
    a, b = site(0, relay=False, inbox_capacity=5), site(1, inbox_capacity=5)
    theirs = await b.new_channel()
    for n in range(30):
        await a.send(theirs, {"n": n})
        assert await asyncio.wait_for(b.receive(theirs), 10) == {"n": n}


async def test_commands_cancelled_before_they_start_leave_no_connection_behind(site, url):
    """A send cancelled while its kept connection is looked at (after it sat unused) gives
    that connection back: Redis sees no more clients than before."""
    import redis.asyncio as aioredis

    a, b = site(0, relay=False), site(1, relay=False)
    theirs = await b.new_channel()
    await a.send(theirs, {"n": "first"})
    async with aioredis.Redis.from_url(url) as client:
        before = (await client.info("clients"))["connected_clients"]
        for n in range(30):
            await asyncio.sleep(0.02)  # unused for longer than a kept connection's look
            sending = asyncio.ensure_future(a.send(theirs, {"n": n}))
            await asyncio.sleep(0)  # the send runs until the look lets the loop run
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            await a.send(theirs, {"n": "between"})  # on a kept connection, or a new one
        after = (await client.info("clients"))["connected_clients"]
    # Counted by Redis for every client: some slack for other tests' connections ending.
    assert after < before + 10, (before, after)


async def test_stopping_a_relay_that_is_connecting_waits_no_longer_than_asked(site):
    """A leader connecting to a server that never answers cannot be cut short, but ``stop``
    returns after its own timeout; the leader ends within its socket timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        layer = site(0, hosts=f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                     redis_timeout=2)
        await layer.new_channel()  # opens the store: its relay leads, and connects
        relay = layer.relay()
        await until(lambda: relay.leading, "no relay led")
        relay.stop(timeout=0.05)
        assert relay.leading, "stop waited for the connect"
        await until(lambda: not relay.leading, "the leader never ended")
    finally:
        silent.close()


async def test_the_relay_carries_on_when_ids_go_back_or_redis_forgets(site, url):
    import redis.asyncio as aioredis

    a, b = site(0), site(1)
    theirs = await b.new_channel()
    await a.send(theirs, {"n": 0})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"n": 0}
    engine = b.engine()
    from asgi_ipc.engine.layout import H_RELAY_EPOCH, H_RELAY_MS

    # Ids going back: the store says it applied entries an hour ahead of the stream.
    def ahead():
        engine.journal.set(H_RELAY_MS, engine.words[H_RELAY_MS] + 3_600_000)

    epoch = engine.words[H_RELAY_EPOCH]
    engine.locked(ahead)
    # Detected at the relay's next beat (one a second at least), which moves the store to a
    # new epoch: entries added before it with ids up to the stream's last are taken as applied
    # (see redis_side.py), so wait for it.
    deadline = time.monotonic() + PATIENCE
    while engine.words[H_RELAY_EPOCH] == epoch:
        assert time.monotonic() < deadline, "the relay never saw the ids go back"
        await asyncio.sleep(0.01)
    await a.send(theirs, {"n": 1})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"n": 1}
    # Redis forgets everything (restarted empty): a new epoch, and the relay carries on.
    async with aioredis.Redis.from_url(url) as client:
        await client.delete(*[k async for k in client.scan_iter(match=f"{{{a.site}}}:*")])
    await a.send(theirs, {"n": 2})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"n": 2}
    await a.send(theirs, {"n": 3})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"n": 3}
    assert engine.verify() == []


async def test_without_redis_same_host_works_and_redis_operations_fail_in_bounded_time(site):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    layer = site(0, hosts=nowhere, redis_timeout=1)
    channel = await layer.new_channel()
    await layer.group_add("g", channel)  # registered in Redis later
    await layer.send(channel, {"local": True})
    assert await layer.receive(channel) == {"local": True}
    await layer.group_send("g", {"local": "group"})
    assert await layer.receive(channel) == {"local": "group"}
    start = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await layer.send("site.wide", {})
    with pytest.raises(RedisUnavailable):
        await layer.receive("site.wide")
    assert time.monotonic() - start < 10


async def test_a_cancelled_command_never_corrupts_a_connection(site):
    layer = site(0)
    for _ in range(20):
        waiting = asyncio.ensure_future(layer.receive("site.cancelled"))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    client = layer.redis_side().client
    for n in range(20):
        call = asyncio.ensure_future(client.blpop(["site.nothing"], timeout=1))
        await asyncio.sleep(0.001 * (n % 5))
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            pass
        assert await client.echo(f"reply {n}") == f"reply {n}".encode()
    await layer.send("site.cancelled", {"kept": 1})
    assert await asyncio.wait_for(layer.receive("site.cancelled"), 5) == {"kept": 1}


async def test_a_cancelled_send_to_another_host_never_corrupts_a_kept_connection(site):
    """Cancelled at any instant, a command on a kept connection (redis_side.Connections) drops
    that connection: the next command never reads the reply that was still to come."""
    a, b = site(0, relay=False), site(1)
    channel = await b.new_channel()
    connections = a.redis_side().connections
    for n in range(40):
        call = asyncio.ensure_future(connections.call(pack("BLPOP", "site.nothing", 1)))
        await asyncio.sleep(0.0005 * (n % 4))
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        sending = asyncio.ensure_future(a.send(channel, {"n": n}))
        await asyncio.sleep(0.0002 * (n % 3))
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        assert await connections.call(pack("ECHO", f"reply {n}")) == f"reply {n}".encode()
    await a.send(channel, {"n": "last"})
    got = []
    while not got or got[-1] != {"n": "last"}:
        got.append(await asyncio.wait_for(b.receive(channel), 10))
    numbers = [message["n"] for message in got[:-1]]
    assert numbers == sorted(set(numbers)) and set(numbers) <= set(range(40))


def test_config_pasted_from_channels_redis(url, monkeypatch):
    prefix = new_prefix()
    for hosts in ([url], [{"address": url}], [("127.0.0.1", int(url.rsplit(":", 1)[1]))]):
        layer = MultiHostChannelLayer(prefix=prefix, hosts=hosts, capacity=10, expiry=5,
                                      group_expiry=60, random_prefix_length=12,
                                      serializer_format="msgpack", relay=False,
                                      channel_memory=MiB, group_memory=MiB)

        async def use(layer=layer):
            await layer.send("pasted", {"ok": 1})
            assert await layer.receive("pasted") == {"ok": 1}
            await layer.close()

        asyncio.run(use())
    asgi_ipc.unlink(prefix)
    with pytest.raises(ValueError, match="one Redis"):
        MultiHostChannelLayer(prefix=prefix, hosts=[url, url])
    with pytest.raises(TypeError, match="TLS"):
        MultiHostChannelLayer(prefix=prefix, hosts=[url], symmetric_encryption_keys=["k"])
    monkeypatch.setattr(layer_module, "_MISSING", ImportError("no redis"))
    with pytest.raises(ImportError, match=r"pip install asgi_ipc\[redis\]"):
        MultiHostChannelLayer(prefix=prefix, hosts=[url])


def test_django_check_passes_a_multihost_configuration_and_checks_its_ipc_options(tmp_path, url):
    layers = """{
        "default": {
            "BACKEND": "asgi_ipc.MultiHostChannelLayer",
            "CONFIG": {"hosts": [%r], "prefix": "site", "channel_memory": 1024 * 1024,
                       "group_memory": 1024 * 1024, "inbox_capacity": 500,
                       "local_channels": ["thumbnails"], "capacity": %s},
        },
    }"""
    code, output = django_check(tmp_path, layers % (url, 100))
    assert code == 0 and "no issues" in output, output
    code, output = django_check(tmp_path, layers % (url, 0))
    assert code != 0 and "asgi_ipc.E002" in output and "capacity" in output, output


# --- the example site, over two hosts ---------------------------------------------------------


async def test_the_example_chat_site_runs_across_two_hosts(url, tmp_path):
    """examples/chat with daphne and the worker on one host, uvicorn on another."""
    import websockets

    from asgi_ipc.bench.redis_server import free_port

    example = ROOT / "examples" / "chat"
    prefix = new_prefix()
    env = {
        **os.environ, "CHAT_LAYER_PREFIX": prefix, "CHAT_REDIS_URL": url,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings", "PYTHONPATH": pythonpath(example, ROOT),
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
    }
    app = "chatsite.asgi:application"
    daphne_port, uvicorn_port = free_port(), free_port()
    a, b = Host(prefix, url), Host(prefix, url)
    procs = []

    def run(host: Host, name: str, command: list[str]) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                ["nsenter", f"--mount=/proc/{host.anchor.pid}/ns/mnt", *command], cwd=example,
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    def logs() -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
                         for log in sorted(tmp_path.glob("*.log")))

    async def listening(port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise AssertionError(f"nothing on port {port}\n{logs()}")

    async def next_json(ws) -> dict:
        try:
            return json.loads(await asyncio.wait_for(ws.recv(), 15))
        except asyncio.TimeoutError:
            raise AssertionError(f"no message\n{logs()}") from None

    try:
        daphne = run(a, "daphne", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p",
                                   str(daphne_port), app])
        worker = run(a, "worker", [sys.executable, str(example / "manage.py"), "runworker",
                                   "chat-worker"])
        uvicorn = run(b, "uvicorn", [sys.executable, "-m", "uvicorn", app, "--host",
                                     "127.0.0.1", "--port", str(uvicorn_port),
                                     "--lifespan", "off"])
        await listening(daphne_port)
        await listening(uvicorn_port)

        def connect(port: int):
            return websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/lobby/",
                                      origin=f"http://127.0.0.1:{port}", open_timeout=15)

        async with connect(daphne_port) as ann, connect(uvicorn_port) as bob:
            assert (await next_json(ann))["server_pid"] == daphne.pid
            assert (await next_json(bob))["server_pid"] == uvicorn.pid
            await ann.send(json.dumps({"command": "say", "text": "hello bob", "author": "ann"}))
            said = {"type": "message", "text": "hello bob", "author": "ann",
                    "server_pid": daphne.pid}
            assert await next_json(bob) == said
            assert await next_json(ann) == said
            await bob.send(json.dumps({"command": "say", "text": "hi ann", "author": "bob"}))
            assert (await next_json(ann))["text"] == "hi ann"
            assert (await next_json(bob))["text"] == "hi ann"
            # A shout from the host without the worker: through the site-wide channel there,
            # and the answer back to bob's consumer on its own host.
            await bob.send(json.dumps({"command": "shout", "text": "over there"}))
            assert await next_json(bob) == {
                "type": "shout", "text": "OVER THERE", "count": 1, "worker_pid": worker.pid,
            }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        a.close()
        b.close()


async def test_normal_channels_are_site_wide_each_message_taken_once_local_ones_per_host(site):
    a = site(0, local_channels=["thumbnails"], capacity=1000)
    b = site(1, local_channels=["thumbnails"], capacity=1000)
    for n in range(200):
        await (a if n % 2 else b).send("jobs", {"n": n})
    got: list[int] = []

    async def consume(layer: MultiHostChannelLayer) -> None:
        try:
            while True:
                got.append((await asyncio.wait_for(layer.receive("jobs"), 1.5))["n"])
        except asyncio.TimeoutError:
            pass

    await asyncio.gather(consume(a), consume(b), consume(a), consume(b))
    assert sorted(got) == list(range(200))
    # A per-host channel: what one host sends there stays there.
    await a.send("thumbnails", {"host": "a"})
    await b.send("thumbnails", {"host": "b"})
    assert await asyncio.wait_for(b.receive("thumbnails"), 5) == {"host": "b"}
    assert await asyncio.wait_for(a.receive("thumbnails"), 5) == {"host": "a"}


async def test_a_dead_hosts_inbox_and_group_entries_expire(site, url):
    import redis.asyncio as aioredis

    a = site(0, inbox_ttl=1, group_expiry=1)
    b = site(1, inbox_ttl=1, group_expiry=1)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    await b.close()  # its relay stops: the host is gone
    await a.send(theirs, {"for": "nobody"})
    await a.group_send("room", {"for": "nobody"})
    async with aioredis.Redis.from_url(url) as client:
        inbox = f"{{{a.site}}}:inbox:{b.host_id():016x}"
        assert await client.exists(inbox)
        await asyncio.sleep(2.2)
        assert not await client.exists(inbox)
        assert not await client.exists(f"{{{a.site}}}:group:room")
    await b.close()


# --- connection options, a Redis that does not answer, the figures, the bench ----------------


def test_connection_options_in_channels_redis_form():
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelConnectionPool

    from asgi_ipc.multihost.redis_side import connection_options, make_client

    tls = make_client(connection_options("rediss://:pw@redis.example:6380/2", 3))
    assert tls.connection_pool.connection_class is SSLConnection
    kwargs = tls.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "redis.example", 6380, 2, "pw")
    assert kwargs.get("socket_timeout") is None and kwargs["socket_connect_timeout"] == 3
    sentinel = make_client(connection_options(
        {"sentinels": [("s1", 26379)], "master_name": "mymaster", "socket_timeout": 9}, 3))
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)
    assert sentinel.connection_pool.connection_kwargs["socket_timeout"] == 9
    address = make_client(connection_options({"address": ("h", 1), "password": "x"}, 3))
    assert address.connection_pool.connection_kwargs["password"] == "x"
    with pytest.raises(ValueError, match="hosts entry"):
        connection_options(42, 3)


async def test_a_redis_that_never_answers_fails_within_the_timeout(site):
    """A server that accepts connections and never replies, as a stopped or partitioned Redis
    looks: the operation gives up within ``redis_timeout`` and says why."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        layer = site(0, hosts=f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                     redis_timeout=0.5, relay=False)
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match="Redis is unavailable for a send"):
            await layer.send("site.wide", {})
        took = time.monotonic() - start
        print(f"\ngave up after {took:.2f} s (redis_timeout 0.5 s)")
        assert took < 5
    finally:
        silent.close()


async def test_stats_and_metrics_show_the_relay(site):
    from asgi_ipc.observe import figures, metrics_text

    a, b = site(0), site(1)
    theirs = await b.new_channel()
    for n in range(3):
        await a.send(theirs, {"n": n})
    for n in range(3):
        assert await asyncio.wait_for(b.receive(theirs), 5) == {"n": n}
    await asyncio.sleep(0.2)
    relay = figures(b.prefix).relay
    assert relay is not None
    assert relay["host"] == f"{b.host_id():016x}" and relay["leading"]
    assert relay["pid"] == os.getpid() and relay["redis_reachable"]
    assert figures(b.prefix).counters["relayed"] == 3
    assert figures(a.prefix).counters["remote_sent"] == 3
    text = metrics_text([b.prefix])
    assert f'asgi_ipc_relay_up{{prefix="{b.prefix}"}} 1.0' in text
    assert f'asgi_ipc_relay_redis_reachable{{prefix="{b.prefix}"}} 1.0' in text
    assert f'asgi_ipc_relayed_total{{prefix="{b.prefix}"}} 3.0' in text
    await a.group_add("room", theirs)
    await a.group_send("room", {"to": "b"})
    assert await asyncio.wait_for(b.receive(theirs), 5) == {"to": "b"}
    counters = figures(a.prefix).counters
    assert (counters["remote_sent"], counters["remote_group_copies"]) == (4, 1)


def test_bench_multihost_section(url):
    if importlib.util.find_spec("channels_redis") is None:
        pytest.skip("needs channels_redis")
    done = subprocess.run(
        [sys.executable, "-m", "asgi_ipc", "bench", "--multihost", "--quick", "--json"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=pythonpath(ROOT)),
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["multihost"]
    print("\n" + json.dumps(results, indent=1))
    assert results["same-host ping-pong"]["multihost"]["commands_per_round_trip"] == 0
    fanout = results["group_send 1000 members / 4 hosts"]
    for layer, sends in (("multihost", 50), ("redis", 5), ("redis pubsub", 50)):
        assert fanout[layer]["counted"] == fanout[layer]["expected"] == 1000 * sends
        assert fanout[layer]["deliveries_per_s"] > 0
    assert fanout["multihost"]["sender_round_trips_per_group_send"] == 1
    for name in ("cross-host one-way 1->1", "cross-host one-way 4->4"):
        for layer, sent in (("multihost", 2000), ("redis", 500)):
            figures = results[name][layer]
            assert figures["counted"] == figures["expected"] == sent, (name, figures)
    assert results["same-host ping-pong"]["ipc"]["p50_ms"] > 0


async def test_hosts_through_a_sentinel_watched_master(url, prefix, tmp_path):
    """``hosts`` in channels_redis's Sentinel form: the layer finds the master through
    the sentinel, and the relay reads from it."""
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        sentinel_port = s.getsockname()[1]
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor mh 127.0.0.1 {port} 1\n")
    sentinel = subprocess.Popen([shutil.which("redis-server") or "redis-server", str(conf),
                                 "--sentinel"], stdout=subprocess.DEVNULL)
    other = new_prefix()
    layers: list[MultiHostChannelLayer] = []
    try:
        hosts = [{"sentinels": [("127.0.0.1", sentinel_port)], "master_name": "mh",
                  "socket_timeout": 2}]
        for which in (prefix, other):
            layers.append(MultiHostChannelLayer(prefix=which, site=prefix, hosts=hosts,
                                                channel_memory=MiB, group_memory=MiB))
        a, b = layers
        deadline = time.monotonic() + 20
        while True:  # until the sentinel knows its master
            try:
                await a.send("site.sentinel", {"n": 0})
                break
            except RedisUnavailable:
                assert time.monotonic() < deadline, "the sentinel never answered"
                await asyncio.sleep(0.2)
        assert await asyncio.wait_for(b.receive("site.sentinel"), 5) == {"n": 0}
        theirs = await b.new_channel()
        await a.send(theirs, {"n": 1})
        assert await asyncio.wait_for(b.receive(theirs), 10) == {"n": 1}
    finally:
        for layer in layers:
            await layer.close()
        asgi_ipc.unlink(other)
        sentinel.terminate()
        sentinel.wait(10)


def test_hosts_pasted_in_other_channels_redis_forms(url):
    from asgi_ipc.multihost.redis_side import connection_options

    # channels_redis hands such a dict to redis-py's ConnectionPool as it is.
    kind, where, options = connection_options({"host": "h", "port": 7, "password": "x"}, 3)
    assert (kind, where, options["password"]) == ("address", ("h", 7), "x")
    assert "host" not in options and "port" not in options
    with pytest.raises(ValueError, match=r"hosts is a list, as in channels_redis: hosts=\["):
        MultiHostChannelLayer(prefix=new_prefix(), hosts=url)
    layer = MultiHostChannelLayer(prefix=new_prefix(), hosts=[])
    assert layer.hosts == [("localhost", 6379)]


async def test_a_receive_on_an_empty_site_wide_channel_waits_past_a_short_timeout(site):
    layer = site(redis_timeout=0.5)
    # Each pop blocks for less than the socket timeout: an empty channel is not an outage.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("thumbnails"), 1.5)
    await layer.send("thumbnails", {"n": 1})
    assert await asyncio.wait_for(layer.receive("thumbnails"), 5) == {"n": 1}


def _relay_killed_before_its_commit(prefix: str, url: str, last: tuple[int, int]) -> None:
    """In a forked child: lead the relay of ``prefix``'s store and die at the journaled write
    that moves the inbox position to ``last``, before the hold that applies it commits."""
    from asgi_ipc.engine.layout import H_RELAY_MS, H_RELAY_SEQ
    from asgi_ipc.multihost.redis_side import Keys, connection_options
    from asgi_ipc.multihost.relay import Relay
    from asgi_ipc.receiver import Receiver

    store = Receiver(prefix, 0, 0, create=False)
    words = store.engine.words

    def die_at(word: int) -> None:
        if word == H_RELAY_SEQ and (words[H_RELAY_MS], words[H_RELAY_SEQ]) == last:
            os._exit(9)

    store.engine.inject(on_write=die_at)
    Relay(store, store.engine.host_id(), connection_options(url, 5.0), Keys(prefix),
          86_400_000, lambda channel: 100, 60_000, 86_400_000).start()
    time.sleep(30)
    os._exit(0)


def test_a_relay_killed_before_its_commit_leaves_its_entries_to_the_next(url, prefix):
    """The position a killed relay wrote but never committed is rolled back before the next
    leader trims the inbox: what it covers is applied, not trimmed away."""
    import redis

    from asgi_ipc.engine.inbox import SEND
    from asgi_ipc.multihost.redis_side import Keys, connection_options
    from asgi_ipc.multihost.relay import Relay
    from asgi_ipc.receiver import Receiver

    store = Receiver(prefix, 4 * MiB, MiB)
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    host = store.engine.host_id()
    try:
        ids = [client.xadd(keys.inbox(host), {"o": SEND, "g": "", "c": b"t!x", "d": b"m%d" % n})
               for n in range(3)]
        last = tuple(int(part) for part in ids[-1].split(b"-"))
        pid = os.fork()
        if pid == 0:
            try:
                _relay_killed_before_its_commit(prefix, url, last)
            finally:
                os._exit(1)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 9  # killed where it should be
        relay = Relay(store, host, connection_options(url, 5.0), keys, 86_400_000,
                      lambda channel: 100, 60_000, 86_400_000)
        relay.start()
        # Nothing else takes the store's lock meanwhile: the relay's own first pass must not
        # trust the position the killed one wrote.
        time.sleep(2.5)
        got: list[bytes] = []

        def take() -> bool:
            found = store.engine.locked(store.engine.queues.pop, b"t!x", int(time.time() * 1000))
            if found is not None:
                got.append(found[0])
            return len(got) == 3

        deadline = time.monotonic() + PATIENCE
        while not take():
            assert time.monotonic() < deadline, f"only {got} arrived"
            time.sleep(0.01)
        relay.stop()
        assert got == [b"m0", b"m1", b"m2"]
        assert store.engine.verify() == []
    finally:
        store.close()
        for key in client.scan_iter(match=f"{{{prefix}}}*"):
            client.delete(key)
