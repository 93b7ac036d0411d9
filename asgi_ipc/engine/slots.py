"""The process slots: the table, in the store, of the processes that wait in receive().

A slot is live iff its *slot byte* in the store file is locked: an open-file-description lock
(``F_OFD_SETLK``) taken on the process's own descriptor of the store. The kernel drops it when
that descriptor is closed, and so when the holder dies however it dies, and any process that has
the store open can test it (``F_OFD_GETLK``), whatever PID namespace either is in: no pid is ever
compared. A slot's words (pid for display, random token, missed-ring mark) are changed through
the journal under the global lock like any other word of the store, except the missed-ring mark,
a hint written without it. How a process claims, uses and frees its slot: see doorbell.py and
receiver.py.
"""

from __future__ import annotations

import fcntl
import os
import struct

from .journal import Journal
from .layout import SLOT_WORDS, SLOTS, WORD

SLOT_PID = 0  # for display only: a pid means nothing in another PID namespace
SLOT_TOKEN = 1
SLOT_MISSED = 2  # set by a sender that found the doorbell's queue full

# struct flock of Linux on 64-bit machines: l_type, l_whence, l_start, l_len, l_pid (0 for OFD
# locks), padded to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")
assert _FLOCK.size == 32


def _slot_lock(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One OFD lock request on the byte at ``offset``; the lock type the kernel answers."""
    answer = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
    return _FLOCK.unpack(answer)[0]


class ProcessSlots:
    """The table of processes that wait in receive(), in the store, and their slot bytes."""

    def __init__(self, words: memoryview, journal: Journal, base: int) -> None:
        self._w = words
        self._j = journal
        self._base = base

    def token(self, slot: int) -> int:
        return self._w[self._base + slot * SLOT_WORDS + SLOT_TOKEN] if 0 <= slot < SLOTS else 0

    def lock_offset(self, slot: int) -> int:
        """The file offset of ``slot``'s slot byte: its first byte in the store."""
        return (self._base + slot * SLOT_WORDS) * WORD

    def try_lock(self, fd: int, slot: int) -> bool:
        """Lock ``slot``'s byte through ``fd`` without waiting: True if it is ours now."""
        try:
            _slot_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, self.lock_offset(slot))
        except (BlockingIOError, PermissionError):
            return False
        return True

    def unlock(self, fd: int, slot: int) -> None:
        _slot_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, self.lock_offset(slot))

    def locked(self, fd: int, slot: int) -> bool:
        """True if a process holds ``slot``'s byte. Asked through the holder's own descriptor,
        this answers False: a process must know its own slot."""
        offset = self.lock_offset(slot)
        return _slot_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK

    def claim(self, fd: int) -> int:
        """Lock the byte of a slot nobody holds, without the global lock: the slot, or -1 if
        every slot is held. ``record`` then writes the token, under the lock."""
        for slot in range(SLOTS):
            if self.try_lock(fd, slot):
                return slot
        return -1

    def record(self, slot: int, token: int) -> None:
        """Under the lock: ``slot``, whose byte this process holds, carries ``token`` now."""
        at = self._base + slot * SLOT_WORDS
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
        """Free ``slot`` if it still holds ``token``; its registrations become stale."""
        at = self._base + slot * SLOT_WORDS
        if 0 <= slot < SLOTS and self._w[at + SLOT_TOKEN] == token:
            self._j.set(at + SLOT_TOKEN, 0)
            self._j.set(at + SLOT_PID, 0)

    def live(self) -> list[tuple[int, int, int]]:
        """(slot, pid, token) of every slot with a token recorded (its holder may have died
        since: ``locked`` tells)."""
        w, found = self._w, []
        for slot in range(SLOTS):
            at = self._base + slot * SLOT_WORDS
            if w[at + SLOT_TOKEN]:
                found.append((slot, w[at + SLOT_PID], w[at + SLOT_TOKEN]))
        return found
