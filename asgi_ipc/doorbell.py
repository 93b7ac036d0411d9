"""Waking a receive() in another process at once, without polling: the doorbell sockets.

Each process that waits in ``receive()`` holds a *process slot* in the store (engine/slots.py:
live iff its slot byte is locked, whatever PID namespace anyone is in). With the slot comes the
process's *doorbell*: a Unix datagram socket bound at a path named by the slot's random token
inside the store's wake-up directory (``Segment.wake_dir``, mode 0700, checked to be ours). A
path reaches the process from every namespace that sees the same /dev/shm, whatever its network
namespace; the directory is closed to other users, so only processes of the same user can ring
a doorbell (and they learn its token from the store, mode 0600).

The wake-up directory belongs to the store, not to the processes waiting on it: the first
doorbell creates it (``make_private_dir``), and it stays, empty or not, until the store is
unlinked (``segment.unlink``). Its name is keyed by the store's secret hash key (layout.py), so
no other user can create it first; and since it is never removed while the store lives, no
other user can create it in the gap after the last waiting process has left either. (One of our
own user who removes it by hand opens that gap: the next doorbell creates it again, and refuses
it with ``ForeignObject`` if someone else got there first.)

A waiting receive registers ``(slot, token)`` on its channel's record, under the same lock hold
in which it found the channel empty, so no send can fall between the check and the registration.
A send that makes an empty channel non-empty collects the doorbells registered on it and, once
it has released the lock, sends each process one datagram naming its channels (a group_send to a
thousand members in four processes sends four). An empty datagram (after ``flush``, or for too
many channels) means "look at every channel again". In the receiving process the doorbell is
read by whichever event loop has a receive waiting (``loop.add_reader``); what happens next, and
what makes up for a ring that is lost (or a doorbell /dev/shm had no room for), is receiver.py's.

What frees a slot: its process closing the store (it clears its token, removes its socket, then
unlocks the byte), or, for a process that died, a sender whose ring finds the socket missing or
refusing (``ENOENT``/``ECONNREFUSED``) *and* the slot byte unlocked: it removes the socket and
clears the token at its next lock hold. A process that claims a slot whose token a dead process
left removes that socket too. A changed token makes every registration carrying the old one
stale; stale registrations are dropped by the next send that meets them and by the incremental
sweep, so a dead receiver slows nobody down and leaves nothing behind for long. A ring refused
while the byte is locked frees nothing: the byte's holder lives (it may be a process that has
just claimed a dead one's slot and not yet recorded its token, which makes the old one stale,
or one waiting without a doorbell).

A forked child closes the doorbell sockets it inherited before it runs anything else: kept open
there, a parent's socket would take the rings meant for the parent after the parent died, so
that no ring would find it dead and its slot would never be freed. A child that waits binds a
doorbell of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import weakref
from collections.abc import Callable

from .engine.lock import no_fork
from .private import make_private_dir

# Past this many bytes of channel names a ring says "look at everything" instead.
RING_BYTES = 16384
RUNG, FULL, GONE = range(3)

# This process's doorbells, whose sockets a forked child closes.
_doorbells: weakref.WeakSet[Doorbell] = weakref.WeakSet()


def new_token() -> int:
    """A random token for a process slot; never 0, which marks a free slot."""
    return secrets.randbits(63) | 1


def doorbell_address(wake_dir: str, token: int) -> str:
    """The path of the doorbell of the process whose slot holds ``token``."""
    return f"{wake_dir}/{token:016x}"


def remove_doorbell(wake_dir: str, token: int) -> None:
    """Remove a doorbell's socket. The directory stays, for the next process to wait."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(doorbell_address(wake_dir, token))


class Doorbell:
    """This process's doorbell: a datagram socket bound at ``doorbell_address(wake_dir,
    token)``, read by every event loop that has a receive waiting. Each ring read hands
    ``on_ring`` the channel names it carried (b"" for "look at everything"), in the loop that
    read it. Creating one raises ``OSError`` (``ENOSPC``) when /dev/shm has no inode or no space
    left for the socket or the directory."""

    def __init__(
        self, wake_dir: str, token: int, on_ring: Callable[[set[bytes]], None]
    ) -> None:
        self.token = token
        self._on_ring = on_ring
        self._wake_dir = wake_dir
        self._bind()
        self.datagrams = 0  # read so far: what tests count
        self.readers: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def _bind(self) -> None:
        with no_fork():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock = sock
            _doorbells.add(self)
        try:
            make_private_dir(self._wake_dir)  # there already, unless this is the first doorbell
            sock.bind(doorbell_address(self._wake_dir, self.token))
            sock.setblocking(False)
        except BaseException:
            _doorbells.discard(self)
            sock.close()
            raise

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
        _doorbells.discard(self)
        self._sock.close()
        remove_doorbell(self._wake_dir, self.token)


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


def _after_fork_in_child() -> None:
    for doorbell in list(_doorbells):
        doorbell._sock.close()  # the parent's: its path is left alone


os.register_at_fork(after_in_child=_after_fork_in_child)
