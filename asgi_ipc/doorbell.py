"""Waking a receive() in another process at once, without polling.

Each process that waits in ``receive()`` holds a *process slot* in the store. A slot is live iff
its *slot byte* in the store file is locked: an open-file-description lock (``F_OFD_SETLK``)
taken on the process's own descriptor of the store. The kernel drops it when that descriptor is
closed, and so when the holder dies however it dies, and any process that has the store open can
test it (``F_OFD_GETLK``), whatever PID namespace either is in: no pid is ever compared. (A lock
shows no conflict to its own holder, so a process knows its own slot by its token. On Linux these
locks and the ``flock`` of the global lock ignore each other; a forked child opens the store
again, so it holds no slot of its parent's.) The first time one of its receives has to wait, a
process claims a slot by locking the byte of any slot that is not locked, without the global
lock, right after the lock hold that found the channel empty; the next lock hold records the
slot's random token (and the pid, for display only) and serves the receive again. If every byte
is locked (``SLOTS`` processes wait), that receive raises ``StoreError``; the process looks for
a free slot again no sooner than ``CHECK_INTERVAL`` later, and its other operations go on.

With the slot comes the process's *doorbell*: a Unix datagram socket bound at a path named by the
token inside the prefix's wake-up directory (``layout.wake_dir``, mode 0700, checked to be ours).
A path reaches the process from every namespace that sees the same /dev/shm, whatever its network
namespace; the directory is closed to other users, so only processes of the same user can ring
a doorbell (and they learn its token from the store, mode 0600). A waiting
receive registers ``(slot, token)`` on its channel's record, under the same lock hold in which it
found the channel empty, so no send can fall between the check and the registration. A send that
makes an empty channel non-empty collects the doorbells registered on it and, once it has
released the lock, sends each process one datagram naming its channels (a group_send to a
thousand members in four processes sends four). An empty datagram (after ``flush``, or for too
many channels) means "look at every channel again".

A doorbell's queue holds only ``net.unix.max_dgram_qlen`` datagrams (10 by default). A sender
that finds it full marks the process slot as having missed a ring, then rings once more; the
receiving process reads the mark after draining its queue and then wakes every receive it has.

A ring can still be lost for good: the sender may die after its commit and before its ring, or a
flush after wiping the registrations and before telling anyone. So each process with receives
waiting looks once a second (``CHECK_INTERVAL``), under one lock hold, at just the channels it
waits on, and wakes those that hold messages: a lost ring costs at most a second, and an idle
process one lock hold per second. The check runs in a thread of its own (``Store._run_checks``),
not in an event loop: loops come and go (``async_to_sync`` may run each call in a new one), and
a check scheduled in a loop dies with it, leaving the receives of every other loop without it.

In the receiving process the doorbell is read by whichever event loop has a receive waiting
(``loop.add_reader``). It hands the receives waiting on the named channels to the store, which
serves all those of one event loop in one lock hold, in that loop (``call_soon_threadsafe`` for
the other loops): each gets the next message of its channel, or waits on. Nothing runs while
nobody sends.

A registration lingers after its receive (``Doorbell.LINGER``), and while it does, a receive that
finds its channel empty need not take the lock at all: it puts itself where a ring will find it,
then reads the channel's message count from the record its registration keeps in place. Any send
that makes the channel non-empty after that read rings this process (see ``Store.receive``).

What frees a slot: its process closing the store (it clears its token, removes its socket, then
unlocks the byte), or, for a process that died, a sender whose ring finds the socket missing or
refusing (``ENOENT``/``ECONNREFUSED``) *and* the slot byte unlocked: it removes the socket and
clears the token at its next lock hold. A process that claims a slot whose token a dead process
left removes that socket too. A changed token makes every registration carrying the old one
stale; stale registrations are dropped by the next send that meets them and by the incremental
sweep, so a dead receiver slows nobody down and leaves nothing behind for long. A ring refused
while the byte is locked frees nothing: the byte's holder lives (it may be a process that has
just claimed a dead one's slot and not yet recorded its token, which makes the old one stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable

from .engine.layout import wake_dir
from .exceptions import StoreClosed
from .private import make_private_dir

# Past this many bytes of channel names a ring says "look at everything" instead.
RING_BYTES = 16384
# Seconds between the checks that make up for lost rings (see the module docstring), and the
# least time before a process that found every slot taken looks for a free one again.
CHECK_INTERVAL = 1.0

RUNG, FULL, GONE = range(3)
# Binding retries when the wake-up directory vanishes between its creation and the bind.
BIND_TRIES = 10

def doorbell_address(prefix: str, token: int) -> str:
    """The path of the doorbell of the process whose slot holds ``token``."""
    return f"{wake_dir(prefix)}/{token:016x}"


def remove_doorbell(prefix: str, token: int) -> None:
    """Remove a doorbell's socket, and the wake-up directory if that leaves it empty."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(doorbell_address(prefix, token))
    with contextlib.suppress(OSError):  # not empty: other processes wait
        os.rmdir(wake_dir(prefix))


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


class Doorbell:
    """This process's doorbell socket, its receives waiting by channel, and the channels it is
    registered on in the store.

    A registration outlives the receive that made it by ``LINGER`` seconds, so that a consumer
    looping on ``receive()`` registers once rather than once per message; a registration with no
    receive behind it costs a sender at most one datagram, when the channel turns non-empty.

    ``registered`` maps each channel registered in the store to its record there. It changes
    under the store lock and ``_guard`` both, so ``add`` (under the guard only) sees either the
    registration or its absence, never half a lapse.

    Once closed it tracks nothing more: ``add`` raises ``StoreClosed``, and ``close`` hands
    back the receives it tracked, for the store to end them."""

    LINGER = 2.0

    def __init__(
        self,
        prefix: str,
        take_missed: Callable[[], bool],
        deliver: Callable[[list[Waiter]], None],
    ) -> None:
        self.token = secrets.randbits(63) | 1
        self._take_missed = take_missed
        self._deliver = deliver
        self.slot = -1
        self._prefix = prefix
        self._sock = self._bind()
        self.datagrams = 0  # read so far: what tests count
        self._guard = threading.Lock()
        self._waiting: dict[bytes, set[Waiter]] = {}
        self._readers: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self.registered: dict[bytes, int] = {}
        # Since when the registrations with no receive behind them have been so.
        self._idle_since: dict[bytes, float] = {}
        self.next_lapse = math.inf
        self._closed = False

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            for attempt in range(BIND_TRIES):
                try:
                    make_private_dir(wake_dir(self._prefix))
                    sock.bind(doorbell_address(self._prefix, self.token))
                    break
                except FileNotFoundError:
                    # The last doorbell of the prefix removed the empty directory in between.
                    if attempt == BIND_TRIES - 1:
                        raise
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def add(self, channel: bytes, waiter: Waiter) -> int:
        """Track ``waiter``, so that a ring from now on finds it: the channel's record if this
        process is registered on it, else 0 (the store must register it)."""
        with self._guard:
            if self._closed:
                raise StoreClosed("the store was closed")
            self._waiting.setdefault(channel, set()).add(waiter)
            self._idle_since.pop(channel, None)
            rec = self.registered.get(channel, 0)
        if waiter.loop not in self._readers:
            # Left in place when the loop's receives end: the next one needs it again.
            waiter.loop.add_reader(self._sock.fileno(), self._on_readable)
            self._readers.add(waiter.loop)
        return rec

    def note_registered(self, channel: bytes, rec: int) -> None:
        """The store registered this process on ``channel``, whose record is at ``rec``."""
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

    def discard(self, channel: bytes, waiter: Waiter) -> None:
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
        """Registrations that lingered long enough: they are dropped here, for the store to
        drop too (under its lock)."""
        deadline = time.monotonic() - self.LINGER
        with self._guard:
            gone = [channel for channel, since in self._idle_since.items() if since <= deadline]
            for channel in gone:
                del self._idle_since[channel]
                del self.registered[channel]
            self.next_lapse = min(self._idle_since.values(), default=math.inf) + self.LINGER
        return gone

    def forget_registrations(self) -> list[bytes]:
        """The store lost every registration (flush, or a slot taken back): the channels that
        still have receives waiting, to register again."""
        with self._guard:
            self.registered.clear()
            self._idle_since.clear()
            self.next_lapse = math.inf
            return list(self._waiting)

    def _on_readable(self) -> None:
        names = set()
        while True:
            try:
                names.update(self._sock.recv(RING_BYTES).split(b"\n"))
                self.datagrams += 1
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return
        # Read after draining: a sender that found the queue full marks the slot, then rings
        # again, so a mark set after this read comes with a datagram that calls us back.
        if self._take_missed():
            names.add(b"")
        self.wake(names)

    def waiting_channels(self) -> list[bytes]:
        with self._guard:
            return list(self._waiting)

    def needs_checking(self) -> bool:
        """Whether the periodic check still has work here: receives waiting, or registrations
        lingering (which lapse at the check's lock holds)."""
        with self._guard:
            return bool(self._waiting or self.registered)

    def drop_closed_loops(self) -> None:
        """Stop tracking the receives whose event loop was closed under them: nothing can
        hand them a message any more, and their registrations may lapse."""
        with self._guard:
            dead = [
                (channel, waiter)
                for channel, waiters in self._waiting.items()
                for waiter in waiters
                if waiter.loop.is_closed()
            ]
        for channel, waiter in dead:
            self.discard(channel, waiter)

    def wake(self, names: set[bytes] | list[bytes]) -> None:
        """Hand the receives waiting on ``names`` (every receive, if b"" is among them) to the
        store to serve, all those of one event loop together, in that loop."""
        with self._guard:
            if b"" in names:
                targets = [w for waiters in self._waiting.values() for w in waiters]
            else:
                targets = [w for name in names for w in self._waiting.get(name, ())]
        by_loop: dict[asyncio.AbstractEventLoop, list[Waiter]] = {}
        for waiter in targets:
            by_loop.setdefault(waiter.loop, []).append(waiter)
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, waiters in by_loop.items():
            if loop is current:
                self._deliver(waiters)
            else:
                try:
                    loop.call_soon_threadsafe(self._deliver, waiters)
                except RuntimeError:
                    pass  # its loop is closed: those receives will never look again

    def close(self) -> list[Waiter]:
        """Close the socket; the receives still tracked, which nothing will wake any more."""
        with self._guard:
            self._closed = True
            waiters = [w for waiters in self._waiting.values() for w in waiters]
            self._waiting.clear()
        for loop in list(self._readers):
            if not loop.is_closed():
                try:
                    loop.remove_reader(self._sock.fileno())
                except RuntimeError:
                    pass
        self._sock.close()
        remove_doorbell(self._prefix, self.token)
        return waiters


class Ringer:
    """The sending side: one unbound datagram socket per process."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def ring(self, address: str, payload: bytes) -> int:
        """Ring one doorbell: RUNG, FULL (its queue is full: the ring is lost) or GONE
        (no socket there, or nobody bound to it: the caller asks the slot byte whether its
        process died)."""
        try:
            self._sock.sendto(payload, address)
        except (ConnectionRefusedError, FileNotFoundError):
            return GONE
        except OSError:
            # Full, or any other trouble: the message is queued either way, so never raise
            # here; the missed-ring mark and the periodic check make up for it.
            return FULL
        return RUNG

    def close(self) -> None:
        self._sock.close()
