"""The workloads of ``asgi-ipc bench`` and the run that steps through them (``Bench``).

Workloads (``--only`` takes these names):

  pingpong       round-trip latency between two processes (each receives, then sends back),
                 over each layer and over the floor: two bare asyncio processes bouncing Unix
                 datagrams
  oneway         throughput from producer processes to consumer processes, 1 -> 1 and 4 -> 4
  fanout         group_send to 10, 100 and 1000 members spread over 4 consumer processes
  fanout-1proc   group_send to 100 and 1000 members all in one other process
  fanout-10proc  group_send to 1000 members spread over 10 consumer processes
  backlog        send+receive in one process with an empty store, then with 100 000 messages
                 queued in other channels
  sizes          send+receive throughput of 100 B, 10 KiB and 1 MiB messages in one process
  memory         asgi_ipc only, from the store's own accounting (``asgi_ipc.observe.figures``):
                 shared memory per queued message and per group membership, and the channel
                 memory one 10 KiB group_send to 1000 members takes
  reap           asgi_ipc only: 1000 members of a group in 4 processes, 2 of which are killed
                 (SIGKILL); how long until their memberships are gone, and what a group_send
                 to the group costs then, over one to a group of the live members alone

The cross-process workloads (pingpong, oneway, the fan-outs) run over asgi_ipc and every peer
that can run (``layers.PEERS``). The in-process ones run over asgi_ipc, ``RedisChannelLayer`` and
``InMemoryChannelLayer`` only: the pub/sub layers keep no queue, so that a message sent to a
channel nobody has subscribed to is gone (no backlog can be built), and their send+receive in one
process is the round trip through the server that the ping-pong measures already.

Every result carries ``counted`` and ``expected``: the messages (or deliveries, or records) that
arrived intact and in order, against those that should have. A speed figure is only worth
reading when the two are equal; the exit status is 1 when any result falls short.

Every asgi_ipc store made here has a prefix of its own and is unlinked when its step ends,
whatever happens (``asgi_ipc.unlink``); every channels_redis run has a key prefix of its own and
is flushed (the pub/sub layers leave nothing in their servers); the floor's sockets live in a
directory of their own, removed after.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import unlink
from ..observe import figures
from . import roles
from .layers import (
    DATA,
    FLOOR,
    IPC,
    MEMORY,
    PEERS,
    REDIS,
    SEQ_BASE,
    KiB,
    MiB,
    clock,
    flush,
    layer_spec,
    opened,
    packed_size,
    padded_body,
)
from .pool import WorkerPool, WorkloadError
from .report import summary
from .targets import GROUP_SEND_MEMBERS, GROUP_SEND_SIZE

# The fan-out workloads: the consumer processes that hold the members (spread evenly), and the
# group sizes. Every delivery is counted, in deliveries per second.
FANOUTS = {
    "fanout": (4, (10, 100, 1000)),
    "fanout-1proc": (1, (100, 1000)),
    "fanout-10proc": (10, (1000,)),
}
WORKLOADS = ("pingpong", "oneway", *FANOUTS, "backlog", "sizes", "memory", "reap")

# The floor's sockets: on tmpfs, as the layer's doorbells are.
SHM_DIR = "/dev/shm"
FLOOR_DIR_PREFIX = "asgi_ipc_bench_floor_"


@dataclass(frozen=True)
class Scale:
    """How much work each workload does; ``seconds`` bounds each timed phase."""

    seconds: float
    stall_seconds: float  # a receiver that got nothing for this long gives up
    pingpong_warmup: int
    pingpong_rounds: int
    oneway_per_producer: int
    fanout_deliveries: int  # cap on members x group_sends, so slow backends drain in time
    backlog: int
    backlog_channels: int
    inproc_ops: int
    size_ops: dict[int, int]
    memory_messages: int
    memory_memberships: int
    reap_members: int
    reap_sends: int


FULL = Scale(
    seconds=2.0,
    stall_seconds=10.0,
    pingpong_warmup=200,
    pingpong_rounds=5000,
    oneway_per_producer=60_000,
    fanout_deliveries=100_000,
    backlog=100_000,
    backlog_channels=10_000,
    inproc_ops=20_000,
    size_ops={100: 20_000, 10 * KiB: 10_000, MiB: 200},
    memory_messages=10_000,
    memory_memberships=10_000,
    reap_members=1000,
    reap_sends=40,
)

QUICK = Scale(
    seconds=0.15,
    stall_seconds=3.0,
    pingpong_warmup=20,
    pingpong_rounds=200,
    oneway_per_producer=500,
    fanout_deliveries=2_000,
    backlog=2_000,
    backlog_channels=200,
    inproc_ops=300,
    size_ops={100: 300, 10 * KiB: 200, MiB: 5},
    memory_messages=500,
    memory_memberships=500,
    reap_members=100,
    reap_sends=4,
)

# The reap workload's member processes, of which the first half are killed; its two groups.
REAP_PROCESSES = 4
REAP_ALL, REAP_LIVE = "bench.reap.all", "bench.reap.live"
ONEWAY_CASES = ((1, 1), (4, 4))
WORKERS = 11  # the most a workload needs at once: 10 member processes and the sender


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Step:
    workload: str
    case: str
    backend: str
    label: str


class Bench:
    """One run: its scale, backends, worker pool, and everything it must clean up."""

    def __init__(self, scale: Scale, urls: dict[str, str], quiet: bool = False) -> None:
        """``urls``: the server each peer layer that can run runs against; the others are left
        out."""
        self.scale = scale
        self.urls = urls
        self.quiet = quiet
        self._pool: WorkerPool | None = None
        self._prefixes: list[str] = []
        self.results: dict[str, dict[str, dict[str, dict]]] = {}

    # -- resources --

    def pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(WORKERS)
        return self._pool

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextlib.contextmanager
    def backend(self, kind: str, **options: Any) -> Iterator[dict]:
        """A fresh store (asgi_ipc), key or subject prefix (the peers) or socket directory (the
        floor) for one step, removed after."""
        run_id = "bench" + secrets.token_hex(6)
        spec = layer_spec(kind, run_id, self.urls.get(kind), **options)
        if kind == IPC:
            self._prefixes.append(run_id)
        elif kind == FLOOR:
            spec["dir"] = tempfile.mkdtemp(prefix=FLOOR_DIR_PREFIX, dir=SHM_DIR)
        try:
            yield spec
        finally:
            if kind == IPC:
                unlink(run_id)
                self._prefixes.remove(run_id)
            elif kind == REDIS:
                with contextlib.suppress(Exception):
                    asyncio.run(flush(spec))
            elif kind == FLOOR:
                shutil.rmtree(spec["dir"], ignore_errors=True)

    def close(self) -> None:
        self._drop_pool()
        for prefix in self._prefixes:
            unlink(prefix)
        self._prefixes.clear()

    # -- steps --

    def steps(self, workloads: list[str]) -> list[Step]:
        cross = [IPC] + [peer for peer in PEERS if peer in self.urls]
        inproc = [IPC] + ([REDIS] if REDIS in self.urls else []) + [MEMORY]
        steps = []
        for workload in workloads:
            if workload == "pingpong":
                steps += [
                    Step(workload, "2 processes", b, "ping-pong") for b in [*cross, FLOOR]
                ]
            elif workload == "oneway":
                for producers, consumers in ONEWAY_CASES:
                    case = f"{producers}->{consumers}"
                    steps += [Step(workload, case, b, f"one-way {case}") for b in cross]
            elif workload in FANOUTS:
                processes, sizes = FANOUTS[workload]
                for members in sizes:
                    label = f"group fan-out {members} {spread(processes)}"
                    steps += [Step(workload, str(members), b, label) for b in cross]
            elif workload == "backlog":
                steps += [Step(workload, "send+receive", b, "backlog") for b in inproc]
            elif workload == "sizes":
                for size in self.scale.size_ops:
                    label = f"message size {size_label(size)}"
                    steps += [Step(workload, size_label(size), b, label) for b in inproc]
            elif workload == "memory":
                steps.append(Step(workload, "overhead", IPC, "shared-memory overhead"))
                steps.append(Step(workload, "group_send", IPC, "group_send memory"))
            elif workload == "reap":
                steps.append(Step(workload, "half killed", IPC, "members killed"))
        return steps

    def run(self, workloads: list[str]) -> dict:
        steps = self.steps(workloads)
        for number, step in enumerate(steps, 1):
            self.progress(f"[{number}/{len(steps)}] {step.label} / {step.backend} ...")
            started = clock()
            try:
                runner = "fanout" if step.workload in FANOUTS else step.workload
                result = getattr(self, f"run_{runner}")(step)
            except WorkloadError as exc:
                # The pool may be mid-task in some worker: replace it for the next steps.
                self._drop_pool()
                result = {"error": str(exc), "counted": 0, "expected": None}
            except Exception:
                result = {"error": traceback.format_exc(), "counted": 0, "expected": None}
            result["ok"] = "error" not in result and result["counted"] == result["expected"]
            result["seconds"] = round(clock() - started, 2)
            self.results.setdefault(step.workload, {}).setdefault(step.case, {})[
                step.backend
            ] = result
            self.progress(f"    {summary(result)}")
        return self.results

    def progress(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def _timeout(self) -> float:
        # Setup, the timed phase, draining, the receivers' own stall limit, and some slack.
        return 60 + 4 * self.scale.seconds + self.scale.stall_seconds

    # -- cross-process workloads --

    def run_pingpong(self, step: Step) -> dict:
        s = self.scale
        common = {"size": 100, "stall_seconds": s.stall_seconds}
        if step.backend == FLOOR:
            ping_role, echo_role = roles.role_floor_ping, roles.role_floor_echo
        else:
            ping_role, echo_role = roles.role_ping, roles.role_echo
        with self.backend(step.backend, capacity=100) as spec:
            ping, echo = self.pool().run(
                [
                    (ping_role, spec, {**common, "peer": 1, "warmup": s.pingpong_warmup,
                                       "rounds": s.pingpong_rounds, "seconds": s.seconds}),
                    (echo_role, spec, {**common, "peer": 0}),
                ],
                self._timeout(),
            )
        latencies = sorted(ping.pop("latencies"))
        result = {
            "counted": ping["replies"],
            "expected": ping["sent"],
            "echoed": echo["echoed"],
            "rounds": ping["rounds"],
            "stalled": ping["stalled"] or echo["stalled"],
        }
        if latencies:
            result.update(
                p50_us=percentile(latencies, 50) * 1e6,
                p99_us=percentile(latencies, 99) * 1e6,
                mean_us=statistics.fmean(latencies) * 1e6,
            )
        return result

    def run_oneway(self, step: Step) -> dict:
        s = self.scale
        producers, consumers = (int(n) for n in step.case.split("->"))
        limit = max(s.oneway_per_producer // producers, 1)
        tasks = []
        # A capacity above what a producer can queue: the figure is the transport's, not the
        # back-pressure's. Producers still retry on ChannelFull, and count how often they did.
        with self.backend(step.backend, capacity=2 * s.oneway_per_producer) as spec:
            for p in range(producers):
                tasks.append((roles.role_producer, spec, {
                    "index": p, "consumers": list(range(producers, producers + consumers)),
                    "limit": limit, "seconds": s.seconds, "size": 100,
                }))
            for _ in range(consumers):
                tasks.append((roles.role_consumer, spec, {
                    "producers": producers, "stall_seconds": s.stall_seconds,
                }))
            results = self.pool().run(tasks, self._timeout())
        made, got = results[:producers], results[producers:]
        sent = sum(r["sent"] for r in made)
        counted = sum(r["received"] for r in got)
        elapsed = max(r["end"] for r in got) - min(r["start"] for r in made)
        return {
            "counted": counted,
            "expected": sent,
            "announced": sum(r["announced"] for r in got),
            "full_retries": sum(r["retries"] for r in made),
            "msg_per_s": counted / elapsed if elapsed > 0 else None,
            "elapsed_s": elapsed,
            "stalled": any(r["stalled"] for r in got),
        }

    def run_fanout(self, step: Step) -> dict:
        s = self.scale
        members = int(step.case)
        processes = FANOUTS[step.workload][0]
        sends = max(s.fanout_deliveries // members, 2)
        share = [members // processes + (i < members % processes) for i in range(processes)]
        group = "bench.fanout"
        # Room for every message and the stop on every member: any drop is the layer's.
        with self.backend(step.backend, capacity=sends + 10, group_memory=20 * MiB) as spec:
            tasks = [
                (roles.role_member, spec,
                 {"members": n, "group": group, "stall_seconds": s.stall_seconds})
                for n in share if n
            ]
            tasks.append((roles.role_group_sender, spec, {
                "group": group, "limit": sends, "seconds": s.seconds, "size": 100,
            }))
            results = self.pool().run(tasks, self._timeout())
        sender, got = results[-1], results[:-1]
        expected = sender["sent"] * members
        counted = sum(r["received"] for r in got)
        elapsed = max(r["end"] for r in got) - sender["start"]
        return {
            "counted": counted,
            "expected": expected,
            "drops": expected - counted,
            "members": sum(r["members"] for r in got),
            "processes": len(got),
            "group_sends": sender["sent"],
            "deliveries_per_s": counted / elapsed if elapsed > 0 else None,
            # What the sender alone managed: an upper bound on deliveries/s, met only when the
            # receivers keep up.
            "group_send_per_s": sender["sent"] / max(sender["end"] - sender["start"], 1e-9),
            "enqueued_per_s": expected / max(sender["end"] - sender["start"], 1e-9),
            "elapsed_s": elapsed,
            "members_still_waiting": sum(r["waiting"] for r in got),
            "stalled": any(r["stalled"] for r in got),
        }

    # -- in-process workloads --

    def run_backlog(self, step: Step) -> dict:
        s = self.scale
        options = {"capacity": 1000}
        if step.backend == IPC:
            options["channel_memory"] = 256 * MiB
        with self.backend(step.backend, **options) as spec:
            return asyncio.run(_backlog(spec, s))

    def run_sizes(self, step: Step) -> dict:
        size = size_from_label(step.case)
        with self.backend(step.backend, capacity=100) as spec:
            return asyncio.run(_sizes(spec, size, self.scale))

    def run_memory(self, step: Step) -> dict:
        if step.case == "group_send":
            # Room for a full copy per member, as the store keeps today.
            with self.backend(IPC, channel_memory=64 * MiB, group_memory=4 * MiB) as spec:
                return asyncio.run(_group_send_memory(spec))
        with self.backend(IPC, channel_memory=64 * MiB, group_memory=16 * MiB,
                          capacity=self.scale.memory_messages + 1) as spec:
            return asyncio.run(_memory(spec, self.scale))

    def run_reap(self, step: Step) -> dict:
        # Room for every message of the run on every member: a skipped one would be a drop.
        with self.backend(IPC, capacity=4 * self.scale.reap_sends) as spec:
            return asyncio.run(_reap(spec, self.scale, self._timeout()))


async def _send_receive(layer: Any, channel: str, body: bytes, seconds: float,
                        max_ops: int) -> tuple[int, int, float]:
    """Send then receive on one channel until ``max_ops`` or ``seconds``: (ops, intact, s)."""
    ops = intact = 0
    started = time.perf_counter()
    deadline = started + seconds
    while ops < max_ops and (ops < 20 or ops % 16 or time.perf_counter() < deadline):
        seq = SEQ_BASE + ops
        await layer.send(channel, {"type": DATA, "seq": seq, "body": body})
        message = await layer.receive(channel)
        intact += message["seq"] == seq and len(message["body"]) == len(body)
        ops += 1
    return ops, intact, time.perf_counter() - started


async def _best_rate(layer: Any, channel: str, body: bytes, scale: Scale,
                     repeats: int = 3) -> tuple[float, int, int]:
    """The best ops/s of ``repeats`` runs (the least disturbed by the rest of the machine)."""
    best, ops_total, intact_total = 0.0, 0, 0
    for _ in range(repeats):
        ops, intact, elapsed = await _send_receive(
            layer, channel, body, scale.seconds / repeats, scale.inproc_ops // repeats
        )
        best = max(best, ops / elapsed)
        ops_total += ops
        intact_total += intact
    return best, ops_total, intact_total


async def _backlog(spec: dict, scale: Scale) -> dict:
    async with opened(spec) as layer:
        body = padded_body(100)
        hot = "bench.hot"
        empty, ops1, intact1 = await _best_rate(layer, hot, body, scale)
        per_channel = -(-scale.backlog // scale.backlog_channels)
        names = [f"bench.cold{c}" for c in range(scale.backlog_channels)]
        message = {"type": DATA, "seq": SEQ_BASE, "body": body}
        queued = 0
        started = clock()
        if spec["kind"] == REDIS:
            # One round trip per send: overlap them, or filling takes longer than measuring.
            sends = [(names[i % len(names)]) for i in range(scale.backlog)]
            # channels_redis allows 100 connections per pool; stay well under.
            for i in range(0, len(sends), 50):
                await asyncio.gather(*(layer.send(n, message) for n in sends[i:i + 50]))
            queued = len(sends)
        else:
            for i in range(scale.backlog):
                await layer.send(names[i % len(names)], message)
                queued += 1
        fill_seconds = clock() - started
        loaded, ops2, intact2 = await _best_rate(layer, hot, body, scale)
    return {
        "counted": intact1 + intact2 + queued,
        "expected": ops1 + ops2 + scale.backlog,
        "queued_elsewhere": queued,
        "channels_elsewhere": len(names),
        "per_channel": per_channel,
        "empty_ops_per_s": empty,
        "loaded_ops_per_s": loaded,
        "loaded_over_empty": loaded / empty if empty else None,
        "fill_seconds": fill_seconds,
    }


async def _sizes(spec: dict, size: int, scale: Scale) -> dict:
    async with opened(spec) as layer:
        body = padded_body(size)
        actual = packed_size({"type": DATA, "seq": SEQ_BASE, "body": body})
        max_ops = scale.size_ops[size]
        # A first message settles allocations and connections before the clock starts.
        await _send_receive(layer, "bench.size", body, 0, 1)
        ops, intact, elapsed = await _send_receive(
            layer, "bench.size", body, scale.seconds, max_ops
        )
    return {
        "counted": intact,
        "expected": ops,
        "message_bytes": actual,
        "ops_per_s": ops / elapsed,
        "mb_per_s": ops * actual / elapsed / 1e6,
    }


async def _open_store(layer: Any) -> None:
    # A layer creates its store on its first operation; the figures read an existing one.
    await layer.flush()


async def _memory(spec: dict, scale: Scale) -> dict:
    prefix = spec["prefix"]
    async with opened(spec) as layer:
        await _open_store(layer)
        body = padded_body(100)
        payload = packed_size({"type": DATA, "seq": SEQ_BASE, "body": body})
        before = figures(prefix)
        for i in range(scale.memory_messages):
            await layer.send("bench.memory", {"type": DATA, "seq": SEQ_BASE + i, "body": body})
        after = figures(prefix)
        messages = after.messages - before.messages
        message_bytes = after.channel_memory.used - before.channel_memory.used

        # Plain names as long as new_channel()'s; then new_channel()'s own, whose memberships
        # also link their channel to them, for its owner's death (two words more each).
        plain = [f"bench.member.{uuid.uuid4().hex}"
                 for _ in range(scale.memory_memberships)]
        memberships, per_membership = await _memberships(layer, prefix, plain)
        owned = [await layer.new_channel() for _ in range(scale.memory_memberships)]
        owned_memberships, per_owned = await _memberships(layer, prefix, owned)
        problems = figures(prefix, check=True).problems
    return {
        "counted": messages + memberships + owned_memberships,
        "expected": scale.memory_messages + 2 * scale.memory_memberships,
        "messages": messages,
        "payload_bytes": payload,
        "bytes_per_message": message_bytes / max(messages, 1),
        "overhead_per_message": message_bytes / max(messages, 1) - payload,
        "memberships": memberships,
        "channel_name_bytes": len(plain[0]) if plain else 0,
        "bytes_per_membership": per_membership,
        "memberships_per_mib": MiB / per_membership if per_membership else None,
        "bytes_per_owned_membership": per_owned,
        "problems": problems,
    }


async def _memberships(layer: Any, prefix: str, channels: list[str]) -> tuple[int, float]:
    """Add ``channels`` to 10 groups: (memberships made, group memory each takes)."""
    before = figures(prefix)
    for i, channel in enumerate(channels):
        await layer.group_add(f"bench.group{i % 10}", channel)
    after = figures(prefix)
    made = after.memberships - before.memberships
    return made, (after.group_memory.used - before.group_memory.used) / max(made, 1)


async def _reap(spec: dict, scale: Scale, timeout: float) -> dict:
    """Kill half the members of a group: how long until their memberships are gone (found
    dead by the periodic checks of the other members' processes, and reaped), and what a
    group_send costs then, over one to a group of the live members alone. The two are timed
    in turns, and the fastest of each compared (the least disturbed by the rest of the
    machine)."""
    context = multiprocessing.get_context("spawn")
    share = scale.reap_members // REAP_PROCESSES
    doomed = REAP_PROCESSES // 2
    live = share * (REAP_PROCESSES - doomed)
    members: list[tuple[Any, Any]] = []
    try:
        for index in range(REAP_PROCESSES):
            parent, child = context.Pipe()
            groups = [REAP_ALL] if index < doomed else [REAP_ALL, REAP_LIVE]
            process = context.Process(target=roles.reap_member, daemon=True,
                                      args=(child, spec, {"members": share, "groups": groups}))
            process.start()
            child.close()
            members.append((process, parent))
        for _process, conn in members:
            if not conn.poll(timeout):
                raise RuntimeError("a member process never got ready")
            conn.recv()
        async with opened(spec) as layer:
            store = layer.engine()
            before = store.inspect(check=False)["memberships"]
            for process, _conn in members[:doomed]:
                os.kill(process.pid, signal.SIGKILL)
            killed = clock()
            while store.inspect(check=False)["memberships"] > 2 * live:
                if clock() - killed > timeout:
                    raise RuntimeError("the memberships of the killed processes never went")
                await asyncio.sleep(0.002)
            reap_seconds = clock() - killed
            body = padded_body(100)
            costs: dict[str, list[float]] = {REAP_ALL: [], REAP_LIVE: []}
            for n in range(scale.reap_sends):
                for group in (REAP_ALL, REAP_LIVE) if n % 2 else (REAP_LIVE, REAP_ALL):
                    started = time.perf_counter()
                    await layer.group_send(group, {"type": DATA, "seq": n, "body": body})
                    costs[group].append(time.perf_counter() - started)
            drained = clock()
            while store.inspect(check=False)["messages"] and clock() - drained < timeout:
                await asyncio.sleep(0.01)
            report = store.inspect()
        received = 0
        for _process, conn in members[doomed:]:
            conn.send("stop")
            if not conn.poll(timeout):
                raise RuntimeError("a member process never stopped")
            received += conn.recv()[1]
    finally:
        for process, conn in members:
            if process.is_alive():
                process.kill()
            process.join(5)
            conn.close()
    all_cost, live_cost = (min(costs[group]) for group in (REAP_ALL, REAP_LIVE))
    return {
        "counted": received,
        "expected": 2 * scale.reap_sends * live,
        "memberships_before": before,
        "memberships_after": report["memberships"],
        "reaped_memberships": report["counters"]["reaped_memberships"],
        "reap_seconds": reap_seconds,
        "group_send_us": all_cost * 1e6,
        "live_group_send_us": live_cost * 1e6,
        "over_live_alone": all_cost / live_cost,
        "problems": report["problems"],
    }


async def _group_send_memory(spec: dict) -> dict:
    """The channel memory one group_send of a 10 KiB message to 1000 members takes.

    Each member's channel holds one small message first: a consumer's channel has a record in
    the store already (its waiting receive registered there), so what is measured is what the
    group_send adds, the payload and what each member needs to reach it. Every delivery is then
    received and checked."""
    prefix, members = spec["prefix"], GROUP_SEND_MEMBERS
    group = "bench.memory"
    body = padded_body(GROUP_SEND_SIZE)
    message = {"type": DATA, "seq": SEQ_BASE + 1, "body": body}
    async with opened(spec) as layer:
        channels = [await layer.new_channel() for _ in range(members)]
        for channel in channels:
            await layer.send(channel, {"type": DATA, "seq": SEQ_BASE, "body": b""})
            await layer.group_add(group, channel)
        before = figures(prefix)
        await layer.group_send(group, message)
        after = figures(prefix, check=True)
        intact = 0
        for channel in channels:
            first, second = await layer.receive(channel), await layer.receive(channel)
            intact += first["seq"] == SEQ_BASE and second == message
    used = after.channel_memory.used - before.channel_memory.used
    payload = packed_size(message)
    return {
        "counted": min(intact, after.messages - before.messages),
        "expected": members,
        "members": members,
        "payload_bytes": payload,
        "channel_bytes": used,
        "bytes_per_member": (used - payload) / members,
        "problems": after.problems,
    }


# --- labels --------------------------------------------------------------------------------------


def spread(processes: int) -> str:
    return "in 1 process" if processes == 1 else f"over {processes} processes"


def percentile(ordered: list[float], pct: float) -> float:
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def size_label(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB} MiB"
    if size >= KiB:
        return f"{size // KiB} KiB"
    return f"{size} B"


def size_from_label(label: str) -> int:
    number, unit = label.split()
    return int(number) * {"B": 1, "KiB": KiB, "MiB": MiB}[unit]

