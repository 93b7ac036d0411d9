"""Creating, attaching to and removing the shared-memory object of a prefix.

Creation is race-free without a second lock: whoever opens the object first creates it empty
(``O_CREAT | O_EXCL``, mode 0600), and every process then takes the store lock and looks. Under the
lock, an object of size 0 or without the ready flag is one nobody has initialised yet (or whose
initialiser died half way): the process that sees it sizes it, formats every area, writes the
magic word and sets the ready flag, in that order. Nobody maps an object before it is ready, so
resizing one that is not is safe.

An existing store keeps the sizes it was created with; a process configured with other sizes uses
it as it is and logs a warning. Anything that is not a ready store of this layout version raises
``StoreCorrupted`` naming the object and the command that removes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import weakref

import posix_ipc

from .exceptions import StoreCorrupted, StoreError
from .layout import (
    H_CHANNEL_BUCKETS,
    H_CHANNEL_MEMORY,
    H_GEOMETRY_END,
    H_GEOMETRY_SUM,
    H_GROUP_BUCKETS,
    H_GROUP_MEMORY,
    H_HASH_KEY,
    H_LOCK_PID,
    H_MAGIC,
    H_MEMBER_BUCKETS,
    H_READY,
    H_TOTAL_BYTES,
    H_VERSION,
    LAYOUT_VERSION,
    MAGIC,
    PAGE_WORDS,
    WORD,
    Geometry,
    shm_name,
)
from .lock import StoreLock

logger = logging.getLogger(__name__)

_attached: weakref.WeakSet[Segment] = weakref.WeakSet()


def _geometry_sum(words: memoryview) -> int:
    digest = hashlib.blake2b(words[H_MAGIC:H_GEOMETRY_SUM].tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def removal_hint(prefix: str) -> str:
    return f"remove it with `asgi-ipc unlink --prefix {prefix} --force` (its messages are lost)"


class Segment:
    """One process's attachment to a prefix's shared-memory object."""

    def __init__(self, prefix: str, channel_memory: int, group_memory: int, create: bool = True):
        self.prefix = prefix
        self.name = shm_name(prefix)
        self._pid = os.getpid()
        wanted = Geometry.for_sizes(channel_memory, group_memory)
        shm = self._open(create)
        self.fd = shm.fd
        self.lock = StoreLock(self.fd)
        handle = self.lock.handle()
        try:
            self.lock.acquire(handle)
            size = os.fstat(self.fd).st_size
            if self._needs_initialising(size):
                self._initialise(wanted)
                size = wanted.total_bytes
            if size < PAGE_WORDS * WORD or size % (PAGE_WORDS * WORD):
                raise StoreCorrupted(
                    f"{self.name} is {size} bytes, not an asgi_ipc store; "
                    f"{removal_hint(prefix)}"
                )
            self.mm = mmap.mmap(self.fd, size)
            self.words = memoryview(self.mm).cast("Q")
            self.geometry = self._validate(size)
        except BaseException:
            self._close_handles()
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)  # one C call: see lock.py
        if create and self.geometry != wanted:
            logger.warning(
                "asgi_ipc store %s exists with channel_memory=%d and group_memory=%d; using those "
                "instead of the configured %d and %d (flush and unlink it to resize)",
                self.name, self.geometry.channel_memory, self.geometry.group_memory,
                channel_memory, group_memory,
            )
        self.hash_key = self.words[H_HASH_KEY:H_HASH_KEY + 2].tobytes()
        _attached.add(self)

    def _open(self, create: bool) -> posix_ipc.SharedMemory:
        try:
            if create:
                return posix_ipc.SharedMemory(self.name, posix_ipc.O_CREAT, mode=0o600)
            return posix_ipc.SharedMemory(self.name)
        except posix_ipc.ExistentialError:
            raise StoreError(
                f"no asgi_ipc store for prefix {self.prefix!r} ({self.name})"
            ) from None
        except posix_ipc.PermissionsError:
            raise StoreError(
                f"no permission to open {self.name}: it belongs to another user"
            ) from None

    def _needs_initialising(self, size: int) -> bool:
        """True for an object nobody finished initialising: empty, or with our magic word (or
        none yet) but no ready flag. Anything else is left alone for ``_validate`` to judge."""
        if size == 0:
            return True
        if size < PAGE_WORDS * WORD:
            return False
        with mmap.mmap(self.fd, PAGE_WORDS * WORD) as header:
            words = memoryview(header).cast("Q")
            try:
                return not words[H_READY] and words[H_MAGIC] in (0, MAGIC)
            finally:
                words.release()

    def _initialise(self, geometry: Geometry) -> None:
        from .store import format_areas  # the areas' formats belong to the store

        os.ftruncate(self.fd, 0)  # drop whatever a dead initialiser wrote
        os.ftruncate(self.fd, geometry.total_bytes)
        with mmap.mmap(self.fd, geometry.total_bytes) as mm:
            words = memoryview(mm).cast("Q")
            try:
                words[H_VERSION] = LAYOUT_VERSION
                words[H_TOTAL_BYTES] = geometry.total_bytes
                words[H_CHANNEL_MEMORY] = geometry.channel_memory
                words[H_GROUP_MEMORY] = geometry.group_memory
                key = secrets.token_bytes(16)
                words[H_HASH_KEY] = int.from_bytes(key[:8], "little")
                words[H_HASH_KEY + 1] = int.from_bytes(key[8:], "little")
                words[H_CHANNEL_BUCKETS] = geometry.channel_buckets
                words[H_GROUP_BUCKETS] = geometry.group_buckets
                words[H_MEMBER_BUCKETS] = geometry.member_buckets
                words[H_MAGIC] = MAGIC
                words[H_GEOMETRY_SUM] = _geometry_sum(words)
                format_areas(words, geometry)
                words[H_READY] = 1
            finally:
                words.release()

    def _validate(self, size: int) -> Geometry:
        words = self.words
        hint = removal_hint(self.prefix)
        if words[H_MAGIC] != MAGIC:
            raise StoreCorrupted(f"{self.name} is not an asgi_ipc store (bad magic); {hint}")
        if words[H_VERSION] != LAYOUT_VERSION:
            raise StoreCorrupted(
                f"{self.name} has layout version {words[H_VERSION]}, this asgi_ipc reads "
                f"version {LAYOUT_VERSION}; stop the processes using it and {hint}"
            )
        if words[H_GEOMETRY_SUM] != _geometry_sum(words):
            raise StoreCorrupted(f"{self.name} has a corrupt header (checksum); {hint}")
        geometry = Geometry.for_sizes(words[H_CHANNEL_MEMORY], words[H_GROUP_MEMORY])
        if (
            geometry.total_bytes != words[H_TOTAL_BYTES]
            or geometry.total_bytes != size
            or geometry.channel_buckets != words[H_CHANNEL_BUCKETS]
            or geometry.group_buckets != words[H_GROUP_BUCKETS]
            or geometry.member_buckets != words[H_MEMBER_BUCKETS]
        ):
            raise StoreCorrupted(
                f"{self.name} is {size} bytes but its header describes "
                f"{words[H_TOTAL_BYTES]} (truncated or corrupt); {hint}"
            )
        if words[H_GEOMETRY_END + 1 : H_READY].tobytes().strip(b"\0"):
            raise StoreCorrupted(f"{self.name} has a corrupt header (reserved words); {hint}")
        return geometry

    def lock_holder(self) -> int | None:
        """The pid holding the store lock right now, or None (asked without waiting)."""
        try:
            probe = os.open(f"/dev/shm/{self.name[1:]}", os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.words[H_LOCK_PID] or None
        finally:
            os.close(probe)
        return None

    def reopen_after_fork(self) -> None:
        """Give a forked child its own open file description, so its flock excludes the parent."""
        inherited = self.fd
        self.fd = posix_ipc.SharedMemory(self.name).fd
        os.close(inherited)
        self.lock.reset_after_fork(self.fd)
        self._pid = os.getpid()

    def _close_handles(self) -> None:
        words = getattr(self, "words", None)
        if words is not None:
            words.release()
        mm = getattr(self, "mm", None)
        if mm is not None:
            mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        _attached.discard(self)
        self.lock.close()
        self._close_handles()

    @property
    def closed(self) -> bool:
        return self.fd < 0


def unlink(prefix: str) -> bool:
    """Remove the shared-memory object of ``prefix``; False if there was none.

    Processes still attached keep their mapping but share nothing with processes that attach
    after this: stop them first.
    """
    try:
        posix_ipc.unlink_shared_memory(shm_name(prefix))
    except posix_ipc.ExistentialError:
        return False
    return True


def _after_fork_in_child() -> None:
    for segment in list(_attached):
        if not segment.closed:
            segment.reopen_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
