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
import os
import secrets
import socket
import weakref
from collections.abc import Callable

from .engine.layout import wake_dir
from .private import make_private_dir

# Past this many bytes of channel names a ring says "look at everything" instead.
RING_BYTES = 16384
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


class Doorbell:
    """This process's doorbell: a datagram socket bound at ``doorbell_address(prefix, token)``,
    read by every event loop that has a receive waiting. Each ring read hands ``on_ring`` the
    channel names it carried (b"" for "look at everything"), in the loop that read it."""

    def __init__(self, prefix: str, on_ring: Callable[[set[bytes]], None]) -> None:
        self.token = secrets.randbits(63) | 1
        self._on_ring = on_ring
        self._prefix = prefix
        self._sock = self._bind()
        self.datagrams = 0  # read so far: what tests count
        self.readers: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

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

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` read the doorbell. Left in place when the loop's receives end: the next
        one needs it again."""
        loop.add_reader(self._sock.fileno(), self._on_readable)
        self.readers.add(loop)

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
        self._on_ring(names)

    def close(self) -> None:
        """Stop reading and remove the socket."""
        for loop in list(self.readers):
            if not loop.is_closed():
                try:
                    loop.remove_reader(self._sock.fileno())
                except RuntimeError:
                    pass
        self._sock.close()
        remove_doorbell(self._prefix, self.token)


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
