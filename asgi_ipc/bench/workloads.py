"""``asgi-ipc bench``: asgi_ipc measured against channels_redis and channels'
InMemoryChannelLayer on this machine, in one run, so that the ratios compare like with like.

This module owns the workloads, the pool of worker processes that runs their cross-process
halves, the private ``redis-server`` it starts on a free 127.0.0.1 port (and always stops), and
the report: a table on stdout, or one JSON document with ``--json``. Progress goes to stderr.

Workloads (``--only`` takes these names):

  pingpong  round-trip latency between two processes (each receives, then sends back)
  oneway    throughput from producer processes to consumer processes, 1 -> 1 and 4 -> 4
  fanout    group_send to 10, 100 and 1000 members spread over 4 consumer processes
  backlog   send+receive in one process with an empty store, then with 100 000 messages
            queued in other channels
  sizes     send+receive throughput of 100 B, 10 KiB and 1 MiB messages in one process
  memory    asgi_ipc only: shared memory per queued message and per group membership

Every result carries ``counted`` and ``expected``: the messages (or deliveries, or records) that
arrived intact and in order, against those that should have. A speed figure is only worth
reading when the two are equal; the exit status is 1 when any result falls short.

Every asgi_ipc store made here has a prefix of its own and is unlinked when its workload ends,
whatever happens; every channels_redis run has a key prefix of its own and is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
from channels.exceptions import ChannelFull

MiB = 1024 * 1024
KiB = 1024

IPC = "asgi_ipc"
REDIS = "channels_redis"
MEMORY = "in_memory"
BACKENDS = (IPC, REDIS, MEMORY)

WORKLOADS = ("pingpong", "oneway", "fanout", "backlog", "sizes", "memory")

DATA = "bench.data"
STOP = "bench.stop"
# Sequence numbers are offset so msgpack always encodes them in 9 bytes: every message of a run
# then packs to exactly the size asked for, however far the count goes.
SEQ_BASE = 1 << 40

# The clock every process stamps with. On Linux it is CLOCK_MONOTONIC, which is one clock for
# the whole machine, so a producer's start and a consumer's end can be subtracted.
clock = time.monotonic


@dataclass(frozen=True)
class Scale:
    """How much work each workload does; ``seconds`` bounds each timed phase."""

    seconds: float
    stall_seconds: float  # a receiver that got nothing for this long gives up
    pingpong_warmup: int
    pingpong_rounds: int
    oneway_per_producer: int
    fanout_sizes: tuple[int, ...]
    fanout_deliveries: int  # cap on members x group_sends, so slow backends drain in time
    backlog: int
    backlog_channels: int
    inproc_ops: int
    size_ops: dict[int, int]
    memory_messages: int
    memory_memberships: int


FULL = Scale(
    seconds=2.0,
    stall_seconds=10.0,
    pingpong_warmup=200,
    pingpong_rounds=5000,
    oneway_per_producer=60_000,
    fanout_sizes=(10, 100, 1000),
    fanout_deliveries=100_000,
    backlog=100_000,
    backlog_channels=10_000,
    inproc_ops=20_000,
    size_ops={100: 20_000, 10 * KiB: 10_000, MiB: 200},
    memory_messages=10_000,
    memory_memberships=10_000,
)

QUICK = Scale(
    seconds=0.15,
    stall_seconds=3.0,
    pingpong_warmup=20,
    pingpong_rounds=200,
    oneway_per_producer=500,
    fanout_sizes=(10, 100, 1000),
    fanout_deliveries=2_000,
    backlog=2_000,
    backlog_channels=200,
    inproc_ops=300,
    size_ops={100: 300, 10 * KiB: 200, MiB: 5},
    memory_messages=500,
    memory_memberships=500,
)

FANOUT_CONSUMERS = 4
ONEWAY_CASES = ((1, 1), (4, 4))
WORKERS = 8  # the most a workload needs at once: 4 producers and 4 consumers


class WorkloadError(Exception):
    """A workload could not finish: a worker failed, died or stopped answering."""


class _Aborted(Exception):
    """Another worker of the same workload failed to start: give up quietly."""


# --- messages --------------------------------------------------------------------------------


def padded_body(size: int, **fields: Any) -> bytes:
    """A ``body`` that makes ``{"type", "seq", **fields, "body"}`` pack to ``size`` bytes (or
    the nearest size below that msgpack can reach)."""
    template = {"type": DATA, "seq": SEQ_BASE, **fields, "body": b""}
    base = len(msgpack.packb(template, use_bin_type=True))
    guess = max(size - base, 0)
    # A longer bin needs a longer length prefix; step down until the total fits.
    for length in range(guess, max(guess - 8, -1), -1):
        template["body"] = b"x" * length
        if len(msgpack.packb(template, use_bin_type=True)) <= size:
            return template["body"]
    return b""


def packed_size(message: dict) -> int:
    return len(msgpack.packb(message, use_bin_type=True))


# --- layers ----------------------------------------------------------------------------------


def layer_spec(kind: str, run_id: str, redis_url: str | None, **options: Any) -> dict:
    """What a process needs to build its own layer of the backend under test (picklable)."""
    return {"kind": kind, "prefix": run_id, "redis_url": redis_url, **options}


def make_layer(spec: dict) -> Any:
    kind = spec["kind"]
    capacity = spec.get("capacity", 100)
    expiry = spec.get("expiry", 600)
    if kind == IPC:
        from ..layer import IPCChannelLayer

        return IPCChannelLayer(
            prefix=spec["prefix"],
            channel_memory=spec.get("channel_memory", 100 * MiB),
            group_memory=spec.get("group_memory", 20 * MiB),
            capacity=capacity,
            expiry=expiry,
        )
    if kind == REDIS:
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(
            hosts=[spec["redis_url"]],
            prefix=spec["prefix"] + ":",
            capacity=capacity,
            expiry=expiry,
        )
    if kind == MEMORY:
        from channels.layers import InMemoryChannelLayer

        return InMemoryChannelLayer(capacity=capacity, expiry=expiry)
    raise ValueError(f"unknown backend {kind!r}")


async def close_layer(layer: Any) -> None:
    if hasattr(layer, "close_pools"):
        await layer.close_pools()
    elif hasattr(layer, "close"):
        await layer.close()


@contextlib.asynccontextmanager
async def opened(spec: dict) -> AsyncIterator[Any]:
    layer = make_layer(spec)
    try:
        yield layer
    finally:
        await close_layer(layer)


async def send_retrying(layer: Any, channel: str, message: dict) -> int:
    """Send, waiting a little whenever the channel is full; returns how often it was."""
    retries = 0
    while True:
        try:
            await layer.send(channel, message)
            return retries
        except ChannelFull:
            retries += 1
            await asyncio.sleep(0.0005)


async def guarded(work: Any, progress: Callable[[], int], stall_seconds: float) -> bool:
    """Run ``work`` until it ends, or until ``progress()`` has not moved for ``stall_seconds``
    (a receiver that will never be woken); False, with ``work`` cancelled, in the second case."""
    task = asyncio.ensure_future(work)
    last, since = progress(), clock()
    while True:
        done, _ = await asyncio.wait([task], timeout=0.1)
        if done:
            task.result()
            return True
        now, seen = clock(), progress()
        if seen != last:
            last, since = seen, now
        elif now - since > stall_seconds:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False


# --- worker processes ------------------------------------------------------------------------
#
# A role runs in a worker: it builds its layer, does its setup, then ``handshake`` tells the main
# process it is ready (with what others need to know, such as its channel names) and waits for
# the word to start, which carries what every worker of the workload said. The main process
# sends that word only once all of them are ready, so the timed part starts together.


def handshake(conn: Any, info: dict) -> list[dict]:
    conn.send(("ready", info))
    peers = conn.recv()
    if peers is None:
        raise _Aborted
    return peers


async def role_ping(conn: Any, spec: dict, params: dict) -> dict:
    async with opened(spec) as layer:
        inbox = await layer.new_channel()
        peers = handshake(conn, {"inbox": inbox})
        target = peers[params["peer"]]["inbox"]
        body = padded_body(params["size"])
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
                await layer.send(target, {"type": DATA, "seq": SEQ_BASE + i, "body": body})
                reply = await layer.receive(inbox)
                elapsed = time.perf_counter() - started
                if reply["seq"] == SEQ_BASE + i:
                    state["replies"] += 1
                if i >= warmup:
                    latencies.append(elapsed)

        finished = await guarded(
            run(), lambda: state["replies"] + len(latencies), params["stall_seconds"]
        )
        await layer.send(target, {"type": STOP})
    rounds_done = len(latencies)
    return {
        "rounds": rounds_done,
        "replies": state["replies"],
        "sent": warmup + rounds_done,
        "stalled": not finished,
        "latencies": latencies,
    }


async def role_echo(conn: Any, spec: dict, params: dict) -> dict:
    async with opened(spec) as layer:
        inbox = await layer.new_channel()
        peers = handshake(conn, {"inbox": inbox})
        target = peers[params["peer"]]["inbox"]
        state = {"echoed": 0}

        async def run() -> None:
            while True:
                message = await layer.receive(inbox)
                if message["type"] == STOP:
                    return
                await layer.send(target, message)
                state["echoed"] += 1

        finished = await guarded(run(), lambda: state["echoed"], params["stall_seconds"])
    return {"echoed": state["echoed"], "stalled": not finished}


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


ROLES: dict[str, Callable[..., Any]] = {
    "ping": role_ping,
    "echo": role_echo,
    "producer": role_producer,
    "consumer": role_consumer,
    "member": role_member,
    "group_sender": role_group_sender,
}


def _worker_main(conn: Any) -> None:
    # The main process decides when workers stop (and cleans up after them); a Ctrl-C reaches
    # the whole process group, so it is ignored here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        role, spec, params = task
        try:
            reply = ("done", asyncio.run(ROLES[role](conn, spec, params)))
        except _Aborted:
            reply = ("done", {"aborted": True})
        except BaseException:
            reply = ("error", f"{role} ({spec['kind']}): {traceback.format_exc()}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class WorkerPool:
    """Worker processes started once (spawn) and reused by every cross-process workload."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._procs = []
        self._conns = []
        for number in range(size):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_worker_main, args=(child,), name=f"asgi-ipc-bench-{number}", daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self._busy = False

    def run(self, tasks: list[tuple[str, dict, dict]], timeout: float) -> list[dict]:
        """Run one role per task in its own worker; their results, in task order."""
        self._busy = True
        deadline = clock() + timeout
        conns = self._conns[: len(tasks)]
        for conn, task in zip(conns, tasks, strict=True):
            conn.send(task)
        first = [self._receive(conn, deadline) for conn in conns]
        failed = any(kind != "ready" for kind, _ in first)
        infos = [payload for _, payload in first]
        for conn, (kind, _) in zip(conns, first, strict=True):
            if kind == "ready":
                conn.send(None if failed else infos)
        final = [
            self._receive(conn, deadline) if kind == "ready" else (kind, payload)
            for conn, (kind, payload) in zip(conns, first, strict=True)
        ]
        self._busy = False
        errors = [payload for kind, payload in final if kind == "error"]
        if errors:
            raise WorkloadError(errors[0].strip())
        return [payload for _, payload in final]

    def _receive(self, conn: Any, deadline: float) -> tuple[str, Any]:
        remaining = deadline - clock()
        if remaining <= 0 or not conn.poll(remaining):
            raise WorkloadError("a worker process did not answer in time")
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise WorkloadError("a worker process died") from None

    def close(self) -> None:
        if not self._busy:
            # Idle workers are between tasks: ask them to leave. Busy ones (an interrupted or
            # failed workload) would not read the request; they are killed below.
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.send(None)
            for proc in self._procs:
                proc.join(2)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for conn in self._conns:
            conn.close()


# --- redis-server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A throw-away redis-server on a free 127.0.0.1 port: no persistence, a temp dir."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.workdir = ""
        self.version = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def __enter__(self) -> RedisServer:
        self.workdir = tempfile.mkdtemp(prefix="asgi_ipc_bench_redis_")
        try:
            # The free port can be taken between our probe and the server's bind: try again.
            for _ in range(3):
                self.port = _free_port()
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", self.workdir],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    # A process group of its own: a Ctrl-C at the terminal must not kill it under
                    # a running workload; it is stopped here, after the workloads.
                    start_new_session=True,
                )
                deadline = clock() + 10
                while clock() < deadline and self.proc.poll() is None:
                    if _redis_ping(self.port):
                        self.version = subprocess.run(
                            [self.binary, "--version"], capture_output=True, text=True
                        ).stdout.strip()
                        return self
                    time.sleep(0.05)
                self._stop()
            raise RuntimeError(f"{self.binary} did not start")
        except BaseException:
            self._stop()
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __exit__(self, *exc: object) -> None:
        self._stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Step:
    workload: str
    case: str
    backend: str
    label: str


class Bench:
    """One run: its scale, backends, worker pool, and everything it must clean up."""

    def __init__(self, scale: Scale, redis_url: str | None, quiet: bool = False) -> None:
        self.scale = scale
        self.redis_url = redis_url
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
        """A fresh store (asgi_ipc) or key prefix (channels_redis) for one step, removed after."""
        run_id = "bench" + secrets.token_hex(6)
        spec = layer_spec(kind, run_id, self.redis_url, **options)
        if kind == IPC:
            self._prefixes.append(run_id)
        try:
            yield spec
        finally:
            if kind == IPC:
                from ..segment import unlink

                unlink(run_id)
                self._prefixes.remove(run_id)
            elif kind == REDIS:
                with contextlib.suppress(Exception):
                    asyncio.run(_flush(spec))

    def close(self) -> None:
        self._drop_pool()
        from ..segment import unlink

        for prefix in self._prefixes:
            unlink(prefix)
        self._prefixes.clear()

    # -- steps --

    def steps(self, workloads: list[str]) -> list[Step]:
        cross = [IPC] + ([REDIS] if self.redis_url else [])
        inproc = cross + [MEMORY]
        steps = []
        for workload in workloads:
            if workload == "pingpong":
                steps += [Step(workload, "2 processes", b, "ping-pong") for b in cross]
            elif workload == "oneway":
                for producers, consumers in ONEWAY_CASES:
                    case = f"{producers}->{consumers}"
                    steps += [Step(workload, case, b, f"one-way {case}") for b in cross]
            elif workload == "fanout":
                for members in self.scale.fanout_sizes:
                    steps += [
                        Step(workload, str(members), b, f"group fan-out {members}") for b in cross
                    ]
            elif workload == "backlog":
                steps += [Step(workload, "send+receive", b, "backlog") for b in inproc]
            elif workload == "sizes":
                for size in self.scale.size_ops:
                    label = f"message size {_size_label(size)}"
                    steps += [Step(workload, _size_label(size), b, label) for b in inproc]
            elif workload == "memory":
                steps.append(Step(workload, "overhead", IPC, "shared-memory overhead"))
        return steps

    def run(self, workloads: list[str]) -> dict:
        steps = self.steps(workloads)
        for number, step in enumerate(steps, 1):
            self.progress(f"[{number}/{len(steps)}] {step.label} / {step.backend} ...")
            started = clock()
            try:
                result = getattr(self, f"run_{step.workload}")(step)
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
            self.progress(f"    {_summary(result)}")
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
        with self.backend(step.backend, capacity=100) as spec:
            ping, echo = self.pool().run(
                [
                    ("ping", spec, {**common, "peer": 1, "warmup": s.pingpong_warmup,
                                    "rounds": s.pingpong_rounds, "seconds": s.seconds}),
                    ("echo", spec, {**common, "peer": 0}),
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
                p50_us=_percentile(latencies, 50) * 1e6,
                p99_us=_percentile(latencies, 99) * 1e6,
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
                tasks.append(("producer", spec, {
                    "index": p, "consumers": list(range(producers, producers + consumers)),
                    "limit": limit, "seconds": s.seconds, "size": 100,
                }))
            for _ in range(consumers):
                tasks.append(("consumer", spec, {
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
        sends = max(s.fanout_deliveries // members, 2)
        share = [members // FANOUT_CONSUMERS + (i < members % FANOUT_CONSUMERS)
                 for i in range(FANOUT_CONSUMERS)]
        group = "bench.fanout"
        # Room for every message and the stop on every member: any drop is the layer's.
        with self.backend(step.backend, capacity=sends + 10, group_memory=20 * MiB) as spec:
            tasks = [
                ("member", spec, {"members": n, "group": group, "stall_seconds": s.stall_seconds})
                for n in share if n
            ]
            tasks.append(("group_sender", spec, {
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
        size = _size_from_label(step.case)
        with self.backend(step.backend, capacity=100) as spec:
            return asyncio.run(_sizes(spec, size, self.scale))

    def run_memory(self, step: Step) -> dict:
        with self.backend(IPC, channel_memory=64 * MiB, group_memory=16 * MiB,
                          capacity=self.scale.memory_messages + 1) as spec:
            return asyncio.run(_memory(spec, self.scale))


async def _flush(spec: dict) -> None:
    async with opened(spec) as layer:
        await layer.flush()


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


async def _memory(spec: dict, scale: Scale) -> dict:
    async with opened(spec) as layer:
        store = layer._open()
        body = padded_body(100)
        payload = packed_size({"type": DATA, "seq": SEQ_BASE, "body": body})
        before = store.inspect()
        for i in range(scale.memory_messages):
            await layer.send("bench.memory", {"type": DATA, "seq": SEQ_BASE + i, "body": body})
        after = store.inspect()
        messages = after["messages"] - before["messages"]
        message_bytes = after["channel_memory"]["used"] - before["channel_memory"]["used"]

        groups = 10
        channels = [await layer.new_channel() for _ in range(scale.memory_memberships)]
        before_groups = store.inspect()
        for i, channel in enumerate(channels):
            await layer.group_add(f"bench.group{i % groups}", channel)
        after_groups = store.inspect()
        memberships = after_groups["memberships"] - before_groups["memberships"]
        group_bytes = (
            after_groups["group_memory"]["used"] - before_groups["group_memory"]["used"]
        )
        problems = after_groups["problems"]
    per_membership = group_bytes / max(memberships, 1)
    return {
        "counted": messages + memberships,
        "expected": scale.memory_messages + scale.memory_memberships,
        "messages": messages,
        "payload_bytes": payload,
        "bytes_per_message": message_bytes / max(messages, 1),
        "overhead_per_message": message_bytes / max(messages, 1) - payload,
        "memberships": memberships,
        "channel_name_bytes": len(channels[0]) if channels else 0,
        "bytes_per_membership": per_membership,
        "memberships_per_mib": MiB / per_membership if per_membership else None,
        "problems": problems,
    }


# --- report ----------------------------------------------------------------------------------


def _percentile(ordered: list[float], pct: float) -> float:
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def _size_label(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB} MiB"
    if size >= KiB:
        return f"{size // KiB} KiB"
    return f"{size} B"


def _size_from_label(label: str) -> int:
    number, unit = label.split()
    return int(number) * {"B": 1, "KiB": KiB, "MiB": MiB}[unit]


def _num(value: float | None) -> str:
    """Three significant figures, with k and M for the big ones."""
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            value /= limit
            return f"{value:.3g}{suffix}"
    return f"{value:.3g}"


def _summary(result: dict) -> str:
    if "error" in result:
        return "ERROR: " + result["error"].splitlines()[-1]
    verdict = "all counted" if result["ok"] else "MISSING MESSAGES"
    if result.get("members_still_waiting"):
        verdict += f": {result['members_still_waiting']} members never woken"
    return (f"{result['counted']} of {result['expected']} counted ({verdict}), "
            f"{result['seconds']} s")


@dataclass
class Row:
    label: str
    unit: str
    values: dict[str, float | None]
    counts: dict[str, str]
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


# (workload, case, metric, label, unit, extra shown with the count)
ROW_SPECS = [
    ("pingpong", "2 processes", "p50_us", "ping-pong p50", "us", ""),
    ("pingpong", "2 processes", "p99_us", "ping-pong p99", "us", ""),
    ("oneway", "1->1", "msg_per_s", "one-way 1->1", "msg/s", ""),
    ("oneway", "4->4", "msg_per_s", "one-way 4->4", "msg/s", ""),
    ("fanout", "10", "deliveries_per_s", "fan-out 10 members", "deliv/s", "drops"),
    ("fanout", "100", "deliveries_per_s", "fan-out 100 members", "deliv/s", "drops"),
    ("fanout", "1000", "deliveries_per_s", "fan-out 1000 members", "deliv/s", "drops"),
    ("backlog", "send+receive", "empty_ops_per_s", "send+recv, empty store", "ops/s", ""),
    ("backlog", "send+receive", "loaded_ops_per_s", "send+recv, backlog elsewhere",
     "ops/s", ""),
    ("backlog", "send+receive", "loaded_over_empty", "  backlog / empty", "x", ""),
    ("sizes", "100 B", "mb_per_s", "size 100 B", "MB/s", ""),
    ("sizes", "10 KiB", "mb_per_s", "size 10 KiB", "MB/s", ""),
    ("sizes", "1 MiB", "mb_per_s", "size 1 MiB", "MB/s", ""),
    ("memory", "overhead", "overhead_per_message", "shm per message beyond payload", "B", ""),
    ("memory", "overhead", "bytes_per_membership", "shm per group membership", "B", ""),
    ("memory", "overhead", "memberships_per_mib", "memberships per MiB", "/MiB", ""),
]


def _target(workload: str, case: str, metric: str, results: dict) -> tuple[str, bool | None]:
    """The goal a row is held to, and whether this run met it (None: not measurable here)."""
    cell = results.get(workload, {}).get(case, {})
    ipc, redis = cell.get(IPC, {}), cell.get(REDIS, {})

    def ratio() -> float | None:
        a, b = ipc.get(metric), redis.get(metric)
        return a / b if a is not None and b else None

    r = ratio()
    if metric == "p50_us":
        return "ipc/redis <= 0.1", None if r is None else r <= 0.1
    if workload == "oneway":
        return "ipc/redis >= 25", None if r is None else r >= 25
    if workload == "fanout" and case == "1000":
        if r is None:
            return "ipc/redis >= 2, 0 drops", None
        return "ipc/redis >= 2, 0 drops", r >= 2 and ipc.get("drops") == 0
    if metric == "loaded_over_empty":
        value = ipc.get(metric)
        return "ipc >= 0.8", None if value is None else value >= 0.8
    if metric == "overhead_per_message":
        value = ipc.get(metric)
        return "<= 64 B", None if value is None else value <= 64
    if metric == "memberships_per_mib":
        value = ipc.get(metric)
        return ">= 4000", None if value is None else value >= 4000
    return "", None


def build_rows(results: dict) -> list[Row]:
    rows = []
    for workload, case, metric, label, unit, extra in ROW_SPECS:
        cell = results.get(workload, {}).get(case)
        if not cell:
            continue
        values, counts = {}, {}
        for backend in BACKENDS:
            result = cell.get(backend)
            if result is None:
                continue
            if "error" in result:
                values[backend], counts[backend] = None, "error"
                continue
            values[backend] = result.get(metric)
            note = f"n={_num(result['counted'])}"
            if result["counted"] != result["expected"]:
                note += f"/{_num(result['expected'])}!"
            if extra:
                note += f" {extra}={result.get(extra)}"
            counts[backend] = note
        a, b = values.get(IPC), values.get(REDIS)
        ratio = a / b if a is not None and b else None
        target, met = _target(workload, case, metric, results)
        rows.append(Row(label, unit, values, counts, ratio, target, met))
    return rows


def render_table(rows: list[Row], header: dict) -> str:
    columns = [("asgi_ipc", IPC), ("channels_redis", REDIS), ("in-memory", MEMORY)]
    lines = [
        f"asgi_ipc benchmark: Python {header['python']}, {header['cpus']} CPUs, "
        f"{'quick' if header['quick'] else 'full'} run; channels_redis: {header['redis']}",
        "",
    ]
    head = f"{'workload':32} {'unit':7}" + "".join(f" {name:>24}" for name, _ in columns)
    head += f" {'ipc/redis':>10}  target"
    lines += [head, "-" * len(head)]
    for row in rows:
        line = f"{row.label:32} {row.unit:7}"
        for _, backend in columns:
            if backend in row.values:
                cell = f"{_num(row.values[backend])} {row.counts[backend]}"
            else:
                cell = "-"
            line += f" {cell:>24}"
        line += f" {_num(row.ratio):>10}"
        if row.target and not header["quick"]:
            verdict = {True: "met", False: "MISSED", None: "n/a"}[row.met]
            line += f"  {row.target} {verdict}"
        lines.append(line)
    lines += ["", "n = messages (deliveries, records) counted intact and in order; "
                  "'!' marks a count short of what was sent."]
    if header["quick"]:
        lines.append("A quick run is too short to judge the targets: run without --quick.")
    return "\n".join(lines)


# --- entry point -----------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="asgi-ipc bench",
        description="Compare asgi_ipc with channels_redis and InMemoryChannelLayer.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--quick", action="store_true",
                        help="small counts (a smoke test, not a measurement)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these workloads: {', '.join(WORKLOADS)}")
    parser.add_argument("--no-redis", action="store_true", help="leave channels_redis out")
    if argv and argv[0] == "--":
        # What a wrapping command line passes on when told `bench -- --quick ...`.
        argv = argv[1:]
    args = parser.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown or not names:
            parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
        args.only = [w for w in WORKLOADS if w in names]
    else:
        args.only = list(WORKLOADS)
    return args


def _all_counted(results: dict) -> bool:
    return all(
        result.get("ok") for cases in results.values() for cell in cases.values()
        for result in cell.values()
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every message was counted, 1 when any went missing."""
    args = _parse(argv)
    scale = QUICK if args.quick else FULL
    previous = {}
    if _in_main_thread():
        # SIGTERM becomes an exception so that the cleanup below (stores, workers, redis-server)
        # runs. SIGINT gets the same handler: asyncio.run() would otherwise install its own,
        # which cancels the running workload and can lose the interrupt in the error that
        # follows.
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _terminate)
    try:
        with contextlib.ExitStack() as stack:
            redis_note = "skipped (--no-redis)"
            redis_url = None
            if not args.no_redis:
                binary = shutil.which("redis-server")
                if importlib.util.find_spec("channels_redis") is None:
                    redis_note = (
                        "skipped (channels_redis is not installed: "
                        "pip install 'asgi_ipc[bench]')"
                    )
                elif binary is None:
                    redis_note = "skipped (redis-server not found)"
                else:
                    server = stack.enter_context(RedisServer(binary))
                    redis_url = server.url
                    redis_note = f"{server.version.split(' sha=')[0]} on 127.0.0.1:{server.port}"
            if redis_url is None:
                print(f"channels_redis {redis_note}", file=sys.stderr)
            bench = Bench(scale, redis_url)
            stack.callback(bench.close)
            started = clock()
            results = bench.run(args.only)
            elapsed = clock() - started
    except KeyboardInterrupt:
        print("interrupted; stores removed and redis-server stopped", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    header = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "redis": redis_note,
        "seconds": round(elapsed, 1),
    }
    rows = build_rows(results)
    ok = _all_counted(results)
    if args.json:
        document = {
            **header,
            "redis_skipped": redis_url is None,
            "workloads": args.only,
            "scale": asdict(scale) | {"size_ops": {str(k): v for k, v in scale.size_ops.items()}},
            "all_counted": ok,
            "results": results,
            "rows": [asdict(row) for row in rows],
        }
        print(json.dumps(document, indent=2))
    else:
        print(render_table(rows, header))
        print(f"\n{'every message counted' if ok else 'SOME MESSAGES WERE NOT COUNTED'}; "
              f"{header['seconds']} s")
    return 0 if ok else 1


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
