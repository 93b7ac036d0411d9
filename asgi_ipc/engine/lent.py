"""The messages the store lent to this process, kept for its receives to come, and what of them
it owes the store.

A lock hold that serves a receive on a channel this process owns takes the channel's next
messages with it, and a hold that drains a parcel takes its message for every channel of this
process the parcel names (``Engine.take``). They leave the store's queues with that hold's
commit and are *lent*: still counted against their channels' capacity, so that no sender finds
a channel emptier than it is. They are kept here, oldest first by channel, and the receives
that follow take them without a lock hold or a wait (``take``). What was handed out (or expired
here) is counted by channel until a later hold *settles* it with the store (``to_settle``), and
given back to the count if that hold failed before its commit (``unsettle``). A process that
dies with messages lent loses them, as it loses a message it has received (delivery is at most
once), and the reaper frees its channels with their counts.

A flush takes what is lent as it takes what is in the store: every hold reads the store's epoch,
which each flush moves on, and messages lent in another epoch than the store's are dropped whole
at their next use, with what was to settle of them (the flush zeroed the counts).

One book per process and store, used by every thread of the process (the event loops' and the
periodic check's), each use under the book's guard. A forked child starts a book of its own: the
parent's lent messages would otherwise be delivered twice.

Compiled (compiled.py), ``take`` is one C call from the layer's receive. In Python it was half of
what a receive of a lent message cost, 0.55 us of 1.0, and a member of a group_send receives
almost every message that way.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .clock import now_ms
from .compiled import ENGINE
from .layout import H_EPOCH, H_FLUSHING

# Compiled, lent.pxd makes the header offsets C variables, read on every take.
globals().update(H_EPOCH=H_EPOCH, H_FLUSHING=H_FLUSHING)

# How ``take`` holds the guard. Run as Python, only ``with`` leaves no gap between the acquire
# and the protected block for a signal handler's exception to land in (it would leave the
# guard held for good). Compiled, nothing lands between two C calls, and the guard's own
# acquire and release, kept bound, cost 35 ns where ``with`` costs 90: a quarter of a take.
GUARD_CALLS = ENGINE == "compiled"


class Shared(bytes):
    """The message of a parcel: one object handed to the receive of each of its channels in
    this process. What the layer made of it the first time is kept beside it (``model``), so
    that the others get a copy instead of decoding it again, when a copy will do (layer.py)."""

    model: Any = None


class LentBook:
    """The lent messages of one store in this process. ``words`` is the store's word view,
    ``clock`` the engine's; ``on_unsettled`` is called (outside the guard) by a ``take`` that
    leaves something to settle where nothing was, so that a settling hold comes soon even if
    no receive asks again.

    ``channels`` (channel -> its lent messages, (data, expiry), oldest first), ``unsettled``
    (channel -> how many to settle) and ``epoch`` (the store's, when these were lent) are read
    without the guard, for a cheap "is there any?"; only the book changes them."""

    def __init__(
        self, words: Any, clock: Callable[[], int], on_unsettled: Callable[[], None]
    ) -> None:
        # Untyped even compiled: a typed view would hold a buffer of the mapping, and the
        # engine, closed on its own, could no longer unmap it.
        self._w = words
        # None for the default clock, which the compiled take calls in C.
        self._clock = None if clock is now_ms else clock
        self._on_unsettled = on_unsettled
        self._guard = threading.Lock()
        self._acquire, self._release = self._guard.acquire, self._guard.release
        self.channels: dict[bytes, collections.deque[tuple[bytes, int]]] = {}
        self.unsettled: dict[bytes, int] = {}
        self.epoch = -1

    def take(self, channel: bytes) -> tuple[bytes, int] | None:
        """The next message lent for ``channel`` that has not expired, as (data, expiry), or
        None; it is counted to settle, and so is each expired one passed over."""
        if channel not in self.channels:  # the common miss, without the guard or the clock
            return None
        # Outside the guard: a clock in Python may let other threads run.
        now = now_ms() if self._clock is None else self._clock()
        # Whether this take is the first to leave something to settle is read under the guard,
        # with the count: read before it, a hold settling meanwhile could leave this count
        # with no settling hold to come.
        if GUARD_CALLS:
            self._acquire()
            try:
                first = not self.unsettled
                found = self._take(channel, now)
            finally:
                self._release()
        else:
            with self._guard:
                first = not self.unsettled
                found = self._take(channel, now)
        if first and self.unsettled:
            self._on_unsettled()
        return found

    def _take(self, channel: bytes, now: int) -> tuple[bytes, int] | None:
        lent = self.channels.get(channel)
        if lent is None:
            return None
        w = self._w
        if w[H_EPOCH] != self.epoch or w[H_FLUSHING]:
            self.channels.clear()
            self.unsettled.clear()
            return None
        unsettled = self.unsettled
        found = None
        while lent and found is None:
            # Counted before it is taken: an exception in between settles one too many, which
            # the store's count absorbs (``ChannelQueues.settle``), where one settled too few
            # would stay counted against capacity for good.
            unsettled[channel] = unsettled.get(channel, 0) + 1
            found = lent.popleft()
            if found[1] <= now:
                found = None  # expired here: it leaves the count all the same
        if not lent:
            del self.channels[channel]
        return found

    def lend(self, channel: bytes, lent: Iterable[tuple[bytes, int]], epoch: int) -> None:
        """Keep the messages of ``channel`` that a hold of ``epoch`` lent, behind those kept."""
        with self._guard:
            self._lend_in(epoch)
            kept = self.channels.get(channel)
            if kept is None:
                kept = self.channels[channel] = collections.deque()
            kept.extend(lent)

    def lend_parcels(
        self, parcels: Iterable[tuple[bytes, int, list[bytes]]], epoch: int
    ) -> list[bytes]:
        """Keep the message of each parcel a hold of ``epoch`` drained for every channel it
        names (one ``Shared`` object for them all, whose bytes never change), behind those
        kept; return the channels named."""
        named: list[bytes] = []
        with self._guard:
            self._lend_in(epoch)
            channels = self.channels
            for data, expires, names in parcels:
                item = (Shared(data), expires)
                for name in names:
                    kept = channels.get(name)
                    if kept is None:
                        kept = channels[name] = collections.deque()
                    kept.append(item)
                named.extend(names)
        return named

    def give_back(self, channel: bytes, data: bytes, expires: int, epoch: int) -> bool:
        """A message of ``channel`` taken for a receive that was cancelled goes first among
        those lent for it, if any are: True if it did (it counts as lent again)."""
        with self._guard:
            kept = self.channels.get(channel)
            if not kept or epoch != self.epoch:
                return False
            kept.appendleft((data, expires))
            self.unsettled[channel] = self.unsettled.get(channel, 0) - 1
            return True

    def expire(self, now: int) -> None:
        """Drop the lent messages that expired unread by ``now``, counting them to settle."""
        with self._guard:
            for channel, kept in list(self.channels.items()):
                expired = 0
                while kept and kept[0][1] <= now:
                    kept.popleft()
                    expired += 1
                if expired:
                    self.unsettled[channel] = self.unsettled.get(channel, 0) + expired
                if not kept:
                    del self.channels[channel]

    def to_settle(self, most: int) -> tuple[int, dict[bytes, int]] | None:
        """What is to settle, for a hold to settle it (``Engine.take``), as (epoch, channel ->
        count) for at most ``most`` channels, the rest left for the next; None if nothing."""
        if not self.unsettled:
            return None
        with self._guard:
            handed = self.unsettled
            self.unsettled = {}
            if len(handed) > most:
                rest = {}
                for channel in list(handed)[most:]:
                    rest[channel] = handed.pop(channel)
                self.unsettled = rest
            return (self.epoch, handed) if handed else None

    def unsettle(self, settle: tuple[int, dict[bytes, int]]) -> None:
        """Count again what ``to_settle`` gave a hold that failed before settling it, unless a
        flush came since."""
        epoch, handed = settle
        with self._guard:
            if epoch == self.epoch:
                for channel, count in handed.items():
                    self.unsettled[channel] = self.unsettled.get(channel, 0) + count

    def _lend_in(self, epoch: int) -> None:
        """Under the guard, before keeping messages lent in ``epoch``: those of an earlier
        epoch, and what is to settle of them, went with a flush."""
        if epoch != self.epoch:
            self.channels.clear()
            self.unsettled.clear()
            self.epoch = epoch
