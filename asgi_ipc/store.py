"""A prefix's store as one process sees it: the segment, its lock and journal, and the channel,
group and process tables, with every operation as one lock hold (a receive may need none, and
the receives of one event loop share one; see ``Store.receive``).

An operation runs as ``Store.locked(operation)``. It takes the global lock and repairs what a
dead holder left (``_recover``): it rolls back an open undo journal, and finishes a flush that
was cut off. Then it runs the operation, commits the journal (or rolls it back if anything
raised), releases the lock, and rings the doorbells the operation collected, so no other process
ever waits on a syscall made under the lock. The release is written so that no exception can
skip it, one from a signal handler included, wherever it lands (see lock.py); an exception that
cuts the rollback itself short leaves the journal open for the next holder to finish, as a dead
holder's would be. ``Store.locked`` is also the seam through which tools and tests read the
store consistently.

``flush`` cannot be undone cheaply (it may free millions of blocks), so it is redone instead: it
first stores the epoch it moves to in ``H_FLUSHING``; that store is its commit. Then it clears
the areas (returning their pages to the kernel), bumps the epoch and clears ``H_FLUSHING``. A
process that finds ``H_FLUSHING`` set when it takes the lock does the same again, which is
harmless since clearing twice is clearing once. Process slots survive a flush; waiting processes
see the new epoch, register their waits again and are rung to look again.

A receive's message leaves the store when the lock hold that serves it commits, and reaches its
caller after the lock is released: a process killed in between loses it (delivery is at most
once). A receive cancelled in between puts its message back first in its channel, unless a flush
came in between, which would have taken it with the rest.

No receive is left waiting for ever: one whose lock hold fails (whatever the exception) gets the
error, unless its message was taken for good, which it gets; ``close`` ends every receive still
waiting, in any event loop or thread, with ``StoreClosed``; and while any receive of the process
waits, a thread of the store (``_run_checks``) makes up for lost rings, whichever event loops
have closed meanwhile.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from typing import TypeVar

from .doorbell import (
    CHECK_INTERVAL,
    FULL,
    GONE,
    RING_BYTES,
    Doorbell,
    Ringer,
    Waiter,
    doorbell_address,
    remove_doorbell,
)
from .engine.groups import GroupStore
from .engine.heap import Heap
from .engine.journal import Journal
from .engine.layout import (
    COUNTERS,
    H_CHANNEL_FULL,
    H_EPOCH,
    H_FLUSHING,
    H_GROUP_SENDS,
    H_JOURNAL_COUNT,
    H_LOCK_PID,
    H_MAGIC,
    H_NO_MEMORY,
    H_SENT,
    MAGIC,
    SLOTS,
    WORD,
)
from .engine.lock import Handle as StoreHandle
from .engine.queues import OUT_OF_MEMORY, OVER_CAPACITY, QUEUED, ChannelQueues
from .engine.segment import Segment, format_areas, heaps, removal_hint
from .engine.slots import ProcessSlots
from .exceptions import StoreClosed, StoreCorrupted, StoreError

logger = logging.getLogger(__name__)

__all__ = ["OUT_OF_MEMORY", "OVER_CAPACITY", "QUEUED", "Store", "format_areas"]

# Bounded background work that each send does for the store as a whole.
EXPIRE_PER_SEND = 2
SWEEP_BUCKETS_PER_SEND = 4

HASH_CACHE_SIZE = 1 << 16

_CORRUPTION = (IndexError, ValueError, OverflowError, TypeError)

# The counter of each outcome of a send (see layout.py).
_SEND_OUTCOME = {QUEUED: H_SENT, OVER_CAPACITY: H_CHANNEL_FULL, OUT_OF_MEMORY: H_NO_MEMORY}

T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(self, prefix: str, channel_memory: int, group_memory: int, create: bool = True):
        self.segment = Segment(prefix, channel_memory, group_memory, create=create)
        self.prefix = prefix
        self.name = self.segment.name
        g = self.geometry = self.segment.geometry
        words = self.words = self.segment.words
        self.journal = Journal(words, g.journal)
        message_heap, group_heap = heaps(words, self.journal, g, self.segment.reserve)
        key = self.segment.hash_key
        hashes: dict[bytes, int] = {}

        def keyed_hash(name: bytes) -> int:
            # Keyed, so that names chosen by an attacker cannot pile into one bucket; cached,
            # since the same channels come back again and again.
            h = hashes.get(name)
            if h is None:
                if len(hashes) >= HASH_CACHE_SIZE:
                    hashes.clear()
                h = hashes[name] = int.from_bytes(
                    hashlib.blake2b(name, key=key, digest_size=8).digest(), "little"
                )
            return h

        self._hash = keyed_hash
        self.slots = ProcessSlots(words, self.journal, g.slots)
        self.queues = ChannelQueues(
            words, self.segment.mm, self.journal, message_heap, self.slots,
            g.channel_index, g.channel_buckets, self._hash,
        )
        self.groups = GroupStore(
            words, self.segment.mm, self.journal, group_heap,
            g.group_index, g.group_buckets, g.member_index, g.member_buckets, self._hash,
        )
        self._rings: list[tuple[int, int, bytes]] = []
        self._gone: list[tuple[int, int]] = []
        self._ringer = Ringer()
        self._doorbell: Doorbell | None = None
        self._slot_guard = threading.Lock()  # one slot claim at a time
        self._slots_full_until = 0.0  # no new claim before (monotonic): every slot was held
        self._closed = False
        # The checker thread and the event that stops it, while one runs (see _run_checks).
        self._checker: tuple[threading.Thread, threading.Event] | None = None
        self._checker_guard = threading.Lock()
        self._pid = os.getpid()
        self._epoch = words[H_EPOCH]
        self._local = threading.local()  # each thread's receives to serve together

    def locked(self, operation: Callable[..., T], *args) -> T:
        """Run ``operation(*args)`` as one lock hold: take the lock and recover, run it, commit
        (or roll back if it raised), release, ring. No exception, wherever it lands, keeps the
        lock held: the release is one C call in the ``finally`` (see lock.py)."""
        lock = self.segment.lock
        handle = lock.handle()
        rings: list[tuple[int, int, bytes]] = []
        try:
            handle.busy = True
            lock.acquire(handle)
            self._recover()
            result = operation(*args)
            self.journal.commit()
            rings, self._rings = self._rings, []
        except BaseException as exc:
            if self._abort(handle):  # the rings are ours to take only while holding the lock
                rings, self._rings = rings + self._rings, []
            if isinstance(exc, _CORRUPTION):
                raise self.corrupted(exc) from exc
            raise
        finally:
            handle.busy = False
            fcntl.flock(handle, fcntl.LOCK_UN)
            if rings:
                self._ring(rings)
        return result

    def _abort(self, handle: StoreHandle) -> bool:
        """Undo what an operation cut short had changed, if this thread holds the lock; False
        if another does.

        Whether it got as far as taking the lock is unknown (the exception may have landed
        right after ``flock`` returned), so it asks without waiting. Held by another: this
        thread changed nothing. Free, or ours: the shared journal count covers exactly the
        words changed since the last commit, ours or a dead holder's, so rolling it back is
        right either way; the caller's ``finally`` releases."""
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            self.journal.rollback()
        except (StoreCorrupted, *_CORRUPTION):
            logger.exception("could not roll back a failed operation on %s", self.name)
        return True

    def corrupted(self, exc: BaseException) -> StoreCorrupted:
        return StoreCorrupted(
            f"the store {self.name} is inconsistent ({type(exc).__name__}: {exc}); "
            f"run `asgi-ipc verify --prefix {self.prefix}`, or {removal_hint(self.prefix)}"
        )

    # --- recovery --------------------------------------------------------------------------

    def _recover(self) -> None:
        w = self.words
        if w[H_MAGIC] != MAGIC:
            raise StoreCorrupted(f"{self.name} lost its magic word; {removal_hint(self.prefix)}")
        if self._pid != os.getpid():
            self._forget_parent_process()
        if w[H_JOURNAL_COUNT]:
            logger.warning("%s: rolling back an operation cut off by a dead process", self.name)
            self.journal.rollback()
        self.journal.begin()
        if w[H_FLUSHING]:
            logger.warning("%s: finishing a flush cut off by a dead process", self.name)
            self._finish_flush()
        w[H_LOCK_PID] = self._pid
        if self._gone:
            self._reap_gone()
        doorbell = self._doorbell
        if doorbell is not None:
            if w[H_EPOCH] != self._epoch or self.slots.token(doorbell.slot) != doorbell.token:
                self._register_again(doorbell)
            elif time.monotonic() >= doorbell.next_lapse:
                self._drop_lapsed(doorbell)
        self._epoch = w[H_EPOCH]

    def _forget_parent_process(self) -> None:
        # A forked child shares nothing process-local with its parent but the mapping.
        self._pid = os.getpid()
        self._doorbell = None
        self._slot_guard = threading.Lock()
        self._slots_full_until = 0.0
        self._checker = None  # the parent's thread does not exist here
        self._checker_guard = threading.Lock()
        self._ringer = Ringer()
        self._rings, self._gone = [], []
        self._local = threading.local()

    def _reap_gone(self) -> None:
        # Each was found with its socket gone or refusing and its slot byte unlocked: dead.
        while self._gone:  # appended to by rings outside the lock: pop, never swap
            slot, token = self._gone.pop()
            self.slots.release(slot, token)
        self.journal.commit()

    def _ring(self, rings: list[tuple[int, int, bytes]]) -> None:
        """Ring each process once for all the channels an operation made non-empty."""
        channels: dict[tuple[int, int], set[bytes]] = {}
        for slot, token, channel in rings:
            channels.setdefault((slot, token), set()).add(channel)
        for (slot, token), names in channels.items():
            payload = b"\n".join(names)
            if b"" in names or len(payload) > RING_BYTES:
                payload = b""
            address = doorbell_address(self.prefix, token)
            result = self._ringer.ring(address, payload)
            if result == FULL:
                self.slots.mark_missed(slot)
                result = self._ringer.ring(address, b"")
            if result == GONE and self._died(slot, token):
                self._gone.append((slot, token))

    def _died(self, slot: int, token: int) -> bool:
        """A ring to ``(slot, token)`` found no one: True if its process is dead (its slot byte
        is unlocked), after removing its socket. Asked outside the lock; the slot is freed at
        the next lock hold only if it still carries ``token``."""
        doorbell = self._doorbell
        if doorbell is not None and doorbell.slot == slot:
            return False  # our own byte reads as unlocked to us; and we are alive
        if self.segment.closed or self.slots.locked(self.segment.fd, slot):
            return False  # the holder lives (a new one that has not recorded its token yet)
        remove_doorbell(self.prefix, token)
        return True

    def _register_again(self, doorbell: Doorbell) -> None:
        """After a flush, or once this process has claimed its slot, register the receives
        still waiting here again."""
        if self.slots.token(doorbell.slot) != doorbell.token:
            # Its slot byte is ours from claim to close, so no live process can have the slot:
            # record our token (the first time, or again if someone cleared it).
            self.slots.record(doorbell.slot, doorbell.token)
        for channel in doorbell.forget_registrations():
            self.journal.checkpoint()
            rec = self.queues.add_waiter(channel, doorbell.slot, doorbell.token)
            if rec:
                doorbell.note_registered(channel, rec)
        self.journal.commit()

    def _drop_lapsed(self, doorbell: Doorbell) -> None:
        for channel in doorbell.lapsed():
            self.journal.checkpoint()
            self.queues.remove_waiter(channel, doorbell.slot, doorbell.token)
        self.journal.commit()

    def _leave(self, doorbell: Doorbell) -> None:
        """Under the lock, on close: drop this process's registrations and free its slot, so
        that nothing stale is left for senders and the sweep to prune."""
        for channel in list(doorbell.registered):
            self.journal.checkpoint()
            self.queues.remove_waiter(channel, doorbell.slot, doorbell.token)
        self.slots.release(doorbell.slot, doorbell.token)

    def _check_later(self) -> None:
        """Make sure the checker thread runs: called once a receive is tracked (so that a
        thread deciding to end, under the same guard, sees it or is replaced)."""
        with self._checker_guard:
            if self._checker is None:
                stop = threading.Event()
                thread = threading.Thread(
                    target=self._run_checks, args=(stop,), daemon=True,
                    name=f"asgi_ipc check {self.prefix}",
                )
                self._checker = (thread, stop)
                thread.start()

    def _run_checks(self, stop: threading.Event) -> None:
        """The checker thread: the periodic check every ``CHECK_INTERVAL`` while this process
        has receives waiting or registrations lingering (see wakeup.py), then it ends.

        A thread rather than ``loop.call_later``, because a callback scheduled in an event loop
        dies with it, and loops come and go while receives of other loops still wait. A check
        that fails (every process slot taken, say) is logged and tried again at the next
        interval: the receives it stands guard over may depend on it."""
        while not stop.wait(CHECK_INTERVAL):
            try:
                self._check()
            except Exception:
                logger.exception(
                    "%s: the periodic check of waiting receives failed; trying again in %s s",
                    self.name, CHECK_INTERVAL,
                )
            with self._checker_guard:
                if self._checker is None or self._checker[1] is not stop:
                    return  # closed
                doorbell = self._doorbell
                if doorbell is None or not doorbell.needs_checking():
                    self._checker = None
                    return

    def _check(self) -> None:
        """One periodic check: register the receives that could not be (memory was full),
        and wake those whose channels hold messages, each in its own event loop."""
        doorbell = self._doorbell
        if self._closed or doorbell is None or self._pid != os.getpid():
            return
        doorbell.drop_closed_loops()

        def hold() -> tuple[list[bytes], list[bytes]]:
            # Taking the lock also drops the registrations that have lapsed.
            waiting = doorbell.waiting_channels()
            for channel in waiting:
                if channel in doorbell.registered:
                    continue
                # A registration that failed for want of memory is tried again here.
                self.journal.checkpoint()
                rec = self.queues.add_waiter(channel, doorbell.slot, doorbell.token)
                if rec:
                    doorbell.note_registered(channel, rec)
            return waiting, [c for c in waiting if self.queues.has_messages(c)]

        waiting, ready = self.locked(hold)
        doorbell.wake(ready)

    # --- operations ------------------------------------------------------------------------

    def send(self, channel: bytes, data: bytes, capacity: int, expiry_ms: int) -> int:
        now = now_ms()
        crc = zlib.crc32(data)

        def hold() -> int:
            result = self.queues.append(
                channel, data, crc, capacity, now + expiry_ms, now, self._rings
            )
            self.journal.add(_SEND_OUTCOME[result])
            self.queues.expire(now, EXPIRE_PER_SEND)
            self.queues.sweep(SWEEP_BUCKETS_PER_SEND)
            return result

        return self.locked(hold)

    async def receive(self, channel: bytes) -> bytes:
        """The next message of ``channel``, waiting for one as long as it takes.

        A receive on a channel this process is still registered on, found empty, waits
        without taking the lock (``_wait_unlocked``). Otherwise it is served at once, in a lock
        hold of its own, unless its event loop is *gathering*: another task of the loop was
        served so in the same pass of the loop, or the last lock hold handed out several
        messages, whose receivers will soon ask again. Then receives are collected until the
        running callbacks are done and served together in one lock hold: that is how a process
        draining many channels takes one message from each per hold."""
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        waiter = Waiter(loop, channel)
        if not self._wait_unlocked(waiter):
            state = self._loop_state(loop)
            task = asyncio.current_task()
            if state.gathering or state.served_task not in (None, task):
                if not state.batch:
                    loop.call_soon(self._serve_gathered, state.batch)
                state.batch.append(waiter)
            else:
                if state.served_task is None:
                    loop.call_soon(self._next_pass, state)
                state.served_task = task
                self._serve([waiter])
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def _loop_state(self, loop: asyncio.AbstractEventLoop) -> threading.local:
        state = self._local
        if getattr(state, "loop", None) is not loop:
            state.loop, state.batch, state.gathering, state.served_task = loop, [], False, None
        return state

    @staticmethod
    def _next_pass(state: threading.local) -> None:
        state.served_task = None

    def _serve_gathered(self, batch: list[Waiter]) -> None:
        waiters = batch[:]
        batch.clear()
        self._serve(waiters)

    def _claim_and_serve(self, waiter: Waiter) -> None:
        """After the lock hold that found ``waiter``'s channel empty while this process had no
        slot: claim one without the lock, then serve the receive again; or fail it if every
        slot is held."""
        if waiter.future.done():
            return
        try:
            self._take_slot()
        except Exception as exc:  # the wake-up directory is not ours (ForeignObject), ...
            waiter.future.set_exception(exc)
            return
        if self._closed:
            waiter.future.set_exception(self._closed_error())
        elif self._doorbell is None:
            waiter.future.set_exception(self._slots_full())
        else:
            self._serve([waiter])

    def _slots_full(self) -> StoreError:
        return StoreError(
            f"{self.name}: all {SLOTS} process slots are held by processes waiting in "
            f"receive(), so this one cannot wait (the limit is fixed by the store's layout); "
            f"run fewer receiving processes with prefix {self.prefix!r}, or spread them over "
            f"several prefixes. Sends and other operations still work; a receive looks for a "
            f"free slot again after {CHECK_INTERVAL:g} s"
        )

    def _take_slot(self) -> None:
        """Without the lock: claim a process slot (lock its byte) and bind this process's
        doorbell, which the next lock hold records. Every slot held: none is looked for again
        for ``CHECK_INTERVAL``."""
        with self._slot_guard:
            if (
                self._doorbell is not None
                or self._closed
                or time.monotonic() < self._slots_full_until
            ):
                return
            fd = self.segment.fd
            slot = self.slots.claim(fd)
            if slot < 0:
                self._slots_full_until = time.monotonic() + CHECK_INTERVAL
                return
            try:
                doorbell = Doorbell(
                    self.prefix, lambda: self.slots.take_missed(doorbell.slot), self._serve
                )
            except BaseException:
                self.slots.unlock(fd, slot)
                raise
            doorbell.slot = slot
            dead = self.slots.token(slot)
            if dead:
                remove_doorbell(self.prefix, dead)  # its holder died: we hold its byte now
            self._doorbell = doorbell

    def _wait_unlocked(self, waiter: Waiter) -> bool:
        """Start ``waiter`` waiting without the lock, if that is safe: True if it waits.

        It is safe when this process is still registered on the channel (its registration
        lingers) and the channel is empty: any send that makes it non-empty then rings this
        process, and the waiter, tracked before the count was read, is found by that ring.
        Reading the epoch after the count rules out a flush that moved the record; one that
        comes later rings every process anyway."""
        doorbell = self._doorbell
        if doorbell is None or self._pid != os.getpid():
            return False
        rec = doorbell.registered.get(waiter.channel)
        if rec and self.queues.queued_at(rec):
            return False  # a message is there already (or the record moved): take it locked
        rec = doorbell.add(waiter.channel, waiter)
        w = self.words
        if (
            not rec
            or self.queues.queued_at(rec)
            or w[H_FLUSHING]
            or w[H_EPOCH] != self._epoch
            or self.slots.token(doorbell.slot) != doorbell.token
        ):
            return False
        self._check_later()
        return True

    def _serve(self, waiters: list[Waiter]) -> None:
        """In one lock hold, hand each receive of ``waiters`` (all of the running event loop)
        the next message of its channel, or make sure that a send will ring for it.

        Every receive taken here that does not wait on is settled before this returns, even
        when an exception (``KeyboardInterrupt`` included) cuts the lock hold short: with its
        message if that was taken for good, else with the error."""
        if len(waiters) > 1:
            waiters = list(dict.fromkeys(waiters))  # a receive rung twice is served once
        waiters = [w for w in waiters if not w.future.done()]
        if not waiters:
            return
        if self._closed:
            for waiter in waiters:
                waiter.future.set_exception(self._closed_error())
            return
        handed: list[tuple[Waiter, bytes]] = []
        failed: list[tuple[Waiter, BaseException]] = []
        # Channels this hold registered on since the journal last committed: if the hold
        # fails, the rollback takes those registrations back.
        fresh: list[bytes] = []
        journal = self.journal
        # The journal may commit between waiters (when it fills up, or before memory is
        # reused): the messages handed before such a commit are taken for good.
        commits, settled = journal.commits, 0
        now = now_ms()
        interrupted: BaseException | None = None

        def hold() -> None:
            nonlocal commits, settled, fresh
            if self._closed:  # closed by another thread since the look above
                raise self._closed_error()
            epoch = self.words[H_EPOCH]
            # Taken under the lock, after recovery brought them up to date.
            doorbell = self._doorbell
            records = doorbell.registered if doorbell is not None else {}
            try:
                for waiter in waiters:
                    journal.checkpoint()
                    found = self.queues.pop(waiter.channel, now, records.get(waiter.channel, 0))
                    registered = False
                    if found is None:
                        try:
                            registered = self._wait_locked(waiter)
                        except StoreError as exc:
                            failed.append((waiter, exc))
                    if journal.commits != commits:
                        commits, settled, fresh = journal.commits, len(handed), []
                    if registered:
                        fresh.append(waiter.channel)
                    if found is not None:
                        handed.append((waiter, found[0]))
                        waiter.expires, waiter.epoch = found[1], epoch
            except BaseException:
                # Forgotten under the lock, before the rollback takes them back.
                if self._doorbell is not None:
                    self._doorbell.forget(fresh)
                raise

        try:
            self.locked(hold)
            settled = len(handed)
            if settled + len(failed) < len(waiters):
                # Some wait now, tracked by the doorbell: make sure the checker runs. Started
                # here rather than under the lock, where no other process should wait on it.
                self._check_later()
        except BaseException as exc:
            if journal.commits != commits:
                settled = len(handed)
            error = exc
            if not isinstance(exc, Exception):
                interrupted = exc
                error = StoreError(f"the receive was interrupted by {type(exc).__name__}")
                error.__cause__ = exc
            served = {waiter for waiter, _data in handed[:settled]}
            failed = [(waiter, error) for waiter in waiters if waiter not in served]
        for waiter, data in handed[:settled]:
            self._stop_tracking(waiter)
            waiter.future.set_result(data)
        for waiter, exc in failed:
            self._stop_tracking(waiter)
            waiter.future.set_exception(exc)
        self._loop_state(waiters[0].loop).gathering = settled > 1
        if interrupted is not None:
            raise interrupted

    def _wait_locked(self, waiter: Waiter) -> bool:
        """Under the lock, with ``waiter``'s channel found empty: make sure a send rings.
        True if this registered the process on the channel.

        When channel memory has no room for the registration (a small block), the receive
        waits unregistered rather than fail: no send rings for it, but the periodic check
        registers it once memory frees, and hands it a message as soon as its channel holds
        one, so in that degraded mode a receive learns of its message within
        ``CHECK_INTERVAL``. Reserving the room instead would cost every waiting channel
        memory of its own up front, and a full store is exactly when a message must get
        through to the receivers that drain it."""
        doorbell = self._doorbell
        if doorbell is None:
            # The first wait of this process: a slot is claimed without the lock, after it.
            if time.monotonic() < self._slots_full_until:
                raise self._slots_full()
            waiter.loop.call_soon(self._claim_and_serve, waiter)
            return False
        if self.slots.token(doorbell.slot) != doorbell.token:
            self._register_again(doorbell)  # records the slot claimed without the lock
        if doorbell.add(waiter.channel, waiter):
            return False
        rec = self.queues.add_waiter(waiter.channel, doorbell.slot, doorbell.token)
        if not rec:
            return False  # waits unregistered: see above
        doorbell.note_registered(waiter.channel, rec)
        return True

    def _stop_tracking(self, waiter: Waiter) -> None:
        doorbell = self._doorbell
        if doorbell is not None:
            doorbell.discard(waiter.channel, waiter)

    def _abandon(self, waiter: Waiter) -> None:
        """A receive was cancelled. If a message had been handed to it already, it goes back
        first in its channel; otherwise the receive just stops waiting."""
        future = waiter.future
        if not future.done() or future.cancelled() or future.exception() is not None:
            self._stop_tracking(waiter)
            return
        data = future.result()
        if self.segment.closed or waiter.expires <= now_ms():
            return

        def hold() -> bool:
            if self.words[H_EPOCH] != waiter.epoch:
                return True  # flushed since: it would have gone with the rest
            return self.queues.put_back(
                waiter.channel, data, zlib.crc32(data), waiter.expires, self._rings
            )

        if self.locked(hold):
            return
        logger.warning(
            "%s: a message taken by a cancelled receive on %r was lost: no channel memory "
            "left to put it back", self.name, waiter.channel.decode(),
        )

    def group_add(self, group: bytes, channel: bytes) -> None:
        self.locked(self.groups.add, group, channel, now_ms())

    def group_discard(self, group: bytes, channel: bytes) -> None:
        self.locked(self.groups.discard, group, channel)

    def group_send(self, group: bytes, data: bytes, capacity_of, expiry_ms: int,
                   group_expiry_ms: int) -> tuple[int, int]:
        """Queue ``data`` on every member with room; (members, members skipped)."""
        now = now_ms()

        def hold() -> tuple[int, int]:
            self.journal.add(H_GROUP_SENDS)
            members = self.groups.members(group, now - group_expiry_ms)
            self.groups.sweep(now - group_expiry_ms)
            skipped = self.queues.append_to_all(
                members, data, zlib.crc32(data), capacity_of, now + expiry_ms, now, self._rings
            )
            self.queues.expire(now, EXPIRE_PER_SEND)
            return len(members), skipped

        return self.locked(hold)

    def flush(self) -> None:

        def hold() -> None:
            self.words[H_FLUSHING] = self.words[H_EPOCH] + 1
            self._finish_flush()

        self.locked(hold)

    def _finish_flush(self) -> None:
        w = self.words
        format_areas(w, self.geometry, self.segment.reserve)
        w[H_EPOCH] = w[H_FLUSHING]
        w[H_FLUSHING] = 0
        # Every waiting process must register again: ring them all.
        for slot, _pid, token in self.slots.live():
            self._rings.append((slot, token, b""))

    # --- inspection ------------------------------------------------------------------------

    def inspect(self, top: int = 10, check: bool = True) -> dict:
        """Walk the whole store under the lock: its problems (empty when consistent) and
        figures, the ``top`` deepest channels and largest groups among them, and the counters
        (layout.COUNTERS). O(everything): for the command line, observe.py and tests, not for
        serving. With ``check`` False nothing is checked (``problems`` is None) and the walk
        reads the counts that channel and group records keep rather than walking every
        message and membership (see ``ChannelQueues.verify``).

        A process that has exited is nowhere counted as waiting: not in
        ``waiting_processes``, not in a channel's waiters; its leftover registrations are
        ``dead_waiters``."""
        lock_holder = self.segment.lock_holder()

        def hold() -> dict:
            w = self.words
            now = now_ms()
            # A slot is live while its holder keeps its byte locked: one that has exited still
            # carries its pid and token, and its waiters are not waiting.
            doorbell, fd = self._doorbell, self.segment.fd
            live = [
                (slot, pid, token) for slot, pid, token in self.slots.live()
                if self.slots.locked(fd, slot)
                or (doorbell is not None and (slot, token) == (doorbell.slot, doorbell.token))
            ]
            alive = {(slot, token) for slot, _pid, token in live}
            queues = self.queues.verify(now, alive, top, check)
            groups = self.groups.verify(top, check)
            in_queues, in_groups = queues.pop("problems"), groups.pop("problems")
            problems = None
            if check:
                problems = (
                    self.queues.heap.verify() + self.groups.heap.verify() + in_queues + in_groups
                )
            return {
                "prefix": self.prefix,
                "name": self.name,
                "problems": problems,
                "now": now,
                "counters": {name: w[word] for name, word in COUNTERS.items()},
                "epoch": w[H_EPOCH],
                "lock_holder": lock_holder,
                "waiting_processes": sorted({pid for _slot, pid, _token in live}),
                "channel_memory": self._heap_figures(self.queues.heap),
                "group_memory": self._heap_figures(self.groups.heap),
                **queues,
                **groups,
            }

        return self.locked(hold)

    @staticmethod
    def _heap_figures(heap: Heap) -> dict:
        used = heap.used_words()
        return {
            "size": heap.size_words * WORD,
            "used": used * WORD,
            "free": (heap.size_words - used) * WORD,
            "largest_free": heap.largest_free_words() * WORD,
        }

    def verify(self) -> list[str]:
        """Every inconsistency found in the store; an empty list means it is sound."""
        return self.inspect()["problems"]

    def _closed_error(self) -> StoreClosed:
        return StoreClosed(f"the store {self.name} was closed in this process")

    def close(self) -> None:
        """Detach from the store; its contents stay. Every receive of this store still
        waiting, in whichever event loop or thread, raises ``StoreClosed`` (settled in its own
        loop); a receive called after this raises it at once."""
        if self._pid != os.getpid():
            # A forked child that never took the lock still holds its parent's doorbell and
            # thread state: it must not close the parent's socket or join its thread.
            self._forget_parent_process()
        if self._closed:
            return
        self._closed = True
        with self._checker_guard:
            checker, self._checker = self._checker, None
        if checker is not None:
            thread, stop = checker
            stop.set()
            if thread is not threading.current_thread():
                thread.join()  # at most one check under way: the segment must outlive it
        with self._slot_guard:  # a slot claim under way finishes first, and is closed here
            doorbell, self._doorbell = self._doorbell, None
        try:
            if doorbell is not None:
                try:
                    # After it, no lock hold of this process tracks a receive.
                    self.locked(self._leave, doorbell)
                except Exception:
                    # The slot is freed anyway once its byte is unlocked below.
                    logger.exception("%s: could not leave the store cleanly on close", self.name)
        finally:
            # Whatever happened above, nothing of this process may be left half open.
            if doorbell is not None:
                waiters = doorbell.close()  # removes its socket while the byte says we live
                self.slots.unlock(self.segment.fd, doorbell.slot)
                for waiter in waiters:
                    self._end_elsewhere(waiter, self._closed_error())
            self._ringer.close()
            self.segment.close()

    @staticmethod
    def _end_elsewhere(waiter: Waiter, exc: BaseException) -> None:
        """Settle ``waiter`` with ``exc`` in its own event loop, from any thread."""

        def end() -> None:
            if not waiter.future.done():
                waiter.future.set_exception(exc)

        try:
            waiter.loop.call_soon_threadsafe(end)
        except RuntimeError:
            pass  # its loop is closed: nobody waits on it any more
