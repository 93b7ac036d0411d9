"""The worker processes that run the cross-process halves of the workloads (``roles.py``).

Workers are started once (as many as the largest workload needs at once), with the "spawn"
start method, and reused by every workload: starting them costs far more than a short workload,
and a fresh interpreter per role would put import and warm-up time into the figures. A
task is ``(role, spec, params)``, the role being a coroutine function of ``roles.py`` (pickled
by reference).

A role builds its layer, does its setup, then ``handshake`` tells the main process it is ready
(with what others need to know, such as its channel names) and waits for the word to start,
which carries what every worker of the workload said. The main process sends that word only once
all of them are ready, so the timed part starts together; if any worker failed to get ready,
the others get ``None`` instead and give up (``Aborted``).

A worker that fails, dies or does not answer before the workload's timeout ends the workload
with ``WorkloadError``; the pool is then replaced, as a worker may still be busy with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import traceback
from collections.abc import Callable
from typing import Any

from .layers import clock

Task = tuple[Callable[..., Any], dict, dict]


class WorkloadError(Exception):
    """A workload could not finish: a worker failed, died or stopped answering."""


class Aborted(Exception):
    """Another worker of the same workload failed to start: give up quietly."""


def handshake(conn: Any, info: dict) -> list[dict]:
    """Tell the main process this role is ready, with ``info``; what every role said, once all
    are ready."""
    conn.send(("ready", info))
    peers = conn.recv()
    if peers is None:
        raise Aborted
    return peers


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
            reply = ("done", asyncio.run(role(conn, spec, params)))
        except Aborted:
            reply = ("done", {"aborted": True})
        except BaseException:
            reply = ("error", f"{role.__name__} ({spec['kind']}): {traceback.format_exc()}")
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

    def run(self, tasks: list[Task], timeout: float) -> list[dict]:
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

