"""Creating, attaching to and removing the shared-memory object of a prefix.

The object is the file ``layout.store_path(prefix)`` in /dev/shm, opened with
``private.open_private_file``: created exclusively with mode 0600, never through a symlink, and
accepted when it exists only if it is a regular file of this user closed to everyone else;
anything else raises ``ForeignObject`` and is neither read nor written.

Creation is race-free without a second lock: whoever opens the object first creates it empty,
and every process then takes the store lock and looks. Under the lock, an object of size 0 or
without the ready flag is one nobody has initialised yet (or whose initialiser died half way):
the process that sees it checks that /dev/shm has room for it (``creation_refusal``, the rule
the system check applies too: ``SharedMemoryTooSmall`` otherwise, naming the sizes and the
fixes), sizes it, reserves with ``posix_fallocate`` every page that is touched whatever the load
(``Geometry.reserved_at_creation``), then formats every area, writes the magic word and sets the
ready flag, in that order. Nobody maps an object before
it is ready, so resizing one that is not is safe. An initialiser that finds no room empties and
removes the object under the lock; a process that was waiting for the lock on it finds it
unlinked (no links left) and starts again from the path.

Creating the file needs a free inode in /dev/shm, which any local user can take them all of:
without one, creation raises ``SharedMemoryTooSmall`` too, saying so. The store's wake-up
directory (``wake_dir``, named after the store's hash key) is not made here but by the first
process to wait (doorbell.py), and removed only with the store (``unlink``).

An existing store keeps the sizes it was created with; a process configured with other sizes uses
it as it is and logs a warning. Anything that is not a ready store of this layout version raises
``StoreCorrupted`` naming the object and the command that removes it. ``existing_store`` tells,
without attaching, which of these a process would meet: the system check's view of the store.

Every process attached to a store holds a shared OFD lock on its ``ATTACHED_BYTE`` for as long
as it is (one per process and store file, whatever the number of its segments; a forked child
takes its own): taken under the store lock before the store is mapped, dropped once the last of
the process's segments of that file is unmapped. That is what tells ``unlink(unless_in_use=True)``
that processes still use a store, in any PID namespace, where pids and /proc/*/maps tell
nothing; it looks under the store lock, so that no process attaches between its look and the
removal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..exceptions import (
    ForeignObject,
    SharedMemoryTooSmall,
    StoreCorrupted,
    StoreError,
    StoreInUse,
)
from ..private import check_private, open_private_file
from .heap import Heap
from .journal import Journal
from .layout import (
    ATTACHED_BYTE,
    H_CHANNEL_BUCKETS,
    H_CHANNEL_MEMORY,
    H_CHANNELS,
    H_DISORDER_UNTIL,
    H_EXPIRY_HEAD,
    H_EXPIRY_TAIL,
    H_GEOMETRY_END,
    H_GEOMETRY_SUM,
    H_GROUP_BUCKETS,
    H_GROUP_MEMORY,
    H_GROUP_RESERVED,
    H_GROUPS,
    H_HASH_KEY,
    H_LATEST_EXPIRY,
    H_LOCK_PID,
    H_MAGIC,
    H_MEMBER_BUCKETS,
    H_MEMBERSHIPS,
    H_MESSAGE_RESERVED,
    H_PARCELS_TO_FREE,
    H_READY,
    H_REAP_HEAD,
    H_TOTAL_BYTES,
    H_VERSION,
    LAYOUT_VERSION,
    MAGIC,
    PAGE_WORDS,
    SHM_DIR,
    SLOT_WORDS,
    SLOTS,
    WORD,
    Geometry,
    store_path,
    wake_dir,
    wake_dirs,
)
from .lock import Handle, OwnDescription, StoreLock, byte_lock, byte_lock_holders
from .slots import SLOT_OWNED, SLOT_PARCELS, held_slots

logger = logging.getLogger(__name__)

_attached: weakref.WeakSet[Segment] = weakref.WeakSet()

# This process's mark of being attached, per store file ((st_dev, st_ino)): the description that
# holds the shared lock on ATTACHED_BYTE, and how many segments use it.
_marks: dict[tuple[int, int], tuple[OwnDescription, int]] = {}
_marks_guard = threading.Lock()


def _geometry_sum(words: memoryview) -> int:
    digest = hashlib.blake2b(words[H_MAGIC:H_GEOMETRY_SUM].tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def removal_hint(prefix: str) -> str:
    return f"remove it with `asgi-ipc unlink --prefix {prefix} --force` (its messages are lost)"


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class ShmSpace(NamedTuple):
    """The size and the free space of the tmpfs of SHM_DIR, in bytes, at one instant."""

    size: int  # 0 for a tmpfs mounted without a size limit, which reports no blocks at all
    free: int


def shm_space() -> ShmSpace:
    fs = os.statvfs(SHM_DIR)
    return ShmSpace(size=fs.f_blocks * fs.f_frsize, free=fs.f_bavail * fs.f_frsize)


def _sizes(geometry: Geometry) -> str:
    return (
        f"{_mib(geometry.total_bytes)} when full (channel_memory "
        f"{_mib(geometry.channel_memory)}, group_memory {_mib(geometry.group_memory)}, the rest "
        f"indexes and journal)"
    )


def _too_small(path: str, geometry: Geometry, space: ShmSpace) -> SharedMemoryTooSmall:
    return SharedMemoryTooSmall(
        f"{SHM_DIR} has no room for the asgi_ipc store {path}: it takes "
        f"{_sizes(geometry)}, of which creation reserves "
        f"{_mib(geometry.bytes_reserved_at_creation)} at once and the rest is reserved as "
        f"messages arrive, and a store is created only where it can grow to its full size, but "
        f"{SHM_DIR} has {_mib(space.free)} free of {_mib(space.size)}. Give /dev/shm more room "
        f"(docker run --shm-size=..., Compose shm_size:, in Kubernetes an emptyDir with medium: "
        f"Memory and a sizeLimit mounted at /dev/shm) or configure a smaller channel_memory or "
        f"group_memory"
    )


def creation_refusal(
    path: str, geometry: Geometry, space: ShmSpace
) -> SharedMemoryTooSmall | None:
    """What creating the store of ``geometry`` at ``path`` raises with /dev/shm as ``space``
    says, or None if it may be created: the one rule by which both store creation and the
    system check (checks.py) judge. A store is created only where the whole of it fits in the
    free space, so that it can grow to its configured size, although creation reserves only
    ``Geometry.bytes_reserved_at_creation`` at once."""
    if not space.size or geometry.total_bytes <= space.free:
        return None
    return _too_small(path, geometry, space)


class ExistingStore(NamedTuple):
    geometry: Geometry  # the sizes it was created with, which it keeps whatever is configured
    reserved: int  # bytes of it reserved so far: at creation, and by the heaps as they filled


def existing_store(prefix: str) -> ExistingStore | None:
    """The ready store of ``prefix``, as a process attaching to it would find it, read without
    attaching, locking or allocating anything: None when there is none (or none finished),
    which the first call of a layer creates; ``ForeignObject`` or ``StoreCorrupted``, as
    attaching would raise, for an object the layer refuses."""
    path = store_path(prefix)
    try:
        fd = open_private_file(path, create=False)[0]
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size == 0:
            return None
        _check_size(prefix, st.st_size)
        # Read, unlike a read through a mapping, allocates no page for a hole.
        header = memoryview(os.pread(fd, PAGE_WORDS * WORD, 0)).cast("Q")
        if _unfinished(header):
            return None
        return ExistingStore(_validate_header(header, st.st_size, prefix), st.st_blocks * 512)
    finally:
        os.close(fd)


def growth_shortfall(prefix: str, store: ExistingStore, space: ShmSpace) -> str | None:
    """Why the existing ``store`` of ``prefix`` cannot grow to its full size in /dev/shm as
    ``space`` says, or None if it can: it is used all the same, and sends and group_add meet a
    full tmpfs as they meet a full store."""
    growth = store.geometry.total_bytes - store.reserved
    if not space.size or growth <= space.free:
        return None
    return (
        f"the store of prefix {prefix!r} is there, and is used as it is, but cannot grow to its "
        f"full size: it takes {_sizes(store.geometry)}, of which {_mib(store.reserved)} is "
        f"reserved so far and the rest is reserved as messages arrive, and {SHM_DIR} has "
        f"{_mib(space.free)} free of {_mib(space.size)}. Once that is taken, sends get "
        f"ChannelFull and group_add GroupMemoryFull before the store is full"
    )


def _check_size(prefix: str, size: int) -> None:
    if size < PAGE_WORDS * WORD or size % (PAGE_WORDS * WORD):
        raise StoreCorrupted(
            f"{store_path(prefix)} is {size} bytes, not an asgi_ipc store; "
            f"{removal_hint(prefix)}"
        )


def _unfinished(header: memoryview) -> bool:
    """Whether a header is of a store nobody finished initialising: with our magic word (or
    none yet) but no ready flag. Anything else is left for ``_validate_header`` to judge."""
    return not header[H_READY] and header[H_MAGIC] in (0, MAGIC)


def _validate_header(words: memoryview, size: int, prefix: str) -> Geometry:
    """The geometry of the store of ``prefix`` of ``size`` bytes whose first page is
    ``words``, or StoreCorrupted naming what is wrong with it."""
    name = store_path(prefix)
    hint = removal_hint(prefix)
    if words[H_MAGIC] != MAGIC:
        raise StoreCorrupted(f"{name} is not an asgi_ipc store (bad magic); {hint}")
    if words[H_VERSION] != LAYOUT_VERSION:
        raise StoreCorrupted(
            f"{name} has layout version {words[H_VERSION]}, this asgi_ipc reads "
            f"version {LAYOUT_VERSION}; stop the processes using it and {hint}"
        )
    if words[H_GEOMETRY_SUM] != _geometry_sum(words):
        raise StoreCorrupted(f"{name} has a corrupt header (checksum); {hint}")
    geometry = Geometry.for_sizes(words[H_CHANNEL_MEMORY], words[H_GROUP_MEMORY])
    if (
        geometry.total_bytes != words[H_TOTAL_BYTES]
        or geometry.total_bytes != size
        or geometry.channel_buckets != words[H_CHANNEL_BUCKETS]
        or geometry.group_buckets != words[H_GROUP_BUCKETS]
        or geometry.member_buckets != words[H_MEMBER_BUCKETS]
    ):
        raise StoreCorrupted(
            f"{name} is {size} bytes but its header describes "
            f"{words[H_TOTAL_BYTES]} (truncated or corrupt); {hint}"
        )
    if words[H_GEOMETRY_END + 1 : H_READY].tobytes().strip(b"\0"):
        raise StoreCorrupted(f"{name} has a corrupt header (reserved words); {hint}")
    return geometry


def _no_inode(path: str) -> SharedMemoryTooSmall:
    fs = os.statvfs(SHM_DIR)
    return SharedMemoryTooSmall(
        f"{SHM_DIR} has no free inode for the asgi_ipc store {path}: "
        f"{fs.f_files - fs.f_ffree} of its {fs.f_files} inodes are in use, by files of any "
        f"user ({_mib(fs.f_bavail * fs.f_frsize)} free of {_mib(fs.f_blocks * fs.f_frsize)}). "
        f"Find out what fills it (ls -la {SHM_DIR}) and have it removed, or give {SHM_DIR} "
        f"more inodes (the nr_inodes= option of its tmpfs mount)"
    )


def heaps(
    words: memoryview, journal: Journal, g: Geometry, reserve: Callable[[int, int], bool]
) -> tuple[Heap, Heap]:
    return (
        Heap(words, journal, g.message_heap_meta, g.message_heap, g.message_heap_end,
             H_MESSAGE_RESERVED, reserve),
        Heap(words, journal, g.group_heap_meta, g.group_heap, g.group_heap_end,
             H_GROUP_RESERVED, reserve),
    )


@contextlib.contextmanager
def _mapped_words(fd: int, size: int) -> Iterator[memoryview]:
    """The first ``size`` bytes of ``fd`` as words, mapped for the span of a ``with`` block."""
    mm = mmap.mmap(fd, size)
    # Cut off by an exception (a signal handler's), the view may still be exported, by a view
    # made just before it landed or by the compiled heaps of ``format_areas`` that its traceback
    # keeps alive: then view and mapping go when those do, and the exception that matters
    # propagates rather than a BufferError.
    try:
        words = memoryview(mm).cast("Q")
        try:
            yield words
        finally:
            with contextlib.suppress(BufferError):
                words.release()
    finally:
        with contextlib.suppress(BufferError):
            mm.close()


_ZEROS = memoryview(bytes(1 << 20)).cast("Q")


def _clear(words: memoryview, start: int, end: int) -> None:
    """Zero words [start, end) by writing: they stay reserved."""
    for at in range(start, end, len(_ZEROS)):
        chunk = min(len(_ZEROS), end - at)
        words[at : at + chunk] = _ZEROS[:chunk]


def _give_back(words: memoryview, start: int, end: int) -> None:
    """Give the pages of words [start, end) back to the kernel. Where that cannot be done they
    are left as they are: they lie inside a heap's one free block, whose body nobody reads."""
    obj = words.obj
    if start < end and isinstance(obj, mmap.mmap) and hasattr(mmap, "MADV_REMOVE"):
        try:
            obj.madvise(mmap.MADV_REMOVE, start * WORD, (end - start) * WORD)
        except OSError:
            pass


def format_areas(
    words: memoryview,
    g: Geometry,
    reserve: Callable[[int, int], bool],
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Empty every channel, group and index (the process slots are kept, but not the lists of
    channels they own).

    Only what was reserved at creation is written (``Geometry.reserved_at_creation``: the
    allocator metadata, the indexes, the first and last pages of each heap), and those pages
    are zeroed in place rather than given back, so they stay reserved and a flush never needs
    to reserve anything. The rest of each heap is given back to the kernel: its mark is set
    down first (``Heap.format``), so that no page above it is ever taken for reserved.
    ``on_step("clear")`` / ``on_step("format")``, if given, is called before each of those
    steps (a fault-injection seam for crash tests, see ``Engine.inject``)."""
    for start, end in (
        (g.message_heap_meta, g.slots),
        (g.channel_index, g.message_heap),
        (g.group_index, g.group_heap),
    ):
        if on_step is not None:
            on_step("clear")
        _clear(words, start, end)
    for heap in heaps(words, Journal(words, g.journal), g, reserve):
        if on_step is not None:
            on_step("format")
        heap.format()
        _give_back(words, heap.start + PAGE_WORDS, heap.end - PAGE_WORDS)
    for word in (H_EXPIRY_HEAD, H_EXPIRY_TAIL, H_LATEST_EXPIRY, H_DISORDER_UNTIL, H_CHANNELS,
                 H_GROUPS, H_MEMBERSHIPS, H_REAP_HEAD, H_PARCELS_TO_FREE):
        words[word] = 0
    # The slots stay, but the channels they list as owned, and their parcels, are gone.
    for at in range(g.slots + SLOT_OWNED, g.slots + SLOTS * SLOT_WORDS, SLOT_WORDS):
        words[at] = words[at + 1] = 0
    for at in range(g.slots + SLOT_PARCELS, g.slots + SLOTS * SLOT_WORDS, SLOT_WORDS):
        words[at] = words[at + 1] = 0


class Segment:
    """One process's attachment to a prefix's shared-memory object."""

    def __init__(self, prefix: str, channel_memory: int, group_memory: int, create: bool = True):
        self.prefix = prefix
        self.path = store_path(prefix)
        self._pid = os.getpid()
        wanted = Geometry.for_sizes(channel_memory, group_memory)
        self.fd = -1
        self._marked: tuple[int, int] | None = None
        lock: StoreLock | None = None
        try:
            lock, handle = self._open_locked(create)
            self.lock = lock
            self._mark_attached()  # under the store lock: see unlink
            size = os.fstat(self.fd).st_size
            if self._needs_initialising(size):
                if not create:
                    # A tool attaching must not make the store with sizes of its own (0 for
                    # ``open_engine``): whoever created the file has not initialised it yet, or
                    # died before it was done, and the next layer to open it will.
                    raise StoreError(
                        f"the asgi_ipc store {self.path} is not initialised yet (a process is "
                        f"creating it, or died doing so: the next layer to open it finishes)"
                    )
                self._initialise(wanted)
                size = wanted.total_bytes
            _check_size(prefix, size)
            self.mm = mmap.mmap(self.fd, size)
            self.words = memoryview(self.mm).cast("Q")
            self.geometry = _validate_header(self.words, size, prefix)
        except BaseException:
            # Closing the lock's handles drops the flock, wherever the exception landed.
            if lock is not None:
                lock.close()
            self._close_handles()
            raise
        handle.held = False
        fcntl.flock(handle, fcntl.LOCK_UN)
        if create and self.geometry != wanted:
            logger.warning(
                "asgi_ipc store %s exists with channel_memory=%d and group_memory=%d; using those "
                "instead of the configured %d and %d (to resize it: stop every process of the "
                "prefix, run `asgi-ipc unlink --prefix %s`, start them again)",
                self.path, self.geometry.channel_memory, self.geometry.group_memory,
                channel_memory, group_memory, prefix,
            )
        self.hash_key = self.words[H_HASH_KEY:H_HASH_KEY + 2].tobytes()
        self.wake_dir = wake_dir(prefix, self.hash_key)
        _attached.add(self)

    def _open_locked(self, create: bool) -> tuple[StoreLock, Handle]:
        """Open the store file and take its lock, on the handle returned, starting again if the
        file was removed meanwhile (an initialiser that found no room removes it under the
        lock)."""
        while True:
            try:
                self.fd = open_private_file(self.path, create)[0]
            except FileNotFoundError:
                if create:
                    continue  # removed between our exclusive create and our open: create it
                raise StoreError(
                    f"no asgi_ipc store for prefix {self.prefix!r} ({self.path})"
                ) from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise _no_inode(self.path) from None
                raise
            lock = StoreLock(self.fd)
            try:
                handle = lock.handle()
                lock.acquire(handle)
                if os.fstat(self.fd).st_nlink:
                    return lock, handle
            except BaseException:
                lock.close()
                raise
            lock.close()
            os.close(self.fd)
            self.fd = -1

    def reserve(self, start: int, end: int) -> bool:
        """Reserve the memory of words [start, end) of the store; False when /dev/shm has no
        room for it. Touching a page that is not reserved could raise SIGBUS (see layout)."""
        try:
            os.posix_fallocate(self.fd, start * WORD, (end - start) * WORD)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return False
            raise
        return True

    def _needs_initialising(self, size: int) -> bool:
        """True for an object nobody finished initialising: empty, or ``_unfinished``."""
        if size == 0:
            return True
        if size < PAGE_WORDS * WORD:
            return False
        # A dead initialiser may have left the header page a hole: reading it would take a page.
        if not self.reserve(0, PAGE_WORDS):
            raise SharedMemoryTooSmall(f"{SHM_DIR} is full: no room to read {self.path}")
        with _mapped_words(self.fd, PAGE_WORDS * WORD) as words:
            return _unfinished(words)

    def _initialise(self, geometry: Geometry) -> None:
        os.ftruncate(self.fd, 0)  # drop whatever a dead initialiser wrote
        error = creation_refusal(self.path, geometry, shm_space())
        if error is None:
            os.ftruncate(self.fd, geometry.total_bytes)
            if not all(self.reserve(start, end) for start, end in geometry.reserved_at_creation()):
                # Something else took the room in the meantime.
                error = _too_small(self.path, geometry, shm_space())
        if error is not None:
            os.ftruncate(self.fd, 0)
            st = os.fstat(self.fd)
            try:
                if os.path.samestat(st, os.lstat(self.path)):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            raise error
        self._format(geometry)

    def _format(self, geometry: Geometry) -> None:

        with _mapped_words(self.fd, geometry.total_bytes) as words:
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
            format_areas(words, geometry, self.reserve)
            words[H_READY] = 1

    def lock_holder(self) -> int | None:
        """The pid holding the store lock right now, or None (asked without waiting)."""
        try:
            probe = self._reopen()
        except (OSError, StoreError):
            return None
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.words[H_LOCK_PID] or None
        finally:
            # Released before it is closed: a child forked meanwhile by another thread shares
            # the description, and would otherwise hold the lock for as long as it lives.
            fcntl.flock(probe, fcntl.LOCK_UN)
            os.close(probe)
        return None

    def _reopen(self) -> int:
        """A new open file description of the very file this process has mapped, opened
        through /proc/self/fd: it is found even after its name was unlinked or reused."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)

    def reopen_after_fork(self) -> None:
        """Give a forked child its own open file description, so its flock excludes the parent,
        and its own mark of being attached (the parent's was closed in the child: lock.py)."""
        inherited = self.fd
        self.fd = self._reopen()
        os.close(inherited)
        self.lock.reset_after_fork(self.fd)
        self._pid = os.getpid()
        self._marked = None
        self._mark_attached()

    def _mark_attached(self) -> None:
        st = os.fstat(self.fd)
        key = (st.st_dev, st.st_ino)
        with _marks_guard:
            own, users = _marks.get(key, (None, 0))
            if own is None:
                own = OwnDescription(self.fd)
                try:
                    byte_lock(own.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, ATTACHED_BYTE)
                except BaseException:
                    own.close()
                    raise
            _marks[key] = (own, users + 1)
        self._marked = key

    def _unmark_attached(self) -> None:
        key, self._marked = self._marked, None
        if key is None:
            return
        with _marks_guard:
            own, users = _marks.pop(key)
            if users > 1:
                _marks[key] = (own, users - 1)
            else:
                own.close()

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
        self._unmark_attached()

    def close(self, before_unmap: Callable[[], None] | None = None) -> None:
        """Detach, calling ``before_unmap`` once no hold is under way. A hold under way in
        another thread of this process finishes first, however long it lasts, and every hold
        that starts later gives the lock up without writing (``StoreLock.begin_close``): the
        lock is never released under a write. A thread still waiting for the lock, behind
        another process, is not waited for: it finds the store closed."""
        _attached.discard(self)
        self.lock.begin_close()
        self.lock.close()
        if before_unmap is not None:
            before_unmap()
        self._close_handles()

    @property
    def closed(self) -> bool:
        return self.fd < 0


def unlink(prefix: str, *, unless_in_use: bool = False) -> bool:
    """Remove the store file of ``prefix`` and its wake-up directories with the sockets in
    them; False if there was none of these. A store that is not a private object of this user
    raises ``ForeignObject`` before anything is removed (no symlink is followed).

    The wake-up directories are the paths named as the prefix's (``layout.wake_dirs``): the
    store's own, and any an earlier store of the prefix left. Of those, the ones that are not
    private to this user are left alone: the layer never binds a socket in one, and another
    user must not be able to keep a store from being removed by planting one.

    Processes still attached keep their mapping but share nothing with processes that attach
    after this: stop them first. With ``unless_in_use``, nothing is removed while any process
    has the store open, in whatever PID namespace: ``StoreInUse`` says how many, and how many
    process slots are held. That is judged from the byte locks (see the module docstring), under
    the store lock, which is held until the store is removed: a process that opened the file in
    between finds it removed once it has the lock, and starts again from the path.
    """
    path = store_path(prefix)
    try:
        found: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        found = None
    if found is not None:
        check_private(path, found, stat.S_IFREG, "a regular file")
    with contextlib.ExitStack() as held:
        if unless_in_use and found is not None:
            fd = open_private_file(path, create=False)[0]
            held.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.callback(fcntl.flock, fd, fcntl.LOCK_UN)  # before the close: see lock_holder
            if not os.path.samestat(os.fstat(fd), found):
                raise StoreError(f"{path} was replaced while being removed")
            _refuse_if_in_use(prefix, fd)
        removed = [
            directory for directory in wake_dirs(prefix)
            # With no store found, a store created since may have made its directory: left
            # alone, so that no waiting process loses its doorbell and no other user gets the
            # chance to take the name we would have freed.
            if (found is not None or not os.path.lexists(path)) and _remove_private_dir(directory)
        ]
        if found is not None:
            os.unlink(path)
    return found is not None or bool(removed)


def _remove_private_dir(directory: str) -> bool:
    """Remove ``directory`` and the entries in it if it is private to this user: True if so."""
    try:
        st = os.lstat(directory)
        check_private(directory, st, stat.S_IFDIR, "a directory")
    except (FileNotFoundError, ForeignObject):
        return False
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not os.path.samestat(os.fstat(fd), st):
            raise StoreError(f"{directory} was replaced while being removed")
        for entry in os.listdir(fd):
            os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(directory)
    return True


def store_users(fd: int) -> tuple[int, int]:
    """How many processes have the store of ``fd`` open, and how many process slots their
    receives wait in, whatever PID namespace they run in: asked through ``fd``, which must hold
    no byte lock of its own. Whether any process has it open is ``F_OFD_GETLK``'s answer; how
    many, the count of /proc/locks (which a process leaving in between may make one short)."""
    seen = byte_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, ATTACHED_BYTE) != fcntl.F_UNLCK
    waiting = held_slots(fd)
    if not (seen or waiting):
        return 0, 0
    return max(byte_lock_holders(fd, ATTACHED_BYTE), 1), waiting


def _refuse_if_in_use(prefix: str, fd: int) -> None:
    """Raise ``StoreInUse`` if any process has the store of ``fd`` open (``store_users``)."""
    attached, waiting = store_users(fd)
    if not attached:
        return
    processes = "1 process" if attached == 1 else f"{attached} processes"
    slots = "1 process slot" if waiting == 1 else f"{waiting} process slots"
    receives = f"receives waiting in {slots}" if waiting else "no receive waiting"
    raise StoreInUse(
        f"the store of prefix {prefix!r} is in use: open in {processes}, with {receives}",
        attached, waiting,
    )


def _after_fork_in_child() -> None:
    global _marks_guard
    # Runs after lock.py's hook has closed the parent's marks: they are forgotten here, and the
    # guard replaced (another thread of the parent may have held it at the fork).
    _marks.clear()
    _marks_guard = threading.Lock()
    for segment in list(_attached):
        if not segment.closed:
            segment.reopen_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
