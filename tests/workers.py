"""Code that runs in the child processes that the tests start through multiprocessing.

The robustness tests (chaos, model, fuzz, wake-up) start theirs by ``context()``: a forkserver
that has imported this module (and with it asgi_ipc and Channels) once, so that a replacement
for a killed child runs in milliseconds, not in the fraction of a second a fresh interpreter
needs for those imports. Each child is still a process of its own that attaches to the store
after it starts: the forkserver never opens one. A child that is to run the other engine than
the server's imports asgi_ipc again on it (``start_piped``). The tests of several processes of
one site and of the figures start theirs with "spawn" (helpers.start): a fresh interpreter, as
a server has.

Children that log what they did write one line per event with a single ``os.write`` to a file
opened with ``O_APPEND``, *after* the event: a line in a sender's log means ``send()`` returned,
a line in a receiver's log means ``receive()`` returned that message. A SIGKILL can therefore cut
off at most the one line of the event under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing
import os
import random
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from channels.exceptions import ChannelFull

import asgi_ipc
from asgi_ipc import GroupMemoryFull, IPCChannelLayer, StoreError
from asgi_ipc.doorbell import Ringer
from asgi_ipc.observe import figures

from .helpers import PATIENCE, SPAWN, MiB, gone, start, wait_until

# Every layer of a chaos run, in every process, is built from this.
CHAOS_CONFIG = {
    "channel_memory": 32 * MiB,
    "group_memory": MiB,
    "capacity": 1_000_000,
    # Nobody reads the dummy channels: a small capacity makes group_send skip full members.
    "channel_capacity": {"dummy.*": 5},
}


# The environment variable that forces the pure-Python engine (asgi_ipc/engine/compiled.py).
PURE_PYTHON = "ASGI_IPC_PURE_PYTHON"


def context():
    """A multiprocessing context whose children start in milliseconds (see the docstring)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.workers"])
    return ctx


def start_piped(target, *args, engine: str | None = None):
    """Start ``target(*args, conn)`` in a child of ``context()``; return the child and the
    parent's end of the pipe whose other end is ``conn``.

    ``engine`` ("compiled" or "python"): the child runs that engine. The forkserver imported
    this process's; a child that is to run the other one imports asgi_ipc and this module again,
    on that engine, before it runs ``target`` (``_on_other_engine``). Measured to the first
    word from the child, quiet: 0.08 s, against 0.22 s for a fresh interpreter (and 0.012 s on
    the server's own engine); the tests that cut a child at every journaled write start one
    for each cut."""
    ctx = context()
    parent_end, child_end = ctx.Pipe()
    if engine is None or engine == asgi_ipc.ENGINE:
        child = ctx.Process(target=target, args=(*args, child_end), daemon=True)
    else:
        child = ctx.Process(
            target=_on_other_engine, args=(engine, target.__name__, (*args, child_end)),
            daemon=True,
        )
    child.start()
    return child, parent_end


def _on_other_engine(engine: str, name: str, args: tuple) -> None:
    """In a child of the forkserver: drop asgi_ipc and the tests' modules, which the server
    imported on its engine, import them again on ``engine`` (asgi_ipc/engine/compiled.py chooses
    as it is imported, from the environment), and run this module's ``name(*args)`` there."""
    os.environ.pop(PURE_PYTHON, None)
    if engine == "python":
        os.environ[PURE_PYTHON] = "1"
    # The finder that the server's import placed to load the pure-Python modules goes too.
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "_PureFinder"]
    for module in [m for m in sys.modules if m.partition(".")[0] in ("asgi_ipc", "tests")]:
        del sys.modules[module]
    again = importlib.import_module(__name__)
    journal = again.asgi_ipc.engine.journal.__file__
    if again.asgi_ipc.ENGINE != engine or journal.endswith(".py") != (engine == "python"):
        raise RuntimeError(f"the child was to run the {engine} engine, not {journal}")
    getattr(again, name)(*args)


def _log(path: str):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return lambda line: os.write(fd, line.encode() + b"\n")


def _logged_errors(path: str, body) -> None:
    """Run ``body``; a traceback goes to the log, so the parent can show why a child failed."""
    try:
        body()
    except BaseException:
        _log(path)("error " + traceback.format_exc().replace("\n", " | "))
        raise


# --- chaos -------------------------------------------------------------------------------------


def chaos_sender(prefix: str, sender: int, channels: list[str], log_path: str) -> None:
    """Send numbered messages round the channels; log ``seq channel`` once send() returned."""

    async def run() -> None:
        log = _log(log_path)
        layer = IPCChannelLayer(prefix=prefix, **CHAOS_CONFIG)
        layer.engine()
        log("ready")
        seq = 0
        while True:
            channel = channels[seq % len(channels)]
            try:
                await layer.send(channel, {"k": "s", "id": sender, "q": seq})
            except ChannelFull:
                await asyncio.sleep(0.001)
                continue
            log(f"{seq} {channel}")
            seq += 1

    _logged_errors(log_path, lambda: asyncio.run(run()))


def chaos_group_sender(prefix: str, sender: int, group: str, log_path: str) -> None:
    """group_send numbered messages; log ``seq`` once group_send() returned."""

    async def run() -> None:
        log = _log(log_path)
        layer = IPCChannelLayer(prefix=prefix, **CHAOS_CONFIG)
        layer.engine()
        log("ready")
        seq = 0
        while True:
            await layer.group_send(group, {"k": "g", "id": sender, "q": seq})
            log(str(seq))
            seq += 1

    _logged_errors(log_path, lambda: asyncio.run(run()))


def chaos_receiver(prefix: str, channel: str, log_path: str) -> None:
    """Receive from ``channel`` for ever; log ``kind sender seq`` as soon as receive() returns."""

    async def run() -> None:
        log = _log(log_path)
        layer = IPCChannelLayer(prefix=prefix, **CHAOS_CONFIG)
        layer.engine()
        log("ready")
        while True:
            message = await layer.receive(channel)
            log(f"{message['k']} {message['id']} {message['q']}")

    _logged_errors(log_path, lambda: asyncio.run(run()))


def churn_keys(slot: int) -> tuple[list[str], list[str]]:
    """The groups and channels whose memberships the churner of ``slot`` alone changes."""
    return [f"churn.{slot}.{g}" for g in range(3)], [f"dummy.{slot}.{c}" for c in range(4)]


def chaos_churner(prefix: str, slot: int, log_path: str) -> None:
    """Add, discard and group_send at random on this slot's own groups.

    Logs ``try add|discard|send group [channel]`` before each call and ``ok`` after it returned,
    so the parent knows the final membership of every (group, channel): the effect of the last
    call that returned, or of the one a kill cut off, which may or may not have happened."""

    async def run() -> None:
        log = _log(log_path)
        layer = IPCChannelLayer(prefix=prefix, **CHAOS_CONFIG)
        layer.engine()
        log("ready")
        groups, channels = churn_keys(slot)
        rng = random.Random(os.getpid())
        while True:
            group = rng.choice(groups)
            what = rng.choice(("add", "add", "discard", "send"))
            if what == "send":
                log(f"try send {group}")
                await layer.group_send(group, {"k": "churn"})
            else:
                channel = rng.choice(channels)
                log(f"try {what} {group} {channel}")
                await getattr(layer, f"group_{what}")(group, channel)
            log("ok")

    _logged_errors(log_path, lambda: asyncio.run(run()))


# --- a child that stops for good at a chosen point of an operation ------------------------------


def _caller() -> str:
    """``module.function`` of the library code that made the journaled write (three frames up:
    past the hook that calls this and the ``Journal.set`` that calls the hook). Only the
    pure-Python engine has frames to show: the compiled one's functions make none."""
    if asgi_ipc.ENGINE != "python":
        return "compiled"
    code = sys._getframe(3).f_code
    return f"{os.path.basename(code.co_filename).removesuffix('.py')}.{code.co_name}"


def _run_op(layer: IPCChannelLayer, op: str, args: tuple):
    return asyncio.run(getattr(layer, op)(*args))


class StallAt:
    """An ``Engine.inject(on_write=...)`` hook that counts the journaled writes and, at the
    ``stall_at``-th, sends ``("stalled", writes)`` and sleeps for ever, holding the store lock
    (the parent kills the process there)."""

    def __init__(self, stall_at: int, conn) -> None:
        self.stall_at, self.conn, self.writes = stall_at, conn, 0

    def __call__(self, _word: int) -> None:
        self.writes += 1
        if self.writes == self.stall_at:
            self.conn.send(("stalled", self.writes))
            time.sleep(3600)


def stall_after_journaled_writes(prefix, config, op, args, stall_at, conn) -> None:
    """Run ``layer.<op>(*args)``, but after its ``stall_at``-th ``Journal.set`` has been written
    report the writes so far, ``(writer, word)`` each, and sleep for ever, still holding the
    store lock.

    If the operation makes fewer writes it completes and reports ``("done", writes)``."""
    layer = IPCChannelLayer(prefix=prefix, **config)
    writers: list[tuple[str, int]] = []

    def maybe_stall(index):
        writers.append((_caller(), index))
        if len(writers) == stall_at:
            conn.send(("stalled", writers))
            time.sleep(3600)

    layer.engine().inject(on_write=maybe_stall)
    _run_op(layer, op, args)
    conn.send(("done", writers))


def stall_in_flush(prefix, config, stall_at, conn) -> None:
    """Flush, but stop for good (holding the lock) after ``stall_at`` of its steps: the three
    clearings of areas and the two heap formats; 0 stops right after the flush's commit point,
    before anything is cleared."""
    layer = IPCChannelLayer(prefix=prefix, **config)
    steps: list[str] = []

    def step(name: str) -> None:
        if len(steps) == stall_at:
            conn.send(("stalled", list(steps)))
            time.sleep(3600)
        steps.append(name)

    layer.engine().inject(on_flush_step=step)
    _run_op(layer, "flush", ())
    conn.send(("done", steps))


def stall_before_ringing(prefix, config, op, args, conn) -> None:
    """Run ``layer.<op>(*args)`` but stop for good when it is about to ring a doorbell: after
    its commit and after the lock is released."""
    layer = IPCChannelLayer(prefix=prefix, **config)
    layer.engine()

    def stalling_ring(self, address, payload):
        conn.send(("stalled", payload))
        time.sleep(3600)

    Ringer.ring = stalling_ring
    _run_op(layer, op, args)
    conn.send(("done", None))


# --- wake-ups ------------------------------------------------------------------------------


def receive_and_stamp(prefix, config, channel, count, conn) -> None:
    """Receive ``count`` messages, reporting (message, time.monotonic()) as each arrives."""

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        layer.engine()
        conn.send(("ready", os.getpid()))
        for _ in range(count):
            message = await layer.receive(channel)
            conn.send((message, time.monotonic()))
        await layer.close()

    asyncio.run(run())


def receive_each(prefix, config, channels, conn) -> None:
    """Wait on every channel at once; report (channel, message, time.monotonic()) as each of
    the receives returns."""

    async def one(layer, channel):
        message = await layer.receive(channel)
        conn.send((channel, message, time.monotonic()))

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        layer.engine()
        conn.send(("ready", os.getpid()))
        await asyncio.gather(*(one(layer, c) for c in channels))
        await layer.close()

    asyncio.run(run())


def idle_receivers(prefix, config, channels, seconds, conn) -> None:
    """Wait in receive() on every channel for ``seconds``; report the CPU time that took."""

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        waits = [asyncio.ensure_future(layer.receive(c)) for c in channels]
        await asyncio.sleep(0.2)  # let every receive register before the clock starts
        conn.send("waiting")
        started, wall = cpu(), time.monotonic()
        done, _ = await asyncio.wait(waits, timeout=seconds)
        used, elapsed = cpu() - started, time.monotonic() - wall
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await layer.close()
        conn.send((used, elapsed, len(done)))

    asyncio.run(run())


def receive_until_stop(prefix, config, channel, conn) -> None:
    """Report every message received on ``channel`` until one has ``stop``, then the list."""

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        layer.engine()
        conn.send(("ready", os.getpid()))
        got = []
        while True:
            message = await layer.receive(channel)
            if message.get("stop"):
                break
            got.append(message)
        await layer.close()
        conn.send(("got", got))

    asyncio.run(run())


# --- fuzz ----------------------------------------------------------------------------------

# What an operation on a damaged store may raise, besides returning normally.
DOCUMENTED = (StoreError, ChannelFull, GroupMemoryFull)


def fuzz_session(prefix, config, channels, groups, conn) -> None:
    """Attach, wait for the parent to damage the store, then run every operation on it.

    Reports ``(events, received)``: each event is (operation, outcome, seconds, detail), the
    outcome ``ok`` or the exception's class name; received holds (channel, message) pairs."""
    events: list[tuple[str, str, float, str]] = []
    received: list[tuple[str, object]] = []

    async def attempt(name, call, timeout=None):
        started = time.monotonic()
        try:
            if timeout is None:
                result = await call()
            else:
                result = await asyncio.wait_for(call(), timeout)
        except asyncio.TimeoutError:
            events.append((name, "TimeoutError", time.monotonic() - started, ""))
            return None
        except Exception as exc:
            detail = str(exc) if isinstance(exc, DOCUMENTED) else traceback.format_exc()
            events.append((name, type(exc).__name__, time.monotonic() - started, detail))
            return exc
        events.append((name, "ok", time.monotonic() - started, ""))
        return result

    async def drain(layer, channel: str) -> None:
        for _ in range(20):
            got = await attempt(f"receive {channel}", lambda: layer.receive(channel), 0.05)
            if not isinstance(got, dict):
                return
            received.append((channel, got))

    async def exercise(layer, tag: str) -> None:
        async def verify():
            problems = layer.engine().verify()
            if problems:
                # Found and reported: what verify is for.
                events.append(("verify", "problems", 0.0, "; ".join(problems[:3])))
            return problems

        await asyncio.gather(*(drain(layer, c) for c in channels))
        for n, channel in enumerate(channels):
            message = {"ch": channel, "new": f"{tag}{n}"}
            await attempt(f"send {channel}", lambda c=channel, m=message: layer.send(c, m))
        bad = await attempt("send not-a-dict", lambda: layer.send(channels[0], ["no"]))
        if not isinstance(bad, TypeError):
            events.append(("send not-a-dict", "no TypeError", 0.0, repr(bad)))
        for group in groups:
            channel = channels[len(group) % len(channels)]
            await attempt(f"group_add {group}", lambda g=group, c=channel: layer.group_add(g, c))
            await attempt(
                f"group_send {group}", lambda g=group: layer.group_send(g, {"ch": "*", "g": g})
            )
            await attempt(
                f"group_discard {group}", lambda g=group, c=channel: layer.group_discard(g, c)
            )
        await asyncio.gather(*(drain(layer, c) for c in channels))
        await attempt("verify", verify)

    async def attach(layer):
        return layer.engine()

    async def run() -> None:
        first = IPCChannelLayer(prefix=prefix, **config)
        await attempt("attach", lambda: attach(first))
        conn.send("attached")
        conn.recv()  # the store is damaged now
        await exercise(first, "a")
        # A process attaching only now also validates the header.
        second = IPCChannelLayer(prefix=prefix, **config)
        await attempt("attach again", lambda: attach(second))
        await exercise(second, "b")
        flushed = await attempt("flush", second.flush)
        if flushed is None:
            # An emptied store holds nothing damaged but what flush keeps: header and slots.
            await exercise(second, "c")
        for layer in (first, second):
            await attempt("close", layer.close)

    try:
        asyncio.run(run())
    except BaseException:
        events.append(("session", "crashed", 0.0, traceback.format_exc()))
    conn.send((events, received))


def attempt_ops(prefix, config, ops, conn, memory_limit=768 * MiB) -> None:
    """Run each ``(method, args)`` on one layer (``verify`` means the store's), reporting
    ``(method, outcome, result or error message)`` as each ends.

    The address space is capped: an operation that collects without end must not take the
    machine's memory with it before its deadline."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        for method, args in ops:
            try:
                if method == "verify":
                    problems = layer.engine().verify()
                    conn.send((method, "problems" if problems else "ok", problems))
                    continue
                result = await asyncio.wait_for(getattr(layer, method)(*args), 2)
            except asyncio.TimeoutError:
                conn.send((method, "TimeoutError", None))
            except Exception as exc:
                conn.send((method, type(exc).__name__, str(exc)))
            else:
                conn.send((method, "ok", result))
        await layer.close()

    asyncio.run(run())


def open_and_use(prefix, config, conn) -> None:
    """Attach to ``prefix`` and round-trip one message; report ``ok`` or the error."""

    async def run():
        layer = IPCChannelLayer(prefix=prefix, **config)
        try:
            await layer.send("probe", {"n": 1})
            got = await asyncio.wait_for(layer.receive("probe"), 2)
            problems = layer.engine().verify()
            return ("ok", got, problems)
        finally:
            await layer.close()

    try:
        conn.send(asyncio.run(run()))
    except Exception as exc:
        conn.send((type(exc).__name__, str(exc), None))


# --- model ---------------------------------------------------------------------------------


def model_server(conn) -> None:
    """Execute layer operations sent by a test, on this process's own layer.

    Commands: ("open", prefix, config), ("op", clock_ms, name, args, timeout),
    ("begin_receive", clock_ms, channel), ("end_receive", clock_ms, timeout), ("close",),
    ("exit",). The layer's clock reads the clock the test sends with each command."""
    clock = [0]
    loop = asyncio.new_event_loop()
    layer = None
    pending = None

    def outcome(coro, timeout):
        try:
            if timeout is not None:
                coro = asyncio.wait_for(coro, timeout)
            return ("ok", loop.run_until_complete(coro))
        except asyncio.TimeoutError:
            return ("timeout", None)
        except Exception as exc:
            return ("error", f"{type(exc).__name__}: {exc}")

    while True:
        command = conn.recv()
        kind = command[0]
        if kind == "open":
            layer = IPCChannelLayer(prefix=command[1], **command[2])
            layer.clock = lambda: clock[0]
            layer.engine()
            conn.send(("ok", os.getpid()))
        elif kind == "op":
            clock[0] = command[1]
            conn.send(outcome(getattr(layer, command[2])(*command[3]), command[4]))
        elif kind == "begin_receive":
            clock[0] = command[1]
            pending = loop.create_task(layer.receive(command[2]))
            # Run the loop until the receive has found the channel empty and registered.
            loop.run_until_complete(asyncio.sleep(0.01))
            conn.send(("ok", pending.done()))
        elif kind == "end_receive":
            clock[0] = command[1]
            conn.send(outcome(pending, command[2]))
            pending = None
        elif kind == "close":
            loop.run_until_complete(layer.close())
            layer = None
            conn.send(("ok", None))
        else:
            loop.close()
            conn.send(("ok", None))
            return


# --- several processes of one site (test_processes.py), started with "spawn" -------------------


def _process_layer(prefix: str) -> IPCChannelLayer:
    return IPCChannelLayer(prefix=prefix, channel_memory=8 * MiB, group_memory=MiB,
                           capacity=10_000)


def produce(prefix: str, channel: str, producer: int, count: int) -> None:
    async def run():
        layer = _process_layer(prefix)
        for seq in range(count):
            while True:
                try:
                    await layer.send(channel, {"producer": producer, "seq": seq})
                    break
                except ChannelFull:
                    await asyncio.sleep(0.001)
        await layer.close()

    asyncio.run(run())


def consume(prefix: str, channel: str, results) -> None:
    """Receive until a stop message; report (producer, seq) pairs in the order received."""
    async def run():
        layer = _process_layer(prefix)
        got = []
        while True:
            message = await layer.receive(channel)
            if message.get("stop"):
                break
            got.append((message["producer"], message["seq"]))
        await layer.close()
        results.put((os.getpid(), got))

    asyncio.run(run())


def group_member(prefix: str, group: str, ready, results) -> None:
    async def run():
        layer = _process_layer(prefix)
        me = await layer.new_channel()
        await layer.group_add(group, me)
        ready.put(me)
        message = await layer.receive(me)
        await layer.close()
        results.put((os.getpid(), message))

    asyncio.run(run())


def flush_then_report(prefix: str, results) -> None:
    async def run():
        layer = _process_layer(prefix)
        await layer.flush()
        await layer.close()
        results.put("flushed")

    asyncio.run(run())


# --- the figures of observe.py (test_observe.py), started with "spawn" -------------------------

BULK = 200


def observed_layer(prefix: str, **config) -> IPCChannelLayer:
    config.setdefault("channel_memory", 2 * MiB)
    config.setdefault("group_memory", MiB)
    return IPCChannelLayer(prefix=prefix, **config)


def work(prefix: str, tag: str, done) -> None:
    """A known amount of every kind of work (see ``expected_counters``); reports ChannelFull
    raised so the parent can tell the counters from what the layer really did."""

    async def run() -> int:
        small = observed_layer(prefix, capacity=3)
        short = observed_layer(prefix, expiry=0.001)
        bulk = observed_layer(prefix, capacity=10 * BULK)
        full = 0
        for i in range(5):  # 3 queued, 2 refused
            try:
                await small.send(f"full.{tag}", {"i": i})
            except ChannelFull:
                full += 1
        for i in range(2):  # both expire unread
            await short.send(f"exp.{tag}", {"i": i})
        await asyncio.sleep(0.05)
        await small.send(f"exp.{tag}", {"i": "kept"})  # drops the two expired ones
        assert (await small.receive(f"exp.{tag}"))["i"] == "kept"
        await small.group_add(f"g.{tag}", f"full.{tag}")  # at capacity: skipped
        await small.group_add(f"g.{tag}", f"ok.{tag}")
        await small.group_send(f"g.{tag}", {"hello": tag})
        assert (await small.receive(f"ok.{tag}")) == {"hello": tag}
        for i in range(BULK):
            await bulk.send("bulk", {"i": i})
        for _ in range(BULK // 2):
            await bulk.receive("bulk")
        for each in (small, short, bulk):
            await each.close()
        return full

    done.put(asyncio.run(run()))


def expected_counters(processes: int) -> dict[str, int]:
    return {
        "sent": processes * (3 + 2 + 1 + BULK),
        "received": processes * (1 + 1 + BULK // 2),
        "returned": 0,
        "group_sends": processes,
        "delivered": processes,
        "expired": processes * 2,
        "channel_full": processes * 2,
        "group_full": processes,
        "no_memory": 0,
        "reaped_channels": 0,
        "reaped_memberships": 0,
        "reaped_messages": 0,
        "parcels": 0,  # its group_sends reach fewer members per process than make a parcel
        # A single-host layer never relays (multi-host: see test_multihost.py).
        "relayed": 0,
        "relay_fenced": 0,
        "remote_sent": 0,
        "remote_group_copies": 0,
        "remote_full": 0,
    }


class _KillAt:
    """A channel_capacity pattern that kills its own process when asked about ``name``: the
    layer asks inside the lock hold of a group_send, with its work so far uncommitted."""

    def __init__(self, name: str) -> None:
        self.name = name

    def match(self, channel: str):
        if channel == self.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return None


def killed_in_group_send(prefix: str, members: int) -> None:
    """Queue copies for ``members`` - 1 channels of a group, then die before the group_send
    commits (the last member added is asked about last)."""

    async def run() -> None:
        victim = observed_layer(prefix, channel_capacity={_KillAt("zz.last"): 5})
        for n in range(members - 1):
            await victim.group_add("everyone", f"m.{n:05}")
        await victim.group_add("everyone", "zz.last")
        await victim.group_send("everyone", {"never": "counted"})

    asyncio.run(run())


def wait_in_receive(prefix: str, channel: str, ready) -> None:
    async def run() -> None:
        waiting = observed_layer(prefix)
        task = asyncio.ensure_future(waiting.receive(channel))
        while figures(prefix).waiting_processes != [os.getpid()]:
            await asyncio.sleep(0.01)
        ready.put(os.getpid())
        await task

    asyncio.run(run())


# --- a process that forks while it waits (test_slots.py, test_cli.py), started with "spawn" -----


def fork_during_a_hold(prefix: str, conn) -> None:
    """Fork while another thread is in a lock hold, and while this process keeps a message of
    a cancelled receive (none here: the child must not find its parent's); report what the
    child saw: that it could use the layer, and that its close() returned."""
    layer = observed_layer(prefix)
    store = layer.engine()
    in_hold = threading.Event()

    def hold() -> None:
        store.locked(lambda: (in_hold.set(), time.sleep(1.5)))

    holder = threading.Thread(target=hold)
    holder.start()
    in_hold.wait()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        signal.alarm(60)  # a close() that hangs dies here, and says so by its status

        async def use() -> bytes:
            await layer.send("after.fork", {"from": "child"})
            got = await layer.receive("after.fork")
            await layer.close()
            return b"closed" if got == {"from": "child"} else b"wrong"

        try:
            os.write(writer, asyncio.run(use()))
        finally:
            os._exit(0)
    os.close(writer)
    _pid, status = os.waitpid(child, 0)
    said = os.read(reader, 100)
    holder.join()
    asyncio.run(layer.close())
    conn.send((said.decode(), os.waitstatus_to_exitcode(status)))


def fork_while_waiting(prefix: str, channel: str, conn) -> None:
    """Wait in receive() on ``channel``; once waiting, fork a child that never calls the layer
    and lives until the other end of ``conn`` is closed; send (own pid, child's pid) on
    ``conn``, and wait on until killed."""

    async def run() -> None:
        layer = observed_layer(prefix)
        layer.engine()  # opens the store, creating it if need be, before figures() looks
        task = asyncio.ensure_future(layer.receive(channel))
        while figures(prefix).waiting_processes != [os.getpid()]:
            await asyncio.sleep(0.01)
        child = os.fork()
        if child == 0:
            try:
                conn.recv()
            finally:
                os._exit(0)
        conn.send((os.getpid(), child))
        await task

    asyncio.run(run())


@contextlib.contextmanager
def forking_waiter(children: list, prefix: str, channel: str) -> Iterator[tuple[Any, int, int]]:
    """The parent's side of ``fork_while_waiting``: (the waiting process, its pid, its forked
    child's pid) for the span of the block, after which the forked child exits."""
    parent_end, child_end = SPAWN.Pipe()
    waiter = start(children, fork_while_waiting, prefix, channel, child_end)
    child_end.close()
    forked = 0
    try:
        assert parent_end.poll(PATIENCE), "the waiter never forked"
        pid, forked = parent_end.recv()
        yield waiter, pid, forked
    finally:
        parent_end.close()  # the forked child's cue to exit
        if forked:
            wait_until(lambda: gone(forked), "the forked child to exit")


# --- owners of process-specific channels (test_reap.py) --------------------------------------


def own_and_consume(prefix, config, count, groups, conn) -> None:
    """Make ``count`` channels with new_channel(), add each to every group of ``groups``, and
    receive on all of them, counting the messages; send ``("ready", pid, names)`` once every
    receive waits. Then answer the parent's commands: ``"counts"`` (messages received, by
    channel), ``"close"`` (close the layer, then send ``("closed", counts)``)."""

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        names = [await layer.new_channel() for _ in range(count)]
        for name in names:
            for group in groups:
                await layer.group_add(group, name)
        got = dict.fromkeys(names, 0)

        async def consume(name: str) -> None:
            while True:
                await layer.receive(name)
                got[name] += 1

        receives = [asyncio.ensure_future(consume(name)) for name in names]
        store = layer.engine()
        while store.seat is None or len(store.seat.registered) < count:
            await asyncio.sleep(0.01)
        conn.send(("ready", os.getpid(), names))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "counts":
                conn.send(dict(got))
            elif command == "close":
                # Stopped first: a consumer looping on receive() after close() would open the
                # layer again.
                for receive in receives:
                    receive.cancel()
                await asyncio.gather(*receives, return_exceptions=True)
                await layer.close()
                conn.send(("closed", dict(got)))

    asyncio.run(run())


def reap_after_journaled_writes(prefix, config, stall_at, conn) -> None:
    """Look for processes that died owning channels and reap what they owned, but after the
    ``stall_at``-th journaled write report the number of writes so far and sleep for ever,
    holding the store lock. If reaping makes fewer writes it completes and reports
    ``("done", writes)``."""
    store = IPCChannelLayer(prefix=prefix, **config).engine()
    stall = StallAt(stall_at, conn)
    store.inject(on_write=stall)
    store.look_for_dead()
    while store.reaping():
        store.reap()
    conn.send(("done", stall.writes))


def take_one_and_hold(prefix, config, conn) -> None:
    """Make a channel with new_channel() and send its name; on "take", receive one message
    (the store lends this process the ones queued behind it) and answer "took", then wait to
    be killed."""

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        name = await layer.new_channel()
        conn.send(name)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, conn.recv) == "take"
        conn.send(("took", await layer.receive(name)))
        await asyncio.sleep(3600)

    asyncio.run(run())


def lend_and_take_in_threads(prefix, rounds, conn) -> None:
    """One thread lends ``rounds`` parcels, each naming the same 8 channels, to this process's
    book of lent messages (``LentBook``), while two threads take from every channel and a third
    settles; send ({channel: [(taker, message)] in the order each taker took them}, {channel:
    count settled, with what was left to settle}). The interpreter switches threads as often
    as it can, so that each book operation meets the others halfway if its guard lets it."""
    from asgi_ipc.engine import LentBook
    from asgi_ipc.engine.layout import H_EPOCH

    sys.setswitchinterval(1e-6)
    layer = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB)
    engine = layer.engine()
    book = LentBook(engine.words, engine.clock, lambda: None)
    channels = [b"specific.lent!%d" % k for k in range(8)]
    taken: dict[bytes, list[tuple[int, bytes]]] = {channel: [] for channel in channels}
    settled: dict[bytes, int] = dict.fromkeys(channels, 0)
    lent, took = threading.Event(), [threading.Event(), threading.Event()]

    def lend() -> None:
        for n in range(rounds):
            book.lend_parcels([(b"%d" % n, 2**62, channels)], engine.epoch)
        lent.set()

    def take(taker: int) -> None:
        while True:
            last_round = lent.is_set()
            found = False
            for channel in channels:
                item = book.take(channel)
                if item is not None:
                    taken[channel].append((taker, bytes(item[0])))
                    found = True
            if last_round and not found:
                took[taker].set()
                return

    def settle() -> None:
        while True:
            last_round = all(event.is_set() for event in took)
            counts = book.to_settle(3)
            for channel, count in (counts[1] if counts else {}).items():
                settled[channel] += count
            if last_round and counts is None:
                return

    threads = [threading.Thread(target=lend), threading.Thread(target=settle)]
    threads += [threading.Thread(target=take, args=(taker,)) for taker in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.words[H_EPOCH] == engine.epoch  # no flush came between
    asyncio.run(layer.close())
    conn.send((taken, settled))


def parcel_owner(prefix, config, count, group, conn) -> None:
    """Make ``count`` channels with new_channel() and add each to ``group``; send ``("ready",
    pid, names)``. Then answer the parent's commands, receiving nothing meanwhile:
    ``("receive", {name: n})`` receives n messages of each channel, all at once, and sends
    {name: [messages]}; ``("try", seconds)`` sends how many messages a receive on each channel
    gets within ``seconds``; ``("stall", n, {name: k})``, as "receive", but after its ``n``-th
    journaled write sends ``("stalled", writes)`` and sleeps for ever, holding the lock (or
    sends ``("done", writes, got)``)."""

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **config)
        names = [await layer.new_channel() for _ in range(count)]
        for name in names:
            await layer.group_add(group, name)
        conn.send(("ready", os.getpid(), names))
        loop = asyncio.get_running_loop()

        async def receive_all(wanted: dict) -> dict:
            async def each(name: str, n: int) -> list:
                return [await layer.receive(name) for _ in range(n)]

            lists = await asyncio.gather(*(each(name, n) for name, n in wanted.items()))
            return dict(zip(wanted, lists, strict=True))

        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "receive":
                conn.send(await receive_all(command[1]))
            elif command[0] == "try":
                got = 0
                for name in names:
                    try:
                        await asyncio.wait_for(layer.receive(name), command[1])
                        got += 1
                    except asyncio.TimeoutError:
                        pass
                conn.send(got)
            elif command[0] == "stall":
                stall = StallAt(command[1], conn)
                layer.engine().inject(on_write=stall)
                got = await receive_all(command[2])
                layer.engine().journal.hook = None
                conn.send(("done", stall.writes, got))

    asyncio.run(run())


def group_send_after_journaled_writes(prefix, config, group, message, stall_at, conn) -> None:
    """group_send ``message`` to ``group``, but after its ``stall_at``-th journaled write send
    ``("stalled", writes)`` and sleep for ever, holding the store lock; or send ``("done",
    writes)``."""
    layer = IPCChannelLayer(prefix=prefix, **config)
    stall = StallAt(stall_at, conn)
    layer.engine().inject(on_write=stall)
    asyncio.run(layer.group_send(group, message))
    conn.send(("done", stall.writes))
