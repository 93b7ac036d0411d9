"""The process slots: the table, in the store, of the processes that wait in receive() or own
process-specific channels.

A slot is live iff its *slot byte* in the store file is locked: an open-file-description lock
(``F_OFD_SETLK``) that the process claiming it takes on an ``OwnDescription`` of the store
opened for that lock alone (see lock.py). The kernel drops it when that description is closed:
when the process releases its slot, and when it dies however it dies, since nothing else holds
the description: a forked child closes its copy at once, and no ``mmap`` duplicates it. Any
process that has the store open can test it (``F_OFD_GETLK``, through a descriptor holding no
lock), whatever PID namespace either is in: no pid is ever compared. ``Seat`` is this
process's side of its slot: the registrations and waiting receives it tracks. A slot's words
(pid for display, random token, missed-ring mark, the first and last of the channels its
process owns, the first and last parcel lent to it by group_sends) are changed through the
journal under the global lock like any other word of the store, except the missed-ring mark, a
hint written without it. How a process claims, uses and
frees its slot: see doorbell.py and receiver.py.

A slot's token changes only when its holder records its own (``record``) or the slot is freed
(``release``); either way whoever held it before is gone, so both first hand the channels it
owned to the reaper (``vacate``, which is ``ChannelQueues.orphan``), and its parcels to the
list of parcels to free, in the same journal step. So the channels and parcels listed by a slot
are always those of the process that holds its token.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ..exceptions import StoreClosed
from .journal import Journal
from .layout import SLOT_TABLE, SLOT_WORDS, SLOTS, WORD
from .lock import byte_lock

SLOT_PID = 0  # for display only: a pid means nothing in another PID namespace
SLOT_TOKEN = 1
SLOT_MISSED = 2  # set by a sender that found the doorbell's queue full
# The first and the last channel record of the process-specific channels that the slot's
# process owns (queues.py links them).
SLOT_OWNED = 3
SLOT_OWNED_LAST = 4
# The first and the last parcel lent to the slot's process by group_sends and not drained yet
# (queues.py).
SLOT_PARCELS = 5
SLOT_PARCELS_LAST = 6


def slot_byte(slot: int) -> int:
    """The file offset of ``slot``'s slot byte: its first byte in the store."""
    return (SLOT_TABLE + slot * SLOT_WORDS) * WORD


def slot_locked(fd: int, slot: int) -> bool:
    """True if a process holds ``slot``'s byte, asked through ``fd``, which must hold no byte
    lock (``Segment.fd``): it then sees every holder, this process included."""
    return byte_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, slot_byte(slot)) != fcntl.F_UNLCK


def held_slots(fd: int) -> int:
    """How many slot bytes of the store are locked, asked as ``slot_locked`` is."""
    return sum(slot_locked(fd, slot) for slot in range(SLOTS))


class ProcessSlots:
    """The table of processes that wait in receive() or own channels, in the store, and their
    slot bytes. ``vacate(slot)`` hands the channels the slot's process owned to the reaper,
    under the lock, before the slot's token changes."""

    def __init__(
        self, words: memoryview, journal: Journal, base: int, vacate: Callable[[int], None]
    ) -> None:
        self._w = words
        self._j = journal
        self._base = base
        self._vacate = vacate

    def token(self, slot: int) -> int:
        return self._w[self._base + slot * SLOT_WORDS + SLOT_TOKEN] if 0 <= slot < SLOTS else 0

    def try_lock(self, fd: int, slot: int) -> bool:
        """Lock ``slot``'s byte through ``fd`` without waiting: True if it is ours now."""
        try:
            byte_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, slot_byte(slot))
        except (BlockingIOError, PermissionError):
            return False
        return True

    def claim(self, fd: int) -> int:
        """Lock, through ``fd`` (an ``OwnDescription``'s), the byte of a slot nobody holds,
        without the global lock: the slot, or -1 if every slot is held. ``record`` then writes
        the token, under the lock."""
        for slot in range(SLOTS):
            if self.try_lock(fd, slot):
                return slot
        return -1

    def owned_at(self, slot: int) -> int:
        """The word that holds the first channel owned by ``slot``'s process; the last one's
        follows it."""
        return self._base + slot * SLOT_WORDS + SLOT_OWNED

    def parcels_at(self, slot: int) -> int:
        """The word that holds the first parcel pending for ``slot``'s process; the last
        one's follows it."""
        return self._base + slot * SLOT_WORDS + SLOT_PARCELS

    def parcels_pending(self, slot: int) -> bool:
        """Without the lock, a hint: whether parcels wait for ``slot``'s process."""
        return 0 <= slot < SLOTS and bool(self._w[self._base + slot * SLOT_WORDS + SLOT_PARCELS])

    def record(self, slot: int, token: int) -> None:
        """Under the lock: ``slot``, whose byte this process holds, carries ``token`` now."""
        at = self._base + slot * SLOT_WORDS
        if self._w[at + SLOT_TOKEN] != token:
            self._vacate(slot)  # its previous holder died: we hold its byte now
        self._j.set(at + SLOT_PID, os.getpid())
        self._j.set(at + SLOT_TOKEN, token)
        self._w[at + SLOT_MISSED] = 0  # a mark left for the previous holder

    def mark_missed(self, slot: int) -> None:
        # A hint written without the lock: at worst a spurious "look at everything".
        self._w[self._base + slot * SLOT_WORDS + SLOT_MISSED] = 1

    def take_missed(self, slot: int) -> bool:
        at = self._base + slot * SLOT_WORDS + SLOT_MISSED
        if 0 <= slot < SLOTS and self._w[at]:
            self._w[at] = 0
            return True
        return False

    def release(self, slot: int, token: int) -> None:
        """Free ``slot`` if it still holds ``token``; its registrations become stale, and the
        channels it owned are to be reaped."""
        at = self._base + slot * SLOT_WORDS
        if 0 <= slot < SLOTS and self._w[at + SLOT_TOKEN] == token:
            self._vacate(slot)
            self._j.set(at + SLOT_TOKEN, 0)
            self._j.set(at + SLOT_PID, 0)

    def live(self) -> list[tuple[int, int, int]]:
        """(slot, pid, token) of every slot with a token recorded (its holder may have died
        since: ``slot_locked`` tells)."""
        w, found = self._w, []
        for slot in range(SLOTS):
            at = self._base + slot * SLOT_WORDS
            if w[at + SLOT_TOKEN]:
                found.append((slot, w[at + SLOT_PID], w[at + SLOT_TOKEN]))
        return found

    def owners(self) -> list[tuple[int, int]]:
        """(slot, token) of every slot whose process owns channels. Read without the lock by
        ``Engine.look_for_dead``, so a hint: the lock hold that acts on it checks again."""
        table = self._w[self._base : self._base + SLOTS * SLOT_WORDS].tolist()
        return [
            (slot, table[at + SLOT_TOKEN])
            for slot, at in enumerate(range(0, SLOTS * SLOT_WORDS, SLOT_WORDS))
            if table[at + SLOT_TOKEN] and table[at + SLOT_OWNED]
        ]


W = TypeVar("W", bound=Hashable)  # a waiting receive, as the receiver represents it


class Seat(Generic[W]):
    """This process's place in the store while it has receives waiting: its slot and token, the
    channels it is registered on (channel -> record, which the registration keeps in place),
    and the receives it has waiting, by channel. The engine never looks inside a receive: to it
    a waiting receive is an opaque object that it tracks and hands back.

    A registration outlives the receive that made it by ``LINGER`` seconds, so that a consumer
    looping on ``receive()`` registers once rather than once per message; a registration with no
    receive behind it costs a sender at most one ring, when the channel turns non-empty.

    A registered channel is *quiet* from a lock hold that found it empty until a ring or a check
    names it: a send that makes it non-empty after that hold rings this process, so while it is
    quiet a receive may wait without the lock and without reading the store (see
    ``Receiver._wait_unlocked``). ``quiet`` and ``wake`` change and read it under ``_guard``,
    together with the receives tracked, so a receive is either tracked before a ring's wake
    collects the receives to wake, or finds the channel no longer quiet.

    ``registered`` changes under the store lock and ``_guard`` both, so ``add`` (under the
    guard only) sees either the registration or its absence, never half a lapse. Once closed it
    tracks nothing more: ``add`` raises ``StoreClosed``, and ``close`` hands back the receives
    it tracked, for the receiver to end them."""

    LINGER = 2.0

    def __init__(self, slot: int, token: int) -> None:
        self.slot = slot
        self.token = token
        self._guard = threading.Lock()
        self._waiting: dict[bytes, set[W]] = {}
        self.registered: dict[bytes, int] = {}
        self._quiet: set[bytes] = set()
        # Since when the registrations with no receive behind them have been so.
        self._idle_since: dict[bytes, float] = {}
        self.next_lapse = math.inf
        self._closed = False

    def add(self, channel: bytes, waiter: W) -> int:
        """Track ``waiter``, so that a ring from now on finds it: the channel's record if this
        process is registered on it, else 0 (the engine must register it)."""
        with self._guard:
            if self._closed:
                raise StoreClosed("the store was closed")
            self._waiting.setdefault(channel, set()).add(waiter)
            self._idle_since.pop(channel, None)
            return self.registered.get(channel, 0)

    def add_if_quiet(self, channel: bytes, waiter: W) -> bool:
        """Track ``waiter`` if its channel is quiet (see the class docstring): True if it is,
        and a ring will then find it; False, tracking nothing, if not."""
        with self._guard:
            if self._closed:
                raise StoreClosed("the store was closed")
            if channel not in self._quiet:
                return False
            self._waiting.setdefault(channel, set()).add(waiter)
            self._idle_since.pop(channel, None)
            return True

    def quiet(self, channels: list[bytes]) -> None:
        """Under the lock: ``channels`` are empty; those this process is registered on are
        quiet."""
        with self._guard:
            self._quiet.update(c for c in channels if c in self.registered)

    def is_quiet(self, channel: bytes) -> bool:
        """Without the guard, a hint: whether ``channel`` is quiet (see the class docstring; it
        may hold messages whose ring is still on its way)."""
        return channel in self._quiet

    def wake(self, names: set[bytes] | list[bytes] | None) -> list[W]:
        """A ring or a check says that ``names`` (every channel, if None or b"" is among them)
        may hold messages: they are quiet no longer; the receives waiting on them."""
        with self._guard:
            if names is None or b"" in names:
                self._quiet.clear()
            else:
                self._quiet.difference_update(names)
            return self._collect(names)

    def note_registered(self, channel: bytes, rec: int) -> None:
        """Under the lock: this process is registered on ``channel``, whose record is at
        ``rec``."""
        with self._guard:
            self.registered[channel] = rec

    def forget(self, channels: list[bytes]) -> None:
        """The registrations on ``channels`` were rolled back with the lock hold that made
        them: this process is not registered there any more (the periodic check registers
        the receives still waiting again)."""
        with self._guard:
            for channel in channels:
                self.registered.pop(channel, None)
                self._idle_since.pop(channel, None)
                self._quiet.discard(channel)

    def discard(self, channel: bytes, waiter: W) -> None:
        """Stop tracking ``waiter``; its channel's registration starts to linger if it was the
        last receive of this process on it."""
        with self._guard:
            waiters = self._waiting.get(channel)
            if waiters is None or waiter not in waiters:
                return
            waiters.discard(waiter)
            if waiters:
                return
            del self._waiting[channel]
            if channel in self.registered:
                now = time.monotonic()
                self._idle_since[channel] = now
                self.next_lapse = min(self.next_lapse, now + self.LINGER)

    def lapsed(self) -> list[bytes]:
        """Registrations that lingered long enough: they are dropped here, for the engine to
        drop too (under its lock)."""
        deadline = time.monotonic() - self.LINGER
        with self._guard:
            gone = [channel for channel, since in self._idle_since.items() if since <= deadline]
            for channel in gone:
                del self._idle_since[channel]
                del self.registered[channel]
                self._quiet.discard(channel)
            self.next_lapse = min(self._idle_since.values(), default=math.inf) + self.LINGER
        return gone

    def forget_registrations(self) -> list[bytes]:
        """The store lost every registration (flush, or a slot taken back): the channels that
        still have receives waiting, to register again."""
        with self._guard:
            self.registered.clear()
            self._idle_since.clear()
            self._quiet.clear()
            self.next_lapse = math.inf
            return list(self._waiting)

    def waiting_channels(self) -> list[bytes]:
        with self._guard:
            return list(self._waiting)

    def waiters(self, names: set[bytes] | list[bytes] | None = None) -> list[W]:
        """The receives waiting on ``names``, or on every channel if ``names`` is None or holds
        b"" (a ring that says "look at everything")."""
        with self._guard:
            return self._collect(names)

    def _collect(self, names: set[bytes] | list[bytes] | None) -> list[W]:
        if names is None or b"" in names:
            return [w for waiters in self._waiting.values() for w in waiters]
        return [w for name in names for w in self._waiting.get(name, ())]

    def needs_checking(self) -> bool:
        """Whether the periodic check still has work here: receives waiting, or registrations
        lingering (which lapse at the check's lock holds)."""
        with self._guard:
            return bool(self._waiting or self.registered)

    def close(self) -> list[W]:
        """Track nothing more; the receives still tracked, which nothing will wake any more."""
        with self._guard:
            self._closed = True
            waiters = [w for waiters in self._waiting.values() for w in waiters]
            self._waiting.clear()
        return waiters
