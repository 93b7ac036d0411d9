"""The asyncio side of a store: receives that wait, the doorbell that wakes them, and the rings
this process owes other processes.

``Receiver`` wraps one ``Engine`` (engine/) per layer. Every store operation is one engine call
(one lock hold); what the receiver adds is what needs event loops, sockets or threads:

* the receives waiting in this process (``Waiter``), tracked in the engine's ``Seat``, woken by
  this process's ``Doorbell`` (doorbell.py) or by the periodic check;
* gathering: the receives of one event loop asked in the same pass of the loop are served by one
  ``Engine.take`` (see ``receive``);
* the queued message: a receive served alone, on a channel that is not quiet, first looks for
  its message in a lock hold of its own with nothing to track (``_take_queued``), which took a
  receive of a queued message from 10.5 to 6.5 us;
* the lock-free wait on a quiet channel (``_wait_unlocked``, with the invariant that makes it
  safe, and why it reads nothing of the store that a flush gives back);
* the rings: after each engine call, the doorbells it left in ``Engine.due`` are rung
  (``_ring``), one datagram per process naming all its channels;
* the periodic check, in a thread of its own (``_run_checks``), which makes up for lost rings,
  and looks for processes that died owning channels and reaps those (``_reap``);
* cancellation (``_abandon``) and close (``StoreClosed`` to every receive still waiting).

A receive's message leaves the store when the lock hold that serves it commits, and reaches its
caller after the lock is released: a process killed in between loses it (delivery is at most
once). A receive cancelled in between (by its task's cancellation, or by asyncio's own Ctrl-C
handling, which cancels the main task from a signal handler at any instant) *returns* its
message (``_return``): it goes back first in its channel, unless it expired or a flush came in
between, which would have taken it with the rest. The memory its take freed may be gone by then,
taken by a send; the message then stays in this process, handed first to the next receive of
its channel here and put back by the periodic check as soon as there is room: only a process
that dies or closes while channel memory stays full loses it (close() logs each one).

No receive is left waiting for ever: one whose lock hold fails (whatever the exception) gets the
error, unless its message was taken for good, which it gets; ``close`` ends every receive still
waiting, in any event loop or thread, with ``StoreClosed``; and while any receive of the process
waits, the checker thread makes up for lost rings, whichever event loops have closed meanwhile.

The first time one of its receives has to wait, a process claims a process slot (engine/slots.py)
without the global lock, right after the lock hold that found the channel empty, and binds its
doorbell; the next lock hold records the slot's token and serves the receive again. If every
slot is held, that receive raises ``StoreError``; the process looks for a free slot again no
sooner than the check interval later, and its other operations go on. ``new_channel()`` claims
one the same way (``own``), since the process owns the channel it makes; with every slot held
the channel has no owner.

Reaping. A process that dies owning channels is found by a ring that finds its doorbell gone
and its slot byte unlocked, or by any process's periodic check, which tests the slot bytes of
every process that owns channels (``Engine.look_for_dead``, without the lock: measured, 60 us
to read the slot table and 1 us per owner). Either starts the checker thread, which then
reaps, one bounded lock hold after another, until nothing is left; between two holds other
processes get the lock. A process that closes reaps its own channels the same way before
``close`` returns. So the memberships of a killed process are gone about a check interval after
its death, as long as some process of the prefix has a receive waiting or sends to it.

Binding a doorbell takes an inode of /dev/shm (two for the store's first, which creates the
wake-up directory too), and any local user can take them all. A process that finds no room for
its doorbell waits without one rather than fail: it holds its slot and registers on its channels
as usual, a send that rings it finds no socket but leaves it be (its slot byte says it lives),
and the periodic check hands its receives their messages, so they learn of a message within the
check interval. Each check tries to bind the doorbell again; once it is bound, every receive
waiting is served once more, so that each event loop reads it.

A doorbell's queue holds only ``net.unix.max_dgram_qlen`` datagrams (10 by default). A sender
that finds it full marks the process slot as having missed a ring, then rings once more; the
receiving process reads the mark after draining its queue and then wakes every receive it has.
A ring can still be lost for good: the sender may die after its commit and before its ring, or a
flush after wiping the registrations and before telling anyone. So each process with receives
waiting looks once per check interval (1 s by default), under one lock hold, at just the
channels it waits on, and wakes those that hold messages: a lost ring costs at most an interval,
and an idle process one lock hold per interval. The check runs in a thread of its own, not in an
event loop: loops come and go (``async_to_sync`` may run each call in a new one), and a check
scheduled in a loop dies with it, leaving the receives of every other loop without it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .doorbell import (
    FULL,
    GONE,
    RING_BYTES,
    Doorbell,
    Ringer,
    doorbell_address,
    new_token,
    remove_doorbell,
)
from .engine import BACK, BEFORE_PARCELS, Engine, LentBook, Seat, Taken, now_ms
from .engine.layout import H_EPOCH, H_FLUSHING, OWNED_MARK, SLOTS
from .exceptions import StoreClosed, StoreError

logger = logging.getLogger(__name__)

# Seconds between the checks that make up for lost rings (see the module docstring), and the
# least time before a process that found every slot taken looks for a free one again.
CHECK_INTERVAL = 1.0
# The most channels whose lent messages one lock hold settles (each settle is two journaled
# words, and a settle never commits half done: see ``Engine.take``).
SETTLE_PER_HOLD = 4096


class Waiter:
    """One receive() in this process: its channel, its loop, and the future that the message
    (or the error) is handed to."""

    __slots__ = ("loop", "channel", "future", "expires", "epoch")

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: bytes) -> None:
        self.loop = loop
        self.channel = channel
        self.future = loop.create_future()
        # Of the message handed over, for putting it back if the receive is cancelled.
        self.expires = 0
        self.epoch = 0


class Receiver:
    def __init__(
        self,
        prefix: str,
        channel_memory: int,
        group_memory: int,
        create: bool = True,
        clock: Callable[[], int] = now_ms,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.engine = Engine(prefix, channel_memory, group_memory, create=create, clock=clock)
        self.prefix = prefix
        self.name = self.engine.name
        self.check_interval = check_interval
        self._ringer = Ringer()
        self.doorbell: Doorbell | None = None
        self._slot_guard = threading.Lock()  # one slot claim at a time
        self._slots_full_until = 0.0  # no new claim before (monotonic): every slot was held
        self._closed = False
        # The checker thread and the event that stops it, while one runs (see _run_checks).
        self._checker: tuple[threading.Thread, threading.Event] | None = None
        self._checker_guard = threading.Lock()
        self._local = threading.local()  # each thread's receives to serve together
        # Messages of cancelled receives that found no channel memory to go back to, oldest
        # first, by channel: (data, expiry, epoch). See ``_return``.
        self._returned: dict[bytes, collections.deque[tuple[bytes, int, int]]] = {}
        self._returned_guard = threading.Lock()
        self._forget_lent()
        _RECEIVERS.add(self)

    def _forget_lent(self) -> None:
        """Drop the messages lent to this process (engine/lent.py): at start, after a fork
        (the parent's are not ours) and on close."""
        engine = self.engine
        self._lent = LentBook(engine.words, engine.clock, self._check_later)

    def _forget_parent_process(self) -> None:
        """In a forked child, at once (``_after_fork_in_child``): nothing process-local of the
        parent's is the child's but the mapping. Not its doorbell, thread or kept and lent
        messages (each handed out in both processes would be delivered twice), nor its slot,
        whose byte lock.py closed in the child already."""
        self.engine.forget_parent_process()
        self.doorbell = None
        self._slot_guard = threading.Lock()
        self._slots_full_until = 0.0
        self._checker = None  # the parent's thread does not exist here
        self._checker_guard = threading.Lock()
        self._ringer = Ringer()
        self._local = threading.local()
        self._returned = {}  # the parent's to put back, not ours
        self._returned_guard = threading.Lock()
        self._forget_lent()

    # --- operations that only send ---------------------------------------------------------

    def send(self, channel: bytes, data: bytes, capacity: int, expiry_ms: int) -> int:
        engine = self.engine
        result = engine.send(channel, data, capacity, expiry_ms)
        if engine.due:
            self._ring()
        return result

    def group_send(self, group: bytes, data: bytes, capacity_of: Callable[[bytes], int],
                   expiry_ms: int, group_expiry_ms: int) -> tuple[int, int]:
        engine = self.engine
        result = engine.group_send(group, data, capacity_of, expiry_ms, group_expiry_ms)
        if engine.due:
            self._ring()
        return result

    def group_add(self, group: bytes, channel: bytes) -> None:
        self.engine.group_add(group, channel)
        if self.engine.due:  # a hold may finish a flush that a dead process cut off
            self._ring()

    def group_discard(self, group: bytes, channel: bytes) -> None:
        self.engine.group_discard(group, channel)
        if self.engine.due:
            self._ring()

    def flush(self) -> None:
        self.engine.flush()
        self._ring()

    def own(self, channel: bytes) -> None:
        """Make this process the owner of ``channel``, a process-specific channel it has just
        made (``Engine.own``), claiming a process slot first if it holds none. With every slot
        held, the channel has no owner."""
        if self._closed:
            raise self.engine.closed_error()
        engine = self.engine
        if engine.seat is None:
            self._take_slot()
        engine.own(channel)
        if engine.due:
            self._ring()

    # --- the multi-host layer's relay ------------------------------------------------------

    def apply_relayed(self, *args: Any) -> Any:
        """``Engine.apply_relayed`` (engine/inbox.py): the seam through which a multi-host
        layer's relay writes into the store. The rings it leaves due wait for ``ring_due``,
        which the relay calls once its next read is on its way."""
        return self.engine.apply_relayed(*args)

    def ring_due(self) -> None:
        """Ring the processes that this process's lock holds left to ring."""
        if self.engine.due:
            self._ring()

    # --- rings -----------------------------------------------------------------------------

    def _ring(self) -> None:
        """Ring each process once for all the channels the rings due name (taken one by one,
        so that two threads ringing at once ring each exactly once)."""
        due, engine = self.engine.due, self.engine
        channels: dict[tuple[int, int], set[bytes]] = {}
        while due:
            try:
                slot, token, channel = due.popleft()
            except IndexError:
                break  # another thread took the last one
            channels.setdefault((slot, token), set()).add(channel)
        for (slot, token), names in channels.items():
            payload = b"\n".join(names)
            if b"" in names or len(payload) > RING_BYTES:
                payload = b""
            address = doorbell_address(engine.wake_dir, token)
            result = self._ringer.ring(address, payload)
            if result == FULL:
                engine.slots.mark_missed(slot)
                result = self._ringer.ring(address, b"")
            if result == GONE and engine.died(slot, token):
                remove_doorbell(engine.wake_dir, token)
                engine.gone.append((slot, token))
                self._check_later()  # whose thread reaps what it owned

    def _rung(self, names: set[bytes]) -> None:
        """The doorbell read ``names``: wake the receives waiting on them."""
        seat = self.engine.seat
        if seat is None:
            return
        # Read after draining: a sender that found the queue full marks the slot, then rings
        # again, so a mark set after this read comes with a datagram that calls us back.
        if self.engine.slots.take_missed(seat.slot):
            names.add(b"")
        self._wake(seat, names)
        if self.engine.parcels_pending():
            self._check_later()  # drains them if no receive does first

    def _wake(
        self, seat: Seat[Waiter], names: set[bytes] | list[bytes] | None, later: bool = False
    ) -> None:
        """Hand the receives waiting on ``names`` (every receive, if None or b"" is among
        them) to be served, all those of one event loop together, in that loop: at once if it
        is the running loop, unless ``later``."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Waiter]] = {}
        for waiter in seat.wake(names):
            by_loop.setdefault(waiter.loop, []).append(waiter)
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, waiters in by_loop.items():
            if loop is current and not later:
                self._serve(waiters)
            else:
                try:
                    loop.call_soon_threadsafe(self._serve, waiters)
                except RuntimeError:
                    pass  # its loop is closed: those receives will never look again

    # --- receive ---------------------------------------------------------------------------

    async def receive(self, channel: bytes) -> bytes:
        """The next message of ``channel``, waiting for one as long as it takes.

        A receive on a channel this process is still registered on, found empty, waits
        without taking the lock (``_wait_unlocked``). Otherwise it is served at once, in a lock
        hold of its own (first without anything to track, ``_take_queued``, where a message may
        be queued), unless its event loop is *gathering*: another task of the loop was
        served so in the same pass of the loop, or the last lock hold handed out several
        messages, whose receivers will soon ask again. Then receives are collected until the
        running callbacks are done and served together in one lock hold: that is how a process
        draining many channels takes one message from each per hold."""
        data = self.ready(channel)
        if data is not None:
            return data
        loop = asyncio.get_running_loop()
        if self._expects_queued(channel):
            state = self._loop_state(loop)
            task = asyncio.current_task()
            if not state.gathering and state.served_task in (None, task):
                data = self._take_queued(channel)
                if data is not None:
                    self._served_alone(loop, state, task)
                    return data
        waiter = Waiter(loop, channel)
        # Lent messages handed out are settled by the next lock hold: soon, so that senders
        # do not find the channel fuller than it is.
        if self._lent.unsettled or not self._wait_unlocked(waiter):
            state = self._loop_state(loop)
            task = asyncio.current_task()
            if state.gathering or state.served_task not in (None, task):
                if not state.batch:
                    loop.call_soon(self._serve_gathered, state.batch)
                state.batch.append(waiter)
            else:
                self._served_alone(loop, state, task)
                try:
                    self._serve([waiter])
                except BaseException:
                    # Interrupted after its message was handed: it goes back.
                    self._abandon(waiter)
                    raise
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def ready(self, channel: bytes) -> bytes | None:
        """The next message of ``channel`` if this process holds it already, without a lock
        hold or a wait: one kept from a cancelled receive (``_return``), or lent by the store
        (``LentBook.take``); else None. ``receive`` looks here first; the layer calls it before
        ``receive``, which then costs nothing when the message is here."""
        if self._closed:
            raise self.engine.closed_error()
        if self._returned:
            kept = self._take_returned(channel)
            if kept is not None:
                return kept[0]
        lent = self._lent.take(channel)
        return None if lent is None else lent[0]

    def _expects_queued(self, channel: bytes) -> bool:
        """Whether a receive on ``channel`` may look for its message in a lock hold of its own
        before it waits (``_take_queued``): not on a channel this process waits on and found
        empty (quiet), where it would only cost a hold, nor on a process-specific channel,
        whose messages may come lent or in parcels (``Engine.take`` keeps their order), nor
        while lent messages handed out are still to settle (``Engine.take`` does). A receive
        that then has to wait pays one hold more: the first on its channel, one after its
        registration lapsed, or while channel memory is too full to register it."""
        if OWNED_MARK in channel or self._lent.unsettled:
            return False
        seat = self.engine.seat
        return seat is None or not seat.is_quiet(channel)

    def _take_queued(self, channel: bytes) -> bytes | None:
        """The next message queued on ``channel``, taken in a lock hold of its own
        (``Engine.take_queued``), with no receive to track, no future and no batch; None if
        it holds none. A message taken for good reaches the caller whatever happens after the
        commit: an ``Exception`` (a later part of the hold failed) leaves it to the caller, and
        anything else (a signal handler's ``KeyboardInterrupt``) puts it back first."""
        taken = Taken(None)
        try:
            try:
                self.engine.take_queued(channel, taken)
            finally:
                if self.engine.due:
                    self._ring()
        except Exception:
            if not taken.durable:
                raise
        except BaseException:
            if taken.durable:
                _waiter, data, expires, _lent = taken.handed[0]
                self._return(channel, data, expires, taken.epoch)
            raise
        if not taken.durable:
            return None
        return taken.handed[0][1]

    def _loop_state(self, loop: asyncio.AbstractEventLoop) -> threading.local:
        state = self._local
        if getattr(state, "loop", None) is not loop:
            state.loop, state.batch, state.gathering, state.served_task = loop, [], False, None
        return state

    def _served_alone(self, loop: asyncio.AbstractEventLoop, state: threading.local,
                      task: asyncio.Task | None) -> None:
        """``task`` was served in a lock hold of its own: until this pass of ``loop`` ends, the
        receives of its other tasks gather."""
        if state.served_task is None:
            loop.call_soon(self._next_pass, state)
        state.served_task = task

    @staticmethod
    def _next_pass(state: threading.local) -> None:
        state.served_task = None

    def _serve_gathered(self, batch: list[Waiter]) -> None:
        waiters = batch[:]
        batch.clear()
        self._serve(waiters)

    def _wait_unlocked(self, waiter: Waiter) -> bool:
        """Start ``waiter`` waiting without the lock, if that is safe: True if it waits.

        Safe while its channel is *quiet* (``Seat``): a lock hold of this process found it
        empty while registered on it, and no ring or check has named it since. Any send that
        makes it non-empty after that hold rings this process once it commits, and the ring's
        wake either finds ``waiter`` tracked or had made the channel not quiet before
        ``add_if_quiet`` looked. Of the store, only the epoch and this process's slot token are
        read, in pages that no flush gives back: a flush returns the heaps' pages to the kernel,
        and reading one of those on a full /dev/shm would kill the process with SIGBUS. A flush
        or a reaper (which frees our slot) since the last hold means a locked look instead; one
        that comes later rings every process, or is noticed by the next hold."""
        engine, doorbell = self.engine, self.doorbell
        seat = engine.seat
        if seat is None or doorbell is None:
            return False
        if not seat.add_if_quiet(waiter.channel, waiter):
            return False
        if waiter.loop not in doorbell.readers:
            doorbell.watch(waiter.loop)
        w = engine.words
        if (
            w[H_FLUSHING]
            or w[H_EPOCH] != engine.epoch
            or engine.slots.token(seat.slot) != seat.token
        ):
            return False  # tracked already: the locked look serves it
        self._check_later()
        return True

    def _serve(self, waiters: list[Waiter]) -> None:
        """In one lock hold (``Engine.take``), hand each receive of ``waiters`` (all of the
        running event loop) the next message of its channel, or make sure that a send will
        ring for it.

        Every receive taken here that does not wait on is settled before this returns, even
        when an exception (``KeyboardInterrupt`` included) cuts the lock hold short: with its
        message if that was taken for good, else with the error."""
        if len(waiters) > 1:
            waiters = list(dict.fromkeys(waiters))  # a receive rung twice is served once
        waiters = [w for w in waiters if not w.future.done()]
        if self._returned:
            waiters = [w for w in waiters if not self._hand_kept(w)]
        if self._lent.channels:
            waiters = [w for w in waiters if not self._hand_lent(w)]
        if not waiters:
            return
        if self._closed:
            for waiter in waiters:
                _fail(waiter, self.engine.closed_error())
            return
        taken = Taken(self._lent.to_settle(SETTLE_PER_HOLD))
        interrupted: BaseException | None = None
        try:
            try:
                self.engine.take(waiters, taken)
            finally:
                # First what the hold took for good and no receive holds yet: lost otherwise,
                # and still counted against its channels' capacity.
                self._settled(taken)
                for waiter, _data, _expires, lent in taken.handed[: taken.durable]:
                    if lent:
                        self._keep_lent(waiter.channel, lent, taken.epoch)
                if taken.drained:
                    self._keep_parcels(taken.parcels[: taken.drained], taken.epoch, waiters)
            handed, failed = taken.handed, taken.failed
        except BaseException as exc:
            error = exc
            if not isinstance(exc, Exception):
                interrupted = exc
                error = StoreError(f"the receive was interrupted by {type(exc).__name__}")
                error.__cause__ = exc
            # Only the messages taken for good are handed; every other receive gets the error.
            handed = taken.handed[: taken.durable]
            served = {waiter for waiter, _data, _expires, _lent in handed}
            failed = [(waiter, error) for waiter in waiters if waiter not in served]
            taken.unseated = []
        given = 0
        try:
            if self.engine.due:
                self._ring()
            for waiter, data, expires, _lent in handed:
                self._stop_tracking(waiter)
                waiter.expires, waiter.epoch = expires, taken.epoch
                try:
                    waiter.future.set_result(data)
                except asyncio.InvalidStateError:
                    # Cancelled since the filter above, by a signal handler (asyncio's own, on
                    # Ctrl-C) that ran in the middle of this: its receive never sees the message.
                    self._return(waiter.channel, data, expires, taken.epoch)
                given += 1
        except BaseException as exc:
            # Cut off while handing out (a signal handler's exception): the messages not
            # handed yet go back, and their receives, and those that failed, get the error.
            error = StoreError(f"the receive was interrupted by {type(exc).__name__}")
            for waiter, data, expires, _lent in handed[given:]:
                if not waiter.future.done():
                    self._return(waiter.channel, data, expires, taken.epoch)
                    _fail(waiter, error)
            for waiter, _problem in failed:
                _fail(waiter, error)
            for waiter in taken.unseated:
                _fail(waiter, error)
            raise
        for waiter, problem in failed:
            self._stop_tracking(waiter)
            _fail(waiter, problem)
        deferred = taken.deferred if interrupted is None and not failed else []
        if deferred:
            # Their channels' parcels are lent here now, older than what the channels hold.
            rest = [w for w in deferred if not w.future.done() and not self._hand_lent(w)]
            if rest:
                rest[0].loop.call_soon(self._serve, rest)
        if self._lent.channels and interrupted is None:
            # A receive left waiting on a channel whose messages another event loop's hold
            # lent here meanwhile: ``_keep_parcels`` woke it before it was tracked, or after.
            for waiter in waiters:
                if not waiter.future.done() and waiter.channel in self._lent.channels:
                    self._hand_lent(waiter)
        for waiter in taken.unseated:
            # The first wait of this process: a slot is claimed without the lock, after it.
            if time.monotonic() < self._slots_full_until:
                _fail(waiter, self._slots_full())
            else:
                waiter.loop.call_soon(self._claim_and_serve, waiter)
        if interrupted is None and len(handed) + len(failed) + len(taken.unseated) + len(
            deferred
        ) < len(waiters):
            # Some wait now, tracked by the seat: make sure the doorbell is read and the checker
            # runs (started here rather than under the lock, where no other process should
            # wait on it).
            doorbell, loop = self.doorbell, waiters[0].loop
            if doorbell is not None and loop not in doorbell.readers:
                doorbell.watch(loop)
            self._check_later()
        self._loop_state(waiters[0].loop).gathering = len(handed) + len(deferred) > 1
        if interrupted is not None:
            raise interrupted

    # --- messages lent by the store ------------------------------------------------------

    def _hand_lent(self, waiter: Waiter) -> bool:
        """Hand ``waiter`` the next message lent for its channel: True if there was one."""
        lent = self._lent.take(waiter.channel)
        if lent is None:
            return False
        data, waiter.expires = lent
        waiter.epoch = self._lent.epoch
        self._stop_tracking(waiter)
        try:
            waiter.future.set_result(data)
        except asyncio.InvalidStateError:  # cancelled meanwhile: still the next one
            self._return(waiter.channel, data, waiter.expires, waiter.epoch)
        return True

    def _keep_lent(self, channel: bytes, lent: list[tuple[bytes, int]], epoch: int) -> None:
        """Keep the messages of ``channel`` a take lent, for the receives to come; wake any
        other receive of this process waiting on it."""
        self._lent.lend(channel, lent, epoch)
        seat = self.engine.seat
        if seat is not None and seat.waiters([channel]):
            self._wake(seat, [channel], later=True)

    def _keep_parcels(
        self, parcels: list[tuple[bytes, int, list[bytes]]], epoch: int, batch: list[Waiter]
    ) -> None:
        """Keep the messages of the parcels a hold drained (``Engine.take``, ``Engine.check``)
        as lent (``LentBook.lend_parcels``); then wake the receives of this process waiting on
        those channels, but for those of ``batch``, which the caller serves."""
        channels = self._lent.lend_parcels(parcels, epoch)
        seat = self.engine.seat
        if seat is None:
            return
        served = set(batch)
        others: dict[asyncio.AbstractEventLoop, list[Waiter]] = {}
        for waiter in seat.waiters(channels):
            if waiter not in served:
                others.setdefault(waiter.loop, []).append(waiter)
        for loop, waiters in others.items():
            try:
                loop.call_soon_threadsafe(self._serve, waiters)
            except RuntimeError:
                pass  # its loop is closed: those receives will never look again

    def _settled(self, taken: Taken) -> None:
        if taken.settle is None or taken.settled or (
            taken.settle_commits is not None
            and self.engine.journal.commits != taken.settle_commits
        ):
            return  # settled, and committed (the flag may not have been set after)
        self._lent.unsettle(taken.settle)

    def _settle_lent(self) -> None:
        """For the periodic check: drop the lent messages that expired unread, and settle
        with the store what was handed out, in a lock hold of its own."""
        self._lent.expire(self.engine.clock())
        taken = Taken(self._lent.to_settle(SETTLE_PER_HOLD))
        if taken.settle is None:
            return
        try:
            self.engine.take([], taken)
        finally:
            self._settled(taken)
            if taken.drained:
                self._keep_parcels(taken.parcels[: taken.drained], taken.epoch, [])

    def _claim_and_serve(self, waiter: Waiter) -> None:
        """After the lock hold that found ``waiter``'s channel empty while this process had no
        slot: claim one without the lock, then serve the receive again; or fail it if every
        slot is held."""
        if waiter.future.done():
            return
        try:
            self._take_slot()
        except Exception as exc:  # the wake-up directory is not ours (ForeignObject), ...
            _fail(waiter, exc)
            return
        if self._closed:
            _fail(waiter, self.engine.closed_error())
        elif self.engine.seat is None:
            _fail(waiter, self._slots_full())
        else:
            self._serve([waiter])

    def _slots_full(self) -> StoreError:
        return StoreError(
            f"{self.name}: all {SLOTS} process slots are held by processes waiting in "
            f"receive(), so this one cannot wait (the limit is fixed by the store's layout); "
            f"run fewer receiving processes with prefix {self.prefix!r}, or spread them over "
            f"several prefixes. Sends and other operations still work; a receive looks for a "
            f"free slot again after {self.check_interval:g} s"
        )

    def _take_slot(self) -> None:
        """Without the lock: claim a process slot (lock its byte) and bind this process's
        doorbell, which the next lock hold records. Every slot held: none is looked for again
        for the check interval. No room in /dev/shm for the doorbell: the process waits
        without one (see the module docstring)."""
        with self._slot_guard:
            engine = self.engine
            if (
                engine.seat is not None
                or self._closed
                or time.monotonic() < self._slots_full_until
            ):
                return
            slot = engine.claim_slot()
            if slot < 0:
                self._slots_full_until = time.monotonic() + self.check_interval
                return
            token = new_token()
            try:
                doorbell = self._bind(token)
            except BaseException:
                engine.release_slot_byte()
                raise
            if doorbell is None:
                logger.warning(
                    "%s: /dev/shm has no inode or no space left for this process's doorbell "
                    "in %s; its receives wait without it and learn of their messages within "
                    "%g s until there is room", self.name, engine.wake_dir, self.check_interval,
                )
            dead = engine.slots.token(slot)
            if dead:
                remove_doorbell(engine.wake_dir, dead)  # its holder died: we hold its byte now
            self.doorbell = doorbell
            engine.seat = Seat(slot, token)

    def _bind(self, token: int) -> Doorbell | None:
        """This process's doorbell, or None if /dev/shm has no room for it."""
        try:
            return Doorbell(self.engine.wake_dir, token, self._rung)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return None
            raise

    def _bind_late(self, seat: Seat[Waiter]) -> bool:
        """From the checker thread, for a process waiting without a doorbell: bind it now if
        there is room; True if it did."""
        with self._slot_guard:
            if self.doorbell is not None or self.engine.seat is not seat or self._closed:
                return False
            doorbell = self.doorbell = self._bind(seat.token)
        return doorbell is not None

    def _stop_tracking(self, waiter: Waiter) -> None:
        seat = self.engine.seat
        if seat is not None:
            seat.discard(waiter.channel, waiter)

    def _abandon(self, waiter: Waiter) -> None:
        """A receive was cancelled. If a message had been handed to it already, it is
        returned; otherwise the receive just stops waiting."""
        future = waiter.future
        if not future.done() or future.cancelled() or future.exception() is not None:
            self._stop_tracking(waiter)
            return
        self._return(waiter.channel, future.result(), waiter.expires, waiter.epoch)

    def _return(
        self, channel: bytes, data: bytes, expires: int, epoch: int, oldest: bool = False
    ) -> None:
        """Give back a message taken for a receive that was cancelled before it saw it: first
        in its channel again, or, with no channel memory left for it, kept here until there
        is (see the module docstring), and offered to the receives of its channel waiting
        here. Behind the messages of its channel kept here already (before them if
        ``oldest``), so that they go back in the order they were taken.

        It runs as a cancelled receive unwinds, whose CancelledError must go on: a message it
        cannot give back for a store error (the store closed under it) is logged as lost."""
        engine = self.engine
        if expires <= engine.clock():
            return
        # One lock over the kept messages and their put-backs, so that no put-back overtakes
        # an older message of its channel (a lock hold under it never waits on it).
        with self._returned_guard:
            kept = self._returned.get(channel)
            if kept is None:
                try:
                    back = self._give_back(channel, data, expires, epoch)
                except StoreClosed:
                    logger.error(
                        "%s: a message taken by a cancelled receive on %r was lost: the store "
                        "was closed before it could go back", self.name, channel.decode(),
                    )
                    return
                except StoreError:
                    logger.exception(
                        "%s: a message taken by a cancelled receive on %r was lost",
                        self.name, channel.decode(),
                    )
                    return
                if not back:
                    kept = self._returned[channel] = collections.deque()
            if kept is not None:
                if oldest:
                    kept.appendleft((data, expires, epoch))
                else:
                    kept.append((data, expires, epoch))
        if engine.due:
            self._ring()
        if kept is not None:
            logger.info(
                "%s: no channel memory to put back a message taken by a cancelled receive on "
                "%r; this process keeps it until there is", self.name, channel.decode(),
            )
            self._check_later()
        elif channel not in self._lent.channels:
            return  # back in the store, whose ring wakes the receives waiting on it
        seat = engine.seat
        if seat is not None:
            self._wake(seat, [channel], later=True)  # receives already waiting get it

    def _give_back(self, channel: bytes, data: bytes, expires: int, epoch: int) -> bool:
        """Under ``_returned_guard``: put a message taken for a cancelled receive first again
        among the messages of ``channel``, wherever the next ones are: first among those lent
        here for it, if there are any (they are newer), else first in its channel in the store
        (``Engine.put_back``), unless a parcel drained on the way lends the channel a newer
        one: then first among the lent again. False if there was no channel memory for it."""
        if self._lent.channels and self._lent.give_back(channel, data, expires, epoch):
            return True
        taken = Taken(None)
        try:
            back = self.engine.put_back(channel, data, expires, epoch, taken)
        finally:
            if taken.drained:
                self._keep_parcels(taken.parcels[: taken.drained], taken.epoch, [])
        if back == BEFORE_PARCELS:
            return self._lent.give_back(channel, data, expires, epoch)
        return back == BACK

    def _take_returned(self, channel: bytes) -> tuple[bytes, int, int] | None:
        """The oldest message kept here for ``channel`` (see ``_return``) that is still
        deliverable, as (data, expiry, epoch), or None."""
        epoch = self.engine.words[H_EPOCH]
        now = self.engine.clock()
        with self._returned_guard:
            kept = self._returned.get(channel)
            found = None
            while kept and found is None:
                found = kept.popleft()
                if found[1] <= now or found[2] != epoch:
                    found = None  # expired, or flushed since
            if kept is not None and not kept:
                del self._returned[channel]
            return found

    def _hand_kept(self, waiter: Waiter) -> bool:
        """Hand ``waiter`` the oldest message kept here for its channel: True if there was
        one."""
        kept = self._take_returned(waiter.channel)
        if kept is None:
            return False
        data, waiter.expires, waiter.epoch = kept
        self._stop_tracking(waiter)
        try:
            waiter.future.set_result(data)
        except asyncio.InvalidStateError:  # cancelled meanwhile: still the oldest
            self._return(waiter.channel, data, waiter.expires, waiter.epoch, oldest=True)
        return True

    def _put_back_returned(self) -> int:
        """Put the messages kept here back in their channels, newest first so that each
        channel gets them back in order, as far as channel memory allows: how many are still
        kept. A message that expired or was flushed meanwhile is dropped; one whose put-back
        raises stays kept."""
        engine = self.engine
        with self._returned_guard:
            for channel in list(self._returned):
                kept = self._returned[channel]
                while kept:
                    data, expires, epoch = kept[-1]
                    if expires > engine.clock() and not self._give_back(
                        channel, data, expires, epoch
                    ):
                        break  # still no room
                    kept.pop()
                if not kept:
                    del self._returned[channel]
            left = sum(len(kept) for kept in self._returned.values())
        if engine.due:
            self._ring()
        return left

    # --- the periodic check ----------------------------------------------------------------

    def _check_later(self) -> None:
        """Make sure the checker thread runs: called once a receive is tracked (so that a
        thread deciding to end, under the same guard, sees it or is replaced), or a process
        was found gone. Once close() began, none is started: close() stops the one it finds
        under this guard."""
        with self._checker_guard:
            if self._checker is None and not self._closed:
                stop = threading.Event()
                thread = threading.Thread(
                    target=self._run_checks, args=(stop,), daemon=True,
                    name=f"asgi_ipc check {self.prefix}",
                )
                self._checker = (thread, stop)
                thread.start()

    def _run_checks(self, stop: threading.Event) -> None:
        """The checker thread: the periodic check every ``check_interval`` while this process
        has receives waiting, registrations lingering or messages of cancelled receives to put
        back, then it ends.

        A thread rather than ``loop.call_later``, because a callback scheduled in an event loop
        dies with it, and loops come and go while receives of other loops still wait. A check
        that fails (every process slot taken, say) is logged and tried again at the next
        interval: the receives it stands guard over may depend on it."""
        while not stop.wait(self.check_interval):
            try:
                self._check(stop)
            except Exception:
                logger.exception(
                    "%s: the periodic check of waiting receives failed; trying again in %s s",
                    self.name, self.check_interval,
                )
            with self._checker_guard:
                if self._checker is None or self._checker[1] is not stop:
                    return  # closed
                seat = self.engine.seat
                if (
                    (seat is None or not seat.needs_checking())
                    and not self._returned
                    and not self._lent.channels
                    and not self._lent.unsettled
                    and not self.engine.reaping()
                    and not self.engine.parcels_pending()
                ):
                    self._checker = None
                    return

    def _check(self, stop: threading.Event) -> None:
        """One periodic check: put back the messages of cancelled receives kept here, register
        the receives that could not be (memory was full), wake those whose channels hold
        messages, each in its own event loop; then look for processes that died owning
        channels, and reap (``_reap``)."""
        if self._closed:
            return
        if self._returned:
            self._put_back_returned()
        if self._lent.channels or self._lent.unsettled:
            self._settle_lent()
        seat = self.engine.seat
        if seat is not None:
            # Stop tracking the receives whose event loop was closed under them: nothing can
            # hand them a message any more, and their registrations may lapse.
            for waiter in seat.waiters():
                if waiter.loop.is_closed():
                    seat.discard(waiter.channel, waiter)
            bound = self.doorbell is None and self._bind_late(seat)
            taken = Taken()
            try:
                ready = self.engine.check(seat, taken)
            finally:
                if taken.drained:
                    self._keep_parcels(taken.parcels[: taken.drained], taken.epoch, [])
            if self.engine.due:
                self._ring()
            # And the channels with messages lent here that a receive was tracked on before
            # they came (in another event loop's hold).
            ready += [c for c in seat.waiting_channels() if c in self._lent.channels]
            # Once bound at last, every receive is served again, so that each event loop with
            # one waiting starts reading the doorbell.
            self._wake(seat, None if bound else ready)
        self.engine.look_for_dead()
        self._reap(stop)

    def _reap(self, stop: threading.Event | None = None) -> None:
        """Reap the channels of processes that are gone, one bounded lock hold after another,
        until none is left or ``stop`` is set: each hold is short, and between two of them
        other processes get the lock."""
        engine = self.engine
        while engine.reaping() and not (stop is not None and stop.is_set()):
            engine.reap()
            if engine.due:
                self._ring()
            os.sched_yield()

    # --- close -----------------------------------------------------------------------------

    def _put_back_for_good(self) -> None:
        """On close: the last chance for the messages of cancelled receives kept here."""
        try:
            lost = self._put_back_returned()
        except Exception:
            logger.exception("%s: could not put back the messages of cancelled receives",
                             self.name)
            lost = sum(len(kept) for kept in self._returned.values())
        if lost:
            logger.error(
                "%s: %d message(s) taken by cancelled receives were lost on close: no channel "
                "memory was left to put them back", self.name, lost,
            )
        self._returned.clear()

    def close(self) -> None:
        """Detach from the store; its contents stay. Every receive of this store still
        waiting, in whichever event loop or thread, raises ``StoreClosed`` (settled in its own
        loop); a receive called after this raises it at once."""
        if self._closed:
            return
        self._closed = True
        engine = self.engine
        engine.closing = True
        with self._checker_guard:
            checker, self._checker = self._checker, None
        if checker is not None:
            thread, stop = checker
            stop.set()
            if thread is not threading.current_thread():
                thread.join()  # at most one check under way: the segment must outlive it
        with self._slot_guard:  # a slot claim under way finishes first, and is closed here
            doorbell, self.doorbell = self.doorbell, None
            seat, engine.seat = engine.seat, None
        try:
            if self._returned:
                self._put_back_for_good()
            if seat is not None:
                try:
                    engine.leave(seat, self._lent.to_settle(SETTLE_PER_HOLD))
                    self._reap()  # this process's channels, and whatever else is left
                except Exception:
                    # The slot is freed anyway once its byte is unlocked below, and what it
                    # owned is reaped by the next process to find it dead.
                    logger.exception("%s: could not leave the store cleanly on close", self.name)
        finally:
            # Whatever happened above, nothing of this process may be left half open.
            if seat is not None:
                waiters = seat.close()
                if doorbell is not None:
                    doorbell.close()  # removes its socket while the byte says we live
                engine.release_slot_byte()
                for waiter in waiters:
                    _end_elsewhere(waiter, engine.closed_error())
            self._forget_lent()  # the store reaps its channels
            self._ringer.close()
            engine.close()


# Every receiver of this process, for the fork hook.
_RECEIVERS: weakref.WeakSet[Receiver] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for receiver in list(_RECEIVERS):
        receiver._forget_parent_process()


# Registered after engine/lock.py's and segment.py's hooks (imported first), which run first in
# the child: the slot bytes are closed and the store reopened before the receivers forget.
os.register_at_fork(after_in_child=_after_fork_in_child)


def _fail(waiter: Waiter, exc: BaseException) -> None:
    """Settle ``waiter`` with ``exc`` unless it was cancelled meanwhile (by a signal handler,
    at any instant): a cancelled receive needs no error."""
    try:
        waiter.future.set_exception(exc)
    except asyncio.InvalidStateError:
        pass


def _end_elsewhere(waiter: Waiter, exc: BaseException) -> None:
    """Settle ``waiter`` with ``exc`` in its own event loop, from any thread."""

    def end() -> None:
        if not waiter.future.done():
            waiter.future.set_exception(exc)

    try:
        waiter.loop.call_soon_threadsafe(end)
    except RuntimeError:
        pass  # its loop is closed: nobody waits on it any more


__all__ = ["CHECK_INTERVAL", "Receiver", "Waiter"]
