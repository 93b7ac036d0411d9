"""``Engine``: a prefix's store as one process sees it, with no asyncio and no sockets.

``Engine`` holds the segment (segment.py), its lock (lock.py) and journal (journal.py), the two
heaps (heap.py), the channel queues (queues.py), the groups (groups.py), both kept in the one
chained hash index (index.py), and the process slots (slots.py). Each public method is one lock
hold, made so by ``one_hold``: take the global lock and repair what a dead holder left
(``_recover``: roll back an open journal, finish a cut-off flush), run the operation, commit the
journal (or roll it back if anything raised), release. What commits an operation, and what a
kill in between leaves, is said once in journal.py.

The engine never calls back up. It returns plain results, and leaves in ``due`` the doorbells
its holds found to ring, ``(slot, token, channel)``, for the caller (receiver.py) to ring once
the lock is released, so that no other process ever waits on a syscall made under the lock.
``Seat`` (slots.py) is this process's place in the store once it has waited or made a channel:
the engine keeps its registrations up to date under the lock; the receiver tracks its receives
in it.

A process owns the process-specific channels it makes (``own``) or waits on first; once it is
gone, what they hold is *reaped* (queues.py says how). Whoever finds it gone hands its slot to
the reaper: a ring that finds no one and its slot byte unlocked, and ``look_for_dead``, which
tests the slot bytes of the owners without the lock, put it in ``gone``, and the next hold frees
its slot (``_reap_gone``); ``leave`` (close) and a process that takes the slot over do the same
for theirs. The reaping itself is bounded work that any hold may take on: ``reap`` (a hold
given to it, ``REAP_PER_HOLD`` steps), each send and the periodic check.

``flush`` cannot be undone cheaply (it may free millions of blocks), so it is redone instead: it
first stores the epoch it moves to in ``H_FLUSHING``; that store is its commit. Then it clears
the areas (returning their pages to the kernel), bumps the epoch and clears ``H_FLUSHING``. A
process that finds ``H_FLUSHING`` set when it takes the lock does the same again, which is
harmless since clearing twice is clearing once. Process slots survive a flush, but not the
channels they own (a process that waits again owns its channels again); every process with a
slot is rung to register its waits again.

Seams for tools and tests: ``open_engine(prefix)`` attaches to an existing store;
``IPCChannelLayer.engine()`` is the one a layer uses; ``Engine.wake_dir`` is the store's wake-up
directory (doorbell.py). ``Engine(..., clock=...)`` replaces the clock (milliseconds since the
epoch) that expiries are computed from. ``Engine.locked`` runs any function as one lock hold, to
read the store consistently. ``Engine.inject`` sets fault hooks (after each journaled write,
before each step of a flush) for crash tests. ``look_for_dead``, ``reaping`` and ``reap`` reap
the channels of processes that are gone, as the periodic check does.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import secrets
import time
import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from ..exceptions import StoreClosed, StoreCorrupted
from .clock import now_ms
from .compiled import warn_if_not_built  # the package imported it first, before any part
from .groups import GroupStore
from .heap import Heap
from .inbox import Applied, Entry, apply_batch
from .index import KeyedHash
from .journal import Journal
from .layout import (
    COUNTERS,
    H_CHANNEL_FULL,
    H_EPOCH,
    H_FLUSHING,
    H_GROUP_SENDS,
    H_HOST_ID,
    H_JOURNAL_COUNT,
    H_LOCK_PID,
    H_MAGIC,
    H_NO_MEMORY,
    H_PARCELS_TO_FREE,
    H_REAP_HEAD,
    H_REAPED_MEMBERSHIPS,
    H_SENT,
    MAGIC,
    OWNED_MARK,
    WORD,
)
from .lock import OwnDescription, process_id
from .queues import OUT_OF_MEMORY, OVER_CAPACITY, QUEUED, ChannelQueues
from .segment import Segment, format_areas, heaps, removal_hint
from .slots import ProcessSlots, Seat, slot_locked

logger = logging.getLogger(__name__)

# Bounded background work that each send does for the store as a whole: it reclaims up to
# EXPIRE_PER_SEND expired messages from the front of the order of sending, and as many again in
# the SWEEP_BUCKETS_PER_SEND buckets of the channel index that the sweep passes (queues.py).
EXPIRE_PER_SEND = 2
SWEEP_BUCKETS_PER_SEND = 4
# The most steps of reaping (a membership, a message or a channel of a process that is gone,
# see ``Engine.reap``) that a send takes on, and that a hold given to reaping takes.
REAP_PER_SEND = 16
REAP_PER_HOLD = 256

# Lending (queues.py): how many messages a receive on a channel its process owns takes beside
# its own, and about how many bytes, and the most a lock hold lends in all (about 3 ms of
# work), shared out evenly among the channels of the batch. A lend never commits on its own:
# its ~30 journal entries a message fit in the room ``Journal.checkpoint`` leaves.
LEND_PER_CHANNEL = 64
LEND_BYTES = 256 * 1024
LEND_PER_HOLD = 4096

# What ``Engine.put_back`` did with a message given back.
NO_ROOM, BACK, BEFORE_PARCELS = 0, 1, 2

HASH_CACHE_SIZE = 1 << 16

_CORRUPTION = (IndexError, ValueError, OverflowError, TypeError)

# The counter of each outcome of a send (see layout.py).
_SEND_OUTCOME = {QUEUED: H_SENT, OVER_CAPACITY: H_CHANNEL_FULL, OUT_OF_MEMORY: H_NO_MEMORY}

T = TypeVar("T")


class Taken:
    """What ``Engine.take`` did for a batch of receives (or ``Engine.take_queued`` for one,
    with None for its receive and for what was lent), filled in as it goes so that it is there
    even when the hold fails:

    ``handed``: (receive, message, expiry, lent) of each receive handed a message, in order,
    where ``lent`` are the next messages of its channel, (message, expiry), lent to this
    process along with it (``ChannelQueues.lend``);
    ``durable``: how many of ``handed`` are taken for good (committed), whatever happens next;
    ``failed``: (receive, error) of the receives that cannot wait (no room to track them);
    ``unseated``: the receives that found their channel empty while this process holds no
    slot: the caller claims one without the lock and tries them again;
    ``epoch``: the store's epoch while they were handed (a flush since takes them all);
    ``settled``: whether ``settle``, given by the caller as (epoch, {channel: messages}) of
    lent messages handed out since, is settled for good (``ChannelQueues.settle``);
    ``parcels``: (message, expiry, [channel]) of each parcel drained for this process at the
    start of the hold (``ChannelQueues.drain_parcel``), lent to it for each of those channels;
    ``drained``: how many of ``parcels`` are taken for good, whatever happens next;
    ``deferred``: the receives on channels that a parcel drained: not served by the hold, for
    the caller to hand them what was lent first (what the channel holds is newer).
    Every other receive of the batch waits, tracked by the seat."""

    __slots__ = ("handed", "durable", "failed", "unseated", "epoch", "settle", "settled",
                 "settle_commits", "parcels", "drained", "deferred")

    def __init__(self, settle: tuple[int, dict[bytes, int]] | None = None) -> None:
        # Made by the caller, before the lock is taken: the hold has nothing to allocate.
        self.handed: list[tuple[Any, bytes, int, Any]] = []
        self.durable = 0
        self.failed: list[tuple[Any, BaseException]] = []
        self.unseated: list[Any] = []
        self.epoch = 0
        self.settle = settle
        self.settled = False
        # The journal's commits before the settle: once they differ, it is settled for good.
        self.settle_commits: int | None = None
        self.parcels: list[tuple[bytes, int, list[bytes]]] = []
        self.drained = 0
        self.deferred: list[Any] = []


class _Registrations:
    """The registrations a hold made since the journal last committed. Each is noted in the
    seat only once listed here, so that when the hold fails, however late, ``forget`` takes out
    of the seat exactly those the rollback takes out of the store; an exception landing
    between the two steps leaves a channel listed but not noted, which forgetting ignores."""

    __slots__ = ("_journal", "seat", "_commits", "_channels")

    def __init__(self, journal: Journal, seat: Seat) -> None:
        self._journal, self.seat = journal, seat
        self._commits = journal.commits
        self._channels: list[bytes] = []

    def note(self, channel: bytes, rec: int) -> None:
        if self._journal.commits != self._commits:  # those listed are committed for good
            self._commits, self._channels = self._journal.commits, []
        self._channels.append(channel)
        self.seat.note_registered(channel, rec)

    def forget(self) -> None:
        """Under the lock, before the rollback: forget those the rollback takes back."""
        if self._journal.commits == self._commits:
            self.seat.forget(self._channels)


def one_hold(operation: Callable[..., T], timed: bool = False) -> Callable[..., T]:
    """Make the Engine method ``operation`` run as one lock hold: take the lock and recover,
    run it, commit (or roll back if it raised), move the rings it collected to ``due``,
    release. No exception, wherever it lands, keeps the lock held: the release is one C call in
    the ``finally`` (see lock.py). The one place where an operation commits at its end.

    ``operation(self, now, *args)`` is given the time if ``timed``, else 0. It is read from
    ``Engine.clock`` under the lock, so that the times of successive holds, in any process,
    follow the order of the holds as far as the clock goes forward: read before the lock, a
    time could be overtaken by a later one and link a membership out of time order. A clock
    stepped back still goes back between two holds, which groups.py and queues.py allow for."""

    def held(self: Engine, *args: Any) -> T:
        lock = self.segment.lock
        handle = lock.handle()
        try:
            handle.busy = True
            lock.acquire(handle)
            self._recover()
            now = self.clock() if timed else 0
            result = operation(self, now, *args)
            self.journal.commit()
            if self._rings:
                self.due.extend(self._rings)
                self._rings.clear()
        except BaseException as exc:
            if not handle.held:
                # It never held the lock, or gave it up at once because close() began (see
                # lock.py), or was cut off right after flock returned: it wrote nothing.
                if isinstance(exc, Exception) and (lock.closing or handle.closed):
                    raise self.closed_error() from exc
                raise  # KeyboardInterrupt and the like stay what they are
            self._abort()
            self.due.extend(self._rings)  # ours to take only while holding the lock
            self._rings.clear()
            if isinstance(exc, _CORRUPTION):
                raise self.corrupted(exc) from exc
            raise
        finally:
            # Not held from here on: close() may close the handle, which releases the lock too.
            handle.busy = handle.held = False
            try:
                fcntl.flock(handle, fcntl.LOCK_UN)
            except (ValueError, OSError):
                # Closed by close() in another thread, before or while this looked up its
                # descriptor: closing it released the lock.
                if not handle.closed:
                    raise
        return result

    held.__name__, held.__qualname__, held.__doc__ = (
        operation.__name__, operation.__qualname__, operation.__doc__
    )
    return held


def timed_hold(operation: Callable[..., T]) -> Callable[..., T]:
    """``one_hold`` for an operation that needs the time."""
    return one_hold(operation, timed=True)


class Engine:
    def __init__(
        self,
        prefix: str,
        channel_memory: int,
        group_memory: int,
        create: bool = True,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.segment = Segment(prefix, channel_memory, group_memory, create=create)
        warn_if_not_built()
        self.prefix = prefix
        # How messages name the store: its path.
        self.name = self.segment.path
        self.wake_dir = self.segment.wake_dir
        self.clock = clock
        g = self.geometry = self.segment.geometry
        words = self.words = self.segment.words
        self.journal = Journal(words, g.journal)
        message_heap, group_heap = heaps(words, self.journal, g, self.segment.reserve)
        self._hash = KeyedHash(self.segment.hash_key, HASH_CACHE_SIZE)
        self.slots = ProcessSlots(
            words, self.journal, g.slots, vacate=lambda slot: self.queues.orphan(slot)
        )
        self.queues = ChannelQueues(
            words, self.segment.mm, self.journal, message_heap, self.slots,
            g.channel_index, g.channel_buckets, self._hash,
        )
        self.groups = GroupStore(
            words, self.segment.mm, self.journal, group_heap,
            g.group_index, g.group_buckets, g.member_index, g.member_buckets, self._hash,
        )
        # Doorbells to ring, collected under the lock by the hold in progress, then moved to
        # ``due`` before the release; taken from ``due`` by whichever thread rings next.
        self._rings: list[tuple[int, int, bytes]] = []
        self.due: collections.deque[tuple[int, int, bytes]] = collections.deque()
        # (slot, token) of processes whose doorbell found no one and whose slot byte was free:
        # appended outside the lock, freed at the next hold.
        self.gone: list[tuple[int, int]] = []
        self.seat: Seat | None = None
        # The description holding this process's slot byte, from claim_slot to
        # release_slot_byte (see slots.py).
        self._slot_byte: OwnDescription | None = None
        # Set by the receiver when it starts closing: a take that gets the lock after it
        # raises StoreClosed rather than track receives nobody will end.
        self.closing = False
        self._flush_step: Callable[[str], None] | None = None
        self._pid = process_id()
        # The epoch this process last saw under the lock (a flush moves to the next one).
        self.epoch = words[H_EPOCH]

    @one_hold
    def locked(self, _now: int, operation: Callable[..., T], *args: Any) -> T:
        """Run ``operation(*args)`` as one lock hold (see ``one_hold``): the seam through which
        tools and tests read or change the store consistently."""
        return operation(*args)

    def _abort(self) -> None:
        """Undo what an operation cut short had changed, holding the lock: the shared journal
        count covers exactly the words changed since the last commit, ours or a dead holder's,
        so rolling it back is right either way; the caller's ``finally`` releases."""
        try:
            self.journal.rollback()
        except (StoreCorrupted, *_CORRUPTION):
            logger.exception("could not roll back a failed operation on %s", self.name)

    def inject(
        self,
        on_write: Callable[[int], None] | None = None,
        on_flush_step: Callable[[str], None] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        """Fault injection, for crash tests: call ``on_write(word)`` after each journaled
        write (``Journal.hook``), ``on_commit()`` after each commit (``Journal.commit_hook``),
        and ``on_flush_step("clear" or "format")`` before each step of a flush's clearing
        (``format_areas``). A hook that never returns (a sleep, a kill) leaves the store as a
        process killed at that point would; one that raises, as an exception (a signal
        handler's) landing there would."""
        if on_commit is not None:
            self.journal.commit_hook = on_commit
        if on_write is not None:
            self.journal.hook = on_write
        if on_flush_step is not None:
            self._flush_step = on_flush_step

    def closed_error(self) -> StoreClosed:
        return StoreClosed(f"the store {self.name} was closed in this process")

    def corrupted(self, exc: BaseException) -> StoreCorrupted:
        return StoreCorrupted(
            f"the store {self.name} is inconsistent ({type(exc).__name__}: {exc}); "
            f"run `asgi-ipc verify --prefix {self.prefix}`, or {removal_hint(self.prefix)}"
        )

    # --- recovery: the start of every hold -------------------------------------------------

    def _recover(self) -> None:
        w = self.words
        if w[H_MAGIC] != MAGIC:
            raise StoreCorrupted(f"{self.name} lost its magic word; {removal_hint(self.prefix)}")
        if self._pid != process_id():
            self.forget_parent_process()
        if w[H_JOURNAL_COUNT]:
            logger.warning("%s: rolling back an operation cut off by a dead process", self.name)
            self.journal.rollback()
        self.journal.begin()
        if w[H_FLUSHING]:
            logger.warning("%s: finishing a flush cut off by a dead process", self.name)
            self._finish_flush()
        w[H_LOCK_PID] = self._pid
        if self.gone:
            self._reap_gone()
        seat = self.seat
        if seat is not None:
            if w[H_EPOCH] != self.epoch or self.slots.token(seat.slot) != seat.token:
                self._register_again(seat)
            elif time.monotonic() >= seat.next_lapse:
                self._drop_lapsed(seat)
        self.epoch = w[H_EPOCH]

    def forget_parent_process(self) -> None:
        """In a forked child: nothing process-local of the parent's is ours but the mapping."""
        self._pid = process_id()
        self.seat = None
        self._slot_byte = None  # the parent's, closed in this process at the fork (lock.py)
        self._rings, self.gone = [], []
        self.due = collections.deque()

    def _reap_gone(self) -> None:
        # Each was found with its socket gone or refusing and its slot byte unlocked: dead.
        while self.gone:  # appended to by rings outside the lock: pop, never swap
            slot, token = self.gone.pop()
            self.slots.release(slot, token)
        self.journal.commit()

    def _register_again(self, seat: Seat) -> None:
        """After a flush, or once this process has claimed its slot, register the receives
        still waiting here again."""
        if self.slots.token(seat.slot) != seat.token:
            # Its slot byte is ours from claim to close, so no live process can have the slot:
            # record our token (the first time, or again if someone cleared it).
            self.slots.record(seat.slot, seat.token)
        fresh = _Registrations(self.journal, seat)
        try:
            for channel in seat.forget_registrations():
                self.journal.checkpoint()
                rec = self.queues.add_waiter(channel, seat.slot, seat.token)
                if rec:
                    fresh.note(channel, rec)
            self.journal.commit()
        except BaseException:
            fresh.forget()
            raise

    def _drop_lapsed(self, seat: Seat) -> None:
        for channel in seat.lapsed():
            self.journal.checkpoint()
            self.queues.remove_waiter(channel, seat.slot, seat.token)
        self.journal.commit()

    # --- operations: each one lock hold ----------------------------------------------------

    @timed_hold
    def send(self, now: int, channel: bytes, data: bytes, capacity: int, expiry_ms: int) -> int:
        """Queue ``data`` on ``channel`` unless it holds ``capacity`` messages: QUEUED,
        OVER_CAPACITY or OUT_OF_MEMORY."""
        result = self.queues.append(channel, data, zlib.crc32(data), capacity, now + expiry_ms,
                                    now, self._rings)
        self.journal.add(_SEND_OUTCOME[result])
        self.queues.expire(now, EXPIRE_PER_SEND)
        self.queues.sweep(now, SWEEP_BUCKETS_PER_SEND, EXPIRE_PER_SEND)
        if self.words[H_REAP_HEAD] or self.words[H_PARCELS_TO_FREE]:
            self._reap(REAP_PER_SEND)
        return result

    @timed_hold
    def take(self, now: int, waiters: list, taken: Taken) -> None:
        """Hand each receive of ``waiters`` (objects with a ``channel``) the next message of
        its channel, or make sure that a send will ring for it: track it in the seat and
        register this process on the channel. See ``Taken`` for what it reports.

        The journal may commit between receives (a checkpoint when it fills up, a step before
        memory is reused): the messages handed before such a commit are taken for good, which
        ``taken.durable`` counts when the hold fails; when it returns, all of them are.

        A receive on a channel this process owns, which no other receive of the batch waits
        on, is lent the next messages of its channel too (``LEND_PER_CHANNEL``), so that the
        receives after it need no lock hold; and the lent messages handed out since the last
        hold leave their channels' counts first (``taken.settle``)."""
        journal, queues = self.journal, self.queues
        handed = taken.handed
        if self.closing:
            raise self.closed_error()
        taken.epoch = self.words[H_EPOCH]
        if taken.settle is not None:
            taken.settle_commits = journal.commits
            self._settle(*taken.settle)
            taken.settled = True
        seat = self.seat  # taken under the lock, after recovery brought it up to date
        parceled: set[bytes] = set()
        if seat is not None and self.words[self.slots.parcels_at(seat.slot)]:
            # First of all: every message a channel holds is newer than its parcels.
            self._drain(now, seat, taken)
            for _data, _expires, names in taken.parcels:
                parceled.update(names)
        records = seat.registered if seat is not None else {}
        pop = queues.pop
        fresh = _Registrations(journal, seat) if seat is not None else None
        # Channels found or left empty: quiet once this hold commits (see ``Seat``).
        quiet: list[bytes] = []
        queued_at = queues.queued_at
        lendable = _lendable(waiters) if seat is not None else ()
        lend_each = min(LEND_PER_CHANNEL, LEND_PER_HOLD // max(len(lendable), 1))
        commits = journal.commits
        try:
            for waiter in waiters:
                channel = waiter.channel
                if parceled and channel in parceled:
                    taken.deferred.append(waiter)
                    continue
                journal.checkpoint()
                rec = records.get(channel, 0)
                found = pop(channel, now, rec)
                if found is None or rec and not queued_at(rec):
                    quiet.append(channel)
                if found is None:
                    if fresh is None:  # no seat
                        taken.unseated.append(waiter)
                    else:
                        try:
                            self._wait(fresh.seat, channel, waiter, fresh)
                        except StoreClosed as exc:
                            # Raised before anything was written; any other error fails the
                            # whole hold, which the rollback then undoes.
                            taken.failed.append((waiter, exc))
                if journal.commits != commits:
                    commits, taken.durable = journal.commits, len(handed)
                if found is not None:
                    lent: list = []
                    if seat is not None and channel in lendable and lend_each:
                        lent = queues.lend(
                            rec or queues.find(channel, queues.hash.of(channel)), now,
                            seat.slot, seat.token, lend_each, LEND_BYTES,
                        )
                    handed.append((waiter, found[0], found[1], lent))
                    if lent:
                        # Taken for good with the message they came with.
                        journal.commit()
                        commits, taken.durable = journal.commits, len(handed)
            # Committed here rather than by ``one_hold``, so that an exception landing right
            # after the commit still finds every message handed counted as taken for good.
            journal.commit()
            taken.durable = len(handed)
            if seat is not None and quiet:
                seat.quiet(quiet)
        except BaseException:
            if journal.commits != commits:
                taken.durable = len(handed)
            if fresh is not None:
                fresh.forget()
            raise

    @timed_hold
    def take_queued(self, now: int, channel: bytes, taken: Taken) -> None:
        """Take the next message of ``channel`` into ``taken.handed`` (with None for its
        receive) if it holds one, without waiting or registering: for a receive that expects
        its message queued, on a channel that no parcel or lending reaches (a name without
        "!"; see ``take``). Committed here, as ``take`` commits, so that ``taken.durable`` says
        whether it was taken for good when the hold fails after. A registered channel found or
        left empty is quiet, as ``take`` leaves it."""
        if self.closing:
            raise self.closed_error()
        taken.epoch = self.words[H_EPOCH]
        seat = self.seat
        rec = seat.registered.get(channel, 0) if seat is not None else 0
        found = self.queues.pop(channel, now, rec)
        if found is not None:
            taken.handed.append((None, found[0], found[1], None))
        # Counted from here: ``pop``'s checkpoints come before it unlinks the message, so
        # only this commit takes it for good, and ``durable`` says so even when an exception
        # lands right after it.
        commits = self.journal.commits
        try:
            self.journal.commit()
        finally:
            if self.journal.commits != commits:
                taken.durable = len(taken.handed)
        if seat is not None and rec and not self.queues.queued_at(rec):
            seat.quiet([channel])

    def _drain(self, now: int, seat: Seat, taken: Taken) -> None:
        """Under the lock, for ``take`` and ``check``: take every parcel lent to this process
        (``ChannelQueues.drain_parcel``) into ``taken.parcels``, and commit, counting in
        ``taken.drained`` those taken for good."""
        journal, queues, parcels = self.journal, self.queues, taken.parcels
        head = self.slots.parcels_at(seat.slot)
        if self.slots.token(seat.slot) != seat.token:
            return  # not ours: the slot was freed (they are to be freed with it)
        commits = journal.commits
        try:
            while self.words[head]:
                journal.checkpoint()
                if journal.commits != commits:
                    commits, taken.drained = journal.commits, len(parcels)
                queues.drain_parcel(seat.slot, now, parcels)
            journal.commit()
            taken.drained = len(parcels)
        except BaseException:
            if journal.commits != commits:
                taken.drained = len(parcels)
            raise

    def parcels_pending(self) -> bool:
        """Without the lock, a hint: whether parcels wait for this process."""
        seat = self.seat
        return seat is not None and self.slots.parcels_pending(seat.slot)

    def _settle(self, epoch: int, handed: dict[bytes, int]) -> None:
        """Under the lock, for ``take``: the lent messages handed out since the last hold
        leave their channels' counts, unless a flush (another ``epoch``) took the channels."""
        if epoch == self.words[H_EPOCH]:
            # No checkpoint: a settle commits whole or not at all, so that the caller can tell
            # which (``Taken.settle_commits``); the receiver gives at most SETTLE_PER_HOLD
            # channels, two journaled words each.
            for channel, count in handed.items():
                self.queues.settle(channel, count)
        self.journal.commit()

    def _wait(
        self, seat: Seat, channel: bytes, waiter: Hashable, fresh: _Registrations
    ) -> None:
        """Under the lock, with ``channel`` found empty: track ``waiter`` and make sure a send
        rings, registering the process on the channel (noted in ``fresh``) unless it is already.

        When channel memory has no room for the registration (a small block), the receive
        waits unregistered rather than fail: no send rings for it, but the periodic check
        registers it once memory frees, and hands it a message as soon as its channel holds
        one, so in that degraded mode a receive learns of its message within the check
        interval. Reserving the room instead would cost every waiting channel memory of its
        own up front, and a full store is exactly when a message must get through to the
        receivers that drain it."""
        if self.slots.token(seat.slot) != seat.token:
            self._register_again(seat)  # records the slot claimed without the lock
        if seat.add(channel, waiter):
            return
        rec = self.queues.add_waiter(channel, seat.slot, seat.token)
        if rec:  # else it waits unregistered: see above
            fresh.note(channel, rec)

    @one_hold
    def put_back(self, now: int, channel: bytes, data: bytes, expires: int, epoch: int,
                 taken: Taken) -> int:
        """Queue ``data``, handed to a receive that was then cancelled, first on ``channel``
        again: ``BACK`` if it is (or a flush since, at another ``epoch``, would have taken it
        anyway), ``NO_ROOM`` if there was no memory left for it.

        The parcels lent to this process are drained into ``taken`` first, as ``take`` does:
        one made since the message was handed may lend ``channel`` a newer message, which a
        take would hand before anything its list holds. Then it is not queued
        (``BEFORE_PARCELS``): the caller keeps it first among what the parcels lent."""
        if self.words[H_EPOCH] != epoch:
            return BACK  # flushed since: it would have gone with the rest
        seat = self.seat
        if seat is not None and self.words[self.slots.parcels_at(seat.slot)]:
            taken.epoch = epoch
            self._drain(now, seat, taken)
            if any(channel in names for _data, _expires, names in taken.parcels):
                return BEFORE_PARCELS
        if self.queues.put_back(channel, data, zlib.crc32(data), expires, self._rings):
            return BACK
        return NO_ROOM

    @timed_hold
    def check(self, now: int, seat: Seat, taken: Taken | None = None) -> list[bytes]:
        """The periodic check: drain the parcels lent to this process into ``taken`` (as
        ``take`` does), register the receives that could not be (memory was full), and
        return the channels waited on that hold messages. (Taking the lock also drops the
        registrations that have lapsed.)"""
        journal, waiting = self.journal, seat.waiting_channels()
        if taken is not None:
            taken.epoch = self.words[H_EPOCH]
            if self.words[self.slots.parcels_at(seat.slot)]:
                self._drain(now, seat, taken)
        fresh = _Registrations(journal, seat)
        try:
            for channel in waiting:
                if channel in seat.registered:
                    continue
                journal.checkpoint()
                rec = self.queues.add_waiter(channel, seat.slot, seat.token)
                if rec:
                    fresh.note(channel, rec)
            ready = [c for c in waiting if self.queues.has_messages(c)]
            self._reap(REAP_PER_HOLD)
            return ready
        except BaseException:
            fresh.forget()
            raise

    @one_hold
    def leave(
        self, _now: int, seat: Seat, settle: tuple[int, dict[bytes, int]] | None = None
    ) -> None:
        """On close: settle the lent messages handed out (``settle``, as ``Taken.settle``),
        drop this process's registrations and free its slot, so that nothing stale is left
        for senders and the sweep to prune; the channels it owned are to be reaped
        (``reap``), and what is lent to it still counts as reaped with them."""
        if settle is not None:
            self._settle(*settle)
        for channel in list(seat.registered):
            self.journal.checkpoint()
            self.queues.remove_waiter(channel, seat.slot, seat.token)
        self.slots.release(seat.slot, seat.token)

    def claim_slot(self) -> int:
        """Without the lock: lock the byte of a free process slot, on a description of the
        store opened for it alone; the slot, or -1 if every slot is held. Its token is recorded
        by the next hold once ``seat`` is set."""
        own = OwnDescription(self.segment.fd)
        slot = self.slots.claim(own.fd)
        if slot < 0:
            own.close()
        else:
            self._slot_byte = own
        return slot

    def release_slot_byte(self) -> None:
        """Unlock this process's slot byte, closing the description that holds it."""
        own, self._slot_byte = self._slot_byte, None
        if own is not None:
            own.close()

    def died(self, slot: int, token: int) -> bool:
        """Without the lock, for a ring to ``(slot, token)`` that found no one: True if its
        process is dead (its slot byte is unlocked); the caller removes its socket and adds it
        to ``gone``, freed at the next hold if the slot still carries ``token``."""
        return not (self.segment.closed or slot_locked(self.segment.fd, slot))

    @one_hold
    def own(self, _now: int, channel: bytes) -> None:
        """Make this process, which holds a slot (``seat``), the owner of the process-specific
        channel ``channel`` that it has just made: its memberships and messages go when the
        process does (``reap``). Nothing is recorded without a seat, nor without room in
        channel memory: the channel is then a channel like any other."""
        seat = self.seat
        if seat is not None:
            self.queues.own(channel, seat.slot, seat.token, True)

    # --- reaping: the channels of processes that are gone ----------------------------------

    def look_for_dead(self) -> int:
        """Without the lock: test the slot byte of every slot whose process owns channels, and
        add the processes found dead to ``gone``, for the next hold to hand their channels to
        the reaper. How many were found."""
        segment = self.segment
        found = 0
        for slot, token in self.slots.owners():
            if not (segment.closed or slot_locked(segment.fd, slot)):
                self.gone.append((slot, token))
                found += 1
        return found

    def reaping(self) -> bool:
        """Without the lock, a hint: whether channels of processes that are gone wait to be
        reaped (or this process found some such process, to hand to the reaper)."""
        return bool(self.gone or self.words[H_REAP_HEAD] or self.words[H_PARCELS_TO_FREE])

    @one_hold
    def reap(self, _now: int) -> bool:
        """Reap the channels of processes that are gone, ``REAP_PER_HOLD`` steps of it: True
        if some is left for the next call. See ``_reap``."""
        return self._reap(REAP_PER_HOLD)

    def _reap(self, steps: int) -> bool:
        """Under the lock: take up to ``steps`` steps of reaping, each self-contained (a
        ``Journal.checkpoint`` between two), so that the hold may commit after any of them and
        a kill leaves the reaping where the last commit left it. A step removes one membership
        of the first channel to reap from its group, or else drops one of its messages, or
        else ends its reaping (``ChannelQueues.disown``); first of all, while parcels of
        processes that are gone are left, a step frees one (``ChannelQueues.free_parcel``).
        True if some is left."""
        w, journal, queues = self.words, self.journal, self.queues
        for _ in range(steps):
            if w[H_PARCELS_TO_FREE]:
                journal.checkpoint()
                queues.free_parcel()
                continue
            rec = w[H_REAP_HEAD]
            if not rec:
                return False
            journal.checkpoint()
            member = queues.first_member(rec)
            if member:
                self.groups.remove(member)
                journal.add(H_REAPED_MEMBERSHIPS)
            elif not queues.reap_message(rec):
                queues.disown(rec)
        return bool(w[H_REAP_HEAD] or w[H_PARCELS_TO_FREE])

    @timed_hold
    def group_add(self, now: int, group: bytes, channel: bytes) -> None:
        # A process-specific channel's membership goes on its channel's list, to be reaped
        # with it.
        channel_list = self.queues.members_at(channel) if OWNED_MARK in channel else 0
        self.groups.add(group, channel, now, channel_list)

    @one_hold
    def group_discard(self, _now: int, group: bytes, channel: bytes) -> None:
        self.groups.discard(group, channel)

    @timed_hold
    def group_send(self, now: int, group: bytes, data: bytes,
                   capacity_of: Callable[[bytes], int], expiry_ms: int,
                   group_expiry_ms: int) -> tuple[int, int]:
        """Queue ``data`` on every member with room; (members, members skipped)."""
        self.journal.add(H_GROUP_SENDS)
        members = self.groups.members(group, now - group_expiry_ms)
        self.groups.sweep(now - group_expiry_ms)
        skipped = self.queues.append_to_all(
            members, data, zlib.crc32(data), capacity_of, now + expiry_ms, now, self._rings
        )
        self.queues.expire(now, EXPIRE_PER_SEND)
        if self.words[H_REAP_HEAD] or self.words[H_PARCELS_TO_FREE]:
            self._reap(REAP_PER_SEND)
        return len(members), skipped

    @one_hold
    def flush(self, _now: int) -> None:
        self.words[H_FLUSHING] = self.words[H_EPOCH] + 1
        self._finish_flush()

    def _finish_flush(self) -> None:
        w = self.words
        format_areas(w, self.geometry, self.segment.reserve, self._flush_step)
        w[H_EPOCH] = w[H_FLUSHING]
        w[H_FLUSHING] = 0
        # Every waiting process must register again: ring them all.
        for slot, _pid, token in self.slots.live():
            self._rings.append((slot, token, b""))

    # --- the multi-host layer's relay (engine/inbox.py) -----------------------------------

    @one_hold
    def host_id(self, _now: int) -> int:
        """The id of this store among the hosts of a multi-host layer: random, set by the
        first hold that asks, never 0, kept for the store's life (a flush keeps it)."""
        if not self.words[H_HOST_ID]:
            self.journal.set(H_HOST_ID, secrets.randbits(64) or 1)
        return self.words[H_HOST_ID]

    @timed_hold
    def apply_relayed(self, now: int, epoch: int, start: tuple[int, int],
                      read_from: tuple[int, int], entries: Sequence[Entry],
                      capacity_of: Callable[[bytes], int], expiry_ms: int,
                      group_expiry_ms: int) -> Applied:
        """Apply a batch of this host's inbox, read from after ``read_from``, and move the
        inbox position past it, in one hold, skipping what the position says was applied
        (see engine/inbox.py)."""
        result = apply_batch(self, now, epoch, start, read_from, entries, capacity_of,
                             expiry_ms, group_expiry_ms)
        self.queues.expire(now, EXPIRE_PER_SEND)
        return result

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
            now = self.clock()
            # A slot is live while its holder keeps its byte locked: one that has exited still
            # carries its pid and token, and its waiters are not waiting.
            fd = self.segment.fd
            live = [
                (slot, pid, token) for slot, pid, token in self.slots.live()
                if slot_locked(fd, slot)
            ]
            alive = {(slot, token) for slot, _pid, token in live}
            queues = self.queues.verify(now, alive, top, check)
            groups = self.groups.verify(top, check, queues.pop("member_lists", []))
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
                "channel_memory": _heap_figures(self.queues.heap),
                "group_memory": _heap_figures(self.groups.heap),
                **queues,
                **groups,
            }

        return self.locked(hold)

    def verify(self) -> list[str]:
        """Every inconsistency found in the store; an empty list means it is sound."""
        return self.inspect()["problems"]

    def close(self) -> None:
        """Detach from the segment; the store's contents stay."""
        self.segment.close(before_unmap=self._detach_parts)

    def _detach_parts(self) -> None:
        # Compiled, each part holds the word view, which must be let go of before the segment
        # unmaps it; and only once no hold is under way (``Segment.close``).
        for part in (self.queues, self.groups, self.queues.heap, self.groups.heap, self.journal):
            part.detach()


def _lendable(waiters: list) -> set[bytes]:
    """The process-specific channels that one receive of ``waiters`` alone waits on: the
    channels a take may lend messages of (``Engine.take``)."""
    once: set[bytes] = set()
    again: set[bytes] = set()
    for waiter in waiters:
        channel = waiter.channel
        if OWNED_MARK in channel:
            (again if channel in once else once).add(channel)
    return once - again


def _heap_figures(heap: Heap) -> dict:
    used = heap.used_words()
    return {
        "size": heap.size_words * WORD,
        "used": used * WORD,
        "free": (heap.size_words - used) * WORD,
        "largest_free": heap.largest_free_words() * WORD,
    }


def open_engine(prefix: str, clock: Callable[[], int] = now_ms) -> Engine:
    """Attach to the existing store of ``prefix`` (for tools and tests), with its sizes."""
    return Engine(prefix, 0, 0, create=False, clock=clock)

