"""The relay of a host: one process of the host moves the host's inbox (a Redis stream) into
its store, exactly once.

Election. Every process whose multi-host layer has opened the store runs a ``Relay`` thread.
It competes for the store's relay byte (``layout.RELAY_BYTE``) with an open-file-description
lock on a description of its own, the way a process slot is held (engine/slots.py): the kernel
drops it when the holder dies, however it dies and in whatever PID namespace, so no lease has to
run out. The holder *leads*; the others stand by, each blocked in its lock request
(``F_OFD_SETLKW``), with no polling: the kernel grants the byte to one of them the instant the
leader's description lets go, so a standby takes over within one round trip to Redis of the
leader's death. A leader that closes its layer lets go the same way. A standby whose layer
closes cannot be woken from its request: its description is dropped under it
(``OwnDescription.let_go``), so that a grant comes to nothing, and its thread ends when the
request returns.

The leader's loop runs in the thread, on a blocking connection of its own (``Link``), not an
event loop: a blocking read releases the GIL at once and parses without a coroutine per line,
which took a hop across hosts from about 540 to 450 us (ping-pong p50, alternating runs). Its
loop, one round trip per batch: a pipeline of ``XREAD BLOCK`` from the store's
position and ``GET`` of the inbox's epoch (entries read while the epoch changed are read again
under the new one), preceded once a second by ``BEAT`` (redis_side.py: checks the epoch,
trims, refreshes the inbox's time to live and this host's entry in the hosts) and otherwise,
once ``trim_every`` entries were applied since the last trim, by ``TRIM`` of them; then
``Engine.apply_relayed`` applies what came and moves the position in one lock hold
(engine/inbox.py); the rings that leaves are rung once the next read is sent. What makes an
entry applied is that hold's commit; a leader killed before it leaves the entry in the inbox
for the next leader, and one killed after it leaves the position past it, so the next leader
skips it. The stream is trimmed only up to the position the store holds, so nothing unapplied
is ever trimmed.

Stopping a leader interrupts its link (``Link.interrupt``), which shuts the socket down under a
blocked read; a leader in the middle of connecting (to a Redis that does not answer) ends within
its socket timeout, ``redis_timeout`` and a second, for which ``stop`` waits up to its own.
Redis gone: the leader logs it once, marks it in the store for `asgi-ipc stats`, and tries again
with a backoff up to ``MAX_BACKOFF``; nothing is lost that Redis kept. When Redis comes back
empty (restarted without persistence) or with a stream whose ids went back (a failover to a
replica that missed writes), ``BEAT`` hands out a new epoch, and the store moves to it before
applying anything read under it: entries of the new epoch are all applied once, whatever ids
they carry.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from ..engine.inbox import position
from ..engine.layout import (
    H_RELAY_DEPTH,
    H_RELAY_LAG,
    H_RELAY_PID,
    H_RELAY_SEEN,
    RELAY_BYTE,
)
from ..engine.lock import OwnDescription, byte_lock
from ..exceptions import StoreClosed, StoreError
from .redis_side import (
    BEAT,
    TRIM,
    Keys,
    Link,
    fresh_epoch,
    host_hex,
    now_ms,
    parse_entries,
    parse_epoch,
    script_sha,
)

if TYPE_CHECKING:
    from ..receiver import Receiver

logger = logging.getLogger(__name__)

BATCH = 256
BLOCK_MS = 1000
# Seconds between two beats (epoch check, time to live, hosts entry) while entries flow; an idle
# relay beats at each read, once per BLOCK_MS.
BEAT_INTERVAL = 1.0
MIN_BACKOFF, MAX_BACKOFF = 0.02, 1.0
FAILED_PAUSE = 1.0
BEAT_SHA, TRIM_SHA = script_sha(BEAT), script_sha(TRIM)
# Entries applied before the relay trims them from the inbox (a beat trims too), at most: a
# trim per batch cost a message sent across hosts a script run when batches are single entries.
TRIM_EVERY = 64


class Relay:
    """This process's candidacy for the relay of its host, and its loop while it leads."""

    def __init__(
        self,
        receiver: Receiver,
        host: int,
        where: tuple[str, Any, dict],
        keys: Keys,
        inbox_ttl_ms: int,
        capacity_of: Callable[[bytes], int],
        expiry_ms: int,
        group_expiry_ms: int,
        redis_timeout: float = 5.0,
        inbox_capacity: int = 10_000,
    ) -> None:
        self.receiver = receiver
        self.host = host
        kind, target, options = where
        # The relay's socket timeout bounds each read, which blocks for BLOCK_MS at most.
        waits = (options.get("socket_timeout") or redis_timeout) + BLOCK_MS / 1000
        self.where = (kind, target, {**options, "socket_timeout": waits})
        self.keys = keys
        self.inbox_ttl_ms = inbox_ttl_ms
        self.capacity_of = capacity_of
        self.expiry_ms = expiry_ms
        self.group_expiry_ms = group_expiry_ms
        # Applied entries count against the inbox's bound until they are trimmed: a small
        # bound is trimmed sooner, down to every batch.
        self.trim_every = max(1, min(TRIM_EVERY, inbox_capacity // 16))
        self.pid = os.getpid()
        self.leading = False
        self.batches = 0
        self._down = False  # Redis found unavailable, and not yet found back
        self._stop = threading.Event()
        # Under it: whether the thread is in its lock request, its description, its link.
        self._standing_guard = threading.Lock()
        self._standing = False
        self._own: OwnDescription | None = None
        self._link: Link | None = None  # while leading, under the same guard
        self._thread = threading.Thread(
            target=self._run, name=f"asgi_ipc relay {host_hex(host)}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop standing by or leading; a leader lets go of the relay byte on its way out."""
        with self._standing_guard:
            self._stop.set()
            if self._standing and self._own is not None:
                # In its lock request, which nothing can cut short: what it may be granted
                # goes with the description, and the thread ends when the request returns.
                self._own.let_go()
                return
            link = self._link
        if link is not None:
            link.interrupt()  # a read blocked on Redis ends now
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the election ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.receiver.engine
        try:
            own = OwnDescription(engine.segment.fd)
        except (OSError, ValueError):
            return  # the store was closed under us
        self._own = own
        try:
            while True:
                with self._standing_guard:
                    if self._stop.is_set():
                        break
                    self._standing = True
                try:
                    byte_lock(own.fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, RELAY_BYTE)
                finally:
                    with self._standing_guard:
                        self._standing = False
                        dropped = self._stop.is_set()
                if dropped:
                    break
                self.leading = True
                try:
                    self._lead()
                except Exception:
                    logger.exception("relay %s failed", host_hex(self.host))
                finally:
                    self.leading = False
                if self._stop.is_set():
                    break
                # The loop failed (the store closed under it, or a fault): let another
                # process of the host lead, and stand again after a pause rather than spin.
                byte_lock(own.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, RELAY_BYTE)
                self._stop.wait(FAILED_PAUSE)
        except Exception:
            logger.exception("the relay candidacy of %s stopped", engine.name)
        finally:
            own.close()

    # --- leading ---------------------------------------------------------------------------

    def _lead(self) -> None:
        words = self.receiver.engine.words
        words[H_RELAY_PID] = os.getpid()
        backoff, self._down = MIN_BACKOFF, False
        while not self._stop.is_set():
            with self._standing_guard:  # so that stop() interrupts the link it finds
                if self._stop.is_set():
                    return
                link = self._link = Link(self.where)
            try:
                self._serve(link)
            except (RedisError, OSError) as exc:
                if self._stop.is_set():
                    return  # interrupted
                words[H_RELAY_SEEN] = 0
                if not self._down:
                    logger.warning("relay %s: Redis unavailable (%r); retrying",
                                   host_hex(self.host), exc)
                    self._down, backoff = True, MIN_BACKOFF
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except (StoreClosed, StoreError, ValueError) as exc:
                # The store closed under a leader that was not told yet: stop leading.
                if not self._stop.is_set():
                    logger.warning("relay %s stopped: %r", host_hex(self.host), exc)
                return
            except Exception:
                if self._stop.is_set():
                    return  # what the interrupt left in the middle of a command
                raise
            finally:
                link.close()

    def _serve(self, link: Link) -> None:
        link.send([["SCRIPT", "LOAD", BEAT], ["SCRIPT", "LOAD", TRIM]])
        link.replies(2)
        try:
            self._relay(link)
        finally:
            # What the last batch woke, when the loop ends before its next read rang it.
            with contextlib.suppress(StoreClosed, StoreError, OSError):
                self.receiver.ring_due()

    def _round_trip(self, link: Link, commands: list[list[Any]]) -> list[Any]:
        link.send(commands)
        # What the last batch woke is rung once the next read is on its way: the receives it
        # wakes (often in this process) then find the GIL free of this thread, which only
        # waits on Redis from here. Rung before, they waited for this thread to send.
        self.receiver.ring_due()
        return link.replies(len(commands))

    def _relay(self, link: Link) -> None:
        keys, host, receiver = self.keys, self.host, self.receiver
        words = receiver.engine.words
        inbox, epoch_key = keys.inbox(host), keys.epoch(host)
        value: Any = None  # the epoch key (bytes) as the last beat or read found it
        beat_due = 0.0
        untrimmed = 0  # entries applied since the last trim
        read = ["XREAD", "COUNT", BATCH, "BLOCK", BLOCK_MS, "STREAMS", inbox]
        known: tuple[int, int, int] | None = None
        while not self._stop.is_set():
            beating = value is None or time.monotonic() >= beat_due
            if known is None or beating:
                # Read in a lock hold, which first rolls back what a relay killed in the
                # middle of applying left: a position written but not committed must never be
                # trimmed up to, since what it covers was not applied. Between beats, the
                # position is the one this relay's own holds committed.
                known = receiver.engine.locked(position, words)
            stored_epoch, ms, seq = known
            commands: list[list[Any]] = []
            if beating:
                commands.append([
                    "EVALSHA", BEAT_SHA, 3, inbox, epoch_key, keys.hosts,
                    fresh_epoch(), f"{stored_epoch:x}", ms, seq, 1, host_hex(host), now_ms(),
                    self.inbox_ttl_ms,
                ])
                untrimmed = 0
            elif untrimmed >= self.trim_every:
                # What the store applied leaves the inbox (and so stops counting against its
                # bound), unless the epoch changed meanwhile.
                commands.append(["EVALSHA", TRIM_SHA, 2, inbox, epoch_key, value,
                                 f"{ms}-{seq + 1}"])
                untrimmed = 0
            commands.append([*read, f"{ms}-{seq}"])
            commands.append(["GET", epoch_key])
            results = self._round_trip(link, commands)
            reply, after = results[-2:]
            if beating:
                value, depth = results[0]
                beat_due = time.monotonic() + BEAT_INTERVAL
                words[H_RELAY_DEPTH] = depth
            if self._down:
                logger.warning("relay %s: Redis answers again", host_hex(host))
                self._down = False
            words[H_RELAY_SEEN] = now_ms()
            if after != value or value is None:
                # The epoch changed while the read waited (the keys expired or were removed,
                # and a sender made the stream anew): what was read belongs to the next
                # epoch, which the next beat hands out. Read it again then.
                value = None
                continue
            epoch, start = parse_epoch(value)
            if epoch != stored_epoch:
                # Read from a position of another epoch: move to this one's start first.
                if stored_epoch:
                    logger.warning(
                        "relay %s: the inbox's epoch changed (Redis restarted empty or "
                        "failed over); carrying on from %s-%s of the new one",
                        host_hex(host), *start,
                    )
                known = receiver.apply_relayed(epoch, start, start, [], self.capacity_of,
                                               self.expiry_ms, self.group_expiry_ms).position
                continue
            entries = parse_entries(reply)
            if entries:
                applied = receiver.apply_relayed(epoch, start, (ms, seq), entries,
                                                 self.capacity_of, self.expiry_ms,
                                                 self.group_expiry_ms)
                known = applied.position
                untrimmed += len(entries)
                if applied.refused:
                    logger.warning(
                        "relay %s: %s of %s entries refused by the store (a channel at capacity "
                        "or memory full; see the channel_full, no_memory counters)",
                        host_hex(host), applied.refused, len(entries),
                    )
                if applied.skipped:
                    logger.info("relay %s: %s group copies skipped, their channels over "
                                "capacity", host_hex(host), applied.skipped)
                words[H_RELAY_LAG] = max(0, now_ms() - entries[-1].ms)
                self.batches += 1
