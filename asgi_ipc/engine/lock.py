"""The global lock of a store, what a dead or interrupted holder leaves behind, and the byte
locks that mark which processes use the store.

Every operation on a store runs under one lock: ``flock(LOCK_EX)``, taken by each thread on an
open file description of the shared-memory object of its own (``StoreLock.handle``: the object
opened again through ``/proc/self/fd``, so it is the same object even if its name was unlinked
and reused since). flock excludes every other open file description, so the one lock orders the
threads of a process and the processes alike. The kernel drops a flock when the last descriptor
of its holder is closed, and so when the holder dies however it dies: no owner tracking, no
timeout, no pid reuse problem. The next process to take the lock finds the dead holder's undo
journal (see ``journal.py``) still open and rolls it back before doing anything else.

An exception raised by a Python signal handler (``KeyboardInterrupt`` on Ctrl-C, or whatever a
handler raises) lands in the main thread at any check of the interpreter's eval breaker: at the
entry of any Python function, on a backward jump, and right after any call returns, so right
after ``flock`` took the lock, or at the entry of the function meant to release it. A
``threading.Lock`` beside the flock, released by a ``with`` block's Python ``__exit__``, was left
held by about 3% of the interrupts that landed in a loop of lock holds, and the process then
deadlocked on its own next call and every other process on the flock. So now:

* a lock hold is ``try: acquire(handle) ... finally: fcntl.flock(handle, LOCK_UN)``, with the
  ``try`` entered before the acquire and the release one C call written in the ``finally``
  itself: no Python frame, so no eval-breaker check, comes between the ``finally`` and the
  release. Wherever the exception lands, before the flock, right after it, in the middle of the
  operation or of its rollback, the release runs. Unlocking a handle that is not locked is
  harmless, and the handle is this thread's alone, so the release never drops another thread's
  hold. In the same loop of lock holds with random SIGALRMs, none of 16k-20k interrupts left the
  lock held, on each of CPython 3.10, 3.11, 3.12 and 3.13 (the interpreters differ in where they
  check, none checks between loading a C function and calling it);
* whatever the operation had changed is undone from the shared journal count, which covers
  exactly the words already changed: by the interrupted thread itself when it got far enough to
  try, otherwise (an exception that lands inside the rollback) by the next holder, as for a dead
  one. Nothing but the journal's words is trusted for that, so an interruption anywhere is safe.

``signal.pthread_sigmask`` around a hold was not used: a process-directed signal blocked in the
main thread is delivered to another thread, and the Python handler then still runs in the main
thread, at its next check; and it would cost two system calls per operation.

What it costs, measured with 20k in-process send+receive pairs through the layer, best of five,
alternating the two versions on two busy cores: 40.6-41.8k pairs/s with a ``threading.Lock``
beside the flock and ``with`` blocks, 38.3-40.2k now, so 0.3-0.6 us more per operation. That is
the Python around the lock (the look-up of this thread's handle, a closure, one more call), not
the lock: an acquire/release pair costs 1.08 us on a handle against 1.02 us for the thread lock
and the flock before.

A named POSIX semaphore (asgi_ipc 1.x's choice) costs 0.14 us per acquire/release pair here
against 0.46 us for flock, a difference lost in an operation of several microseconds; but nothing
releases a semaphore whose holder was SIGKILLed, which is what froze 1.x.

Why not a robust process-shared mutex in the segment, as LMDB uses (``EOWNERDEAD`` telling the
next holder to recover)? It is much cheaper in C (18 ns an uncontended acquire/release pair
against 238 ns for flock; 1.15M against 785k contended holds/s of 1 us), but from Python, through
any call, the difference is about 0.3 us in operations of several microseconds, and it breaks
four guarantees. (1) PID namespaces: the kernel marks a robust mutex's owner dead by thread id,
and ids repeat across namespaces; measured, a waiter SIGKILLed in one container whose thread id
equalled the live holder's in another marked the mutex owner-dead, and a third process got
``EOWNERDEAD`` and "recovered" a store still being written. Containers sharing /dev/shm all
have low pids (often 1), so that is not a corner case. (2) A signal handler's exception between
``EOWNERDEAD`` and ``pthread_mutex_consistent`` makes the mutex unrecoverable for every process
for good, and a thread blocked in ``pthread_mutex_lock`` runs no signal handler at all (Ctrl-C
does nothing while another process holds it). (3) close() cannot cut loose a thread waiting on a
mutex, nor can any thread unlock another's. (4) glibc and musl lay the mutex out differently, so
containers built on different C libraries could not share a store. flock involves no ids and
lives in the kernel. Open-file-description locks (``F_OFD_SETLKW``) have flock's semantics and
cost more (412 ns a pair). Spinning before blocking (below) already gives near-strict turns under
contention (a mean run of 1.0 holds by one process, against 29 for the mutex).

The lock is held for microseconds, far less than it takes the kernel to put a waiter to sleep
and wake it again, so a process first retries without blocking, ``SPIN_TRIES`` times (some tens
of microseconds), and only then sleeps in ``flock``. Measured with ``asgi-ipc bench`` on two
cores: one producer to one consumer went from 32k to 69k messages/s, four to four from 42k to 58k.

flock belongs to an open file description, which ``fork()`` shares between parent and child: a
child drops the handles it inherited and opens its own (``Segment.reopen_after_fork``).

**close() never releases the lock under a write.** Closing a thread's handle drops its flock, so
close() must not close the handle of a thread in the middle of a hold: other processes would
take the lock at once and find the write half done (asgi_ipc 2.2.0 waited 1 s, then closed the
handles anyway, and a 2 s ``group_send`` in another thread corrupted the store for every
process). So a handle is *held* (``Handle.held``) from the moment its flock is taken until its
hold ends, and ``StoreLock.begin_close`` first sets ``closing``, then waits until no handle is
held, however long that takes: the wait is for this process's own writes, which always end. A
thread that gets the flock after ``closing`` was set gives it up without writing anything. The
two flags are set and read in opposite orders (``held`` then ``closing`` in ``acquire``,
``closing`` then ``held`` in ``begin_close``), so under the GIL at least one side sees the other:
either close() waits for the hold, or the hold sees close() and writes nothing. A thread merely
*waiting* for the flock (held by another process, perhaps stopped) is not waited for: its handle
is closed under it, and when its flock returns it finds the store closing and gives the lock up.

Byte locks. Besides the store lock, processes mark what they are with open-file-description
locks (``F_OFD_SETLK``) on single bytes of the store file: the attached byte (segment.py) and the
slot bytes (slots.py). On Linux they are independent of the flock. Like it they belong to an open
file description and go when its last descriptor closes, so when the process dies however it
dies; any process that has the file open can test them (``F_OFD_GETLK``), whatever PID namespace
either is in, and no pid is involved. Two rules keep them true:

* they are held on an ``OwnDescription`` only: opened for them alone, never duplicated, and
  closed in a forked child before it runs anything else, since the child would otherwise keep
  its parent's marks for as long as it lives. ``mmap`` keeps a duplicate of the descriptor it
  maps, which a child inherits and cannot drop while it keeps the mapping, so no byte lock is
  ever held on the mapped descriptor (``Segment.fd``);
* ``F_OFD_GETLK`` does not see the locks of the description it is asked through, so probes go
  through one that holds none (``Segment.fd`` again): they then see every holder, this process
  included.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator

from ..exceptions import StoreClosed, StoreError

SPIN_TRIES = 50


def _closed() -> StoreClosed:
    return StoreClosed("the asgi_ipc store was closed in this process")


class Handle(io.FileIO):
    """One thread's own open file description of the store, the thing its flock is held on.

    Pass it to ``fcntl.flock``; once closed it raises ValueError there instead of reaching
    whatever file reuses its descriptor number."""

    # Set for the span of a lock hold: flock on the same open file description succeeds again,
    # so a thread taking the lock inside its own hold (a signal handler calling the store) would
    # run in the middle of its own operation; ``StoreLock.handle`` refuses that instead.
    busy = False
    # Set from the moment this handle's flock is taken (and the store is not closing) until its
    # hold ends: close() waits while any handle is held (see the module docstring).
    held = False

    def __del__(self) -> None:
        # The handle of a thread that ended goes with the thread's locals: closing it is the
        # normal end, not a leak to warn about.
        self.close()


class StoreLock:
    """The process-wide and machine-wide lock of one attached segment.

    Take it only as ``handle = lock.handle()`` then ``try: handle.busy = True;
    lock.acquire(handle) ... finally: handle.busy = handle.held = False; fcntl.flock(handle,
    fcntl.LOCK_UN)`` (see the module docstring for why the release is written out)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # Set by begin_close(): from then on a thread that gets the flock writes nothing.
        self.closing = False
        self._local = threading.local()
        self._handles: weakref.WeakSet[Handle] = weakref.WeakSet()

    def handle(self) -> Handle:
        """This thread's handle, opened on first use; RuntimeError if this thread is in a lock
        hold already; StoreClosed once the store was closed (never a handle on whatever file
        reuses the closed descriptor's number)."""
        try:
            handle = self._local.handle
        except AttributeError:
            pass
        else:
            if handle.busy:
                raise RuntimeError(
                    "the asgi_ipc store lock was taken again by the thread that holds it (a "
                    "signal handler or a callback using the store in the middle of an operation)"
                )
            return handle
        if self._fd < 0:
            raise _closed()
        try:
            handle = Handle(f"/proc/self/fd/{self._fd}", "r")
        except OSError as exc:
            if self._fd < 0:
                raise _closed() from exc
            raise StoreError(
                f"cannot open the store again through /proc/self/fd for this thread's lock "
                f"(is /proc mounted?): {exc}"
            ) from exc
        self._handles.add(handle)
        if self._fd < 0:
            # close() ran while it was being opened: the descriptor number may have named
            # another file by then (close() clears ``_fd`` before it closes the descriptor).
            handle.close()
            raise _closed()
        self._local.handle = handle
        return handle

    def acquire(self, handle: Handle) -> None:
        """Take the lock on ``handle`` and mark it held; StoreClosed, with the handle not held,
        if close() began. May be interrupted anywhere, holding the flock or not: the caller's
        ``finally`` releases it, and only a held handle may write."""
        for _ in range(SPIN_TRIES):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
        else:
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.held = True
        if self.closing:
            # close() may have looked at this handle before it was held: write nothing.
            handle.held = False
            raise _closed()

    def begin_close(self) -> None:
        """Make every hold that starts from now on give the lock up at once, and wait until
        the holds under way in this process's other threads end, however long they take (see
        the module docstring). RuntimeError if this thread is itself in a hold."""
        self.closing = True
        own = getattr(self._local, "handle", None)
        if own is not None and own.busy:
            raise RuntimeError(
                "an asgi_ipc store was closed by the thread that holds its lock (a signal "
                "handler or a callback closing the layer in the middle of an operation)"
            )
        while any(handle.held for handle in list(self._handles)):
            time.sleep(0.001)

    def close(self) -> None:
        """Let go of every thread's handle (the segment is being closed): each handle's
        descriptor is pointed at /dev/null, which drops its open file description and so its
        flock, but keeps the number taken until the handle itself is closed (by its thread, or
        when its thread ends). Closing the descriptor under another thread would let its number
        be reused by the next file opened, and that thread's ``flock`` (which the C library
        retries with the same number after EINTR) or its release would then lock or unlock
        that file instead: another store's, for ever."""
        handles, self._handles = list(self._handles), weakref.WeakSet()
        _point_at_null([handle.fileno() for handle in handles if not handle.closed])
        self._local = threading.local()
        self._fd = -1

    def reset_after_fork(self, fd: int) -> None:
        # The inherited handles share their open file descriptions with the parent's: close
        # them (the child has one thread, so no other uses them), so that the child's holds
        # exclude the parent's. A parent's thread that was in a hold at the fork does not exist
        # here: its handle's marks mean nothing to the child, and close() must not wait on them.
        for handle in list(self._handles):
            handle.close()
        self._handles = weakref.WeakSet()
        self._local = threading.local()
        self.closing = False
        self._fd = fd


# struct flock of Linux on 64-bit machines: l_type, l_whence, l_start, l_len, l_pid (0 for OFD
# locks), padded to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")
assert _FLOCK.size == 32


def _point_at_null(fds: list[int]) -> None:
    """Point each of ``fds`` at /dev/null: their open file descriptions (and the locks on them)
    go once nothing else holds them, and the numbers stay taken, so that no call under way on
    one of them, nor its retry, ever acts on a file opened after."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)


def byte_lock(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One OFD lock request (``F_OFD_SETLK``, ``F_OFD_SETLKW`` or ``F_OFD_GETLK``) on the byte
    at ``offset`` of the file of ``fd``: the lock type the kernel answers. ``F_OFD_SETLK`` raises
    BlockingIOError (or PermissionError) when another description holds a conflicting lock."""
    answer = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
    return int(_FLOCK.unpack(answer)[0])


def byte_lock_holders(fd: int, offset: int) -> int:
    """How many open file descriptions hold a lock on the byte at ``offset`` of the file of
    ``fd``, as /proc/locks lists them (it lists OFD locks to every PID namespace, with pid
    -1). A figure to show: ``F_OFD_GETLK`` is what tells whether there is any."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    at = str(offset)
    with open("/proc/locks") as locks:
        # "7: OFDLCK ADVISORY READ -1 00:1b:1044 0 0"; a request still waiting has "->" after
        # the number, and holds nothing.
        return sum(
            fields[1] == "OFDLCK" and fields[5] == inode and fields[6] == fields[7] == at
            for fields in map(str.split, locks)
        )


# Held across fork(), and by ``no_fork``.
_fork_guard = threading.Lock()
_own: weakref.WeakSet[OwnDescription] = weakref.WeakSet()
# This process's pid, kept up to date by the hook below: ``os.getpid`` is a system call, and
# every lock hold and many receives ask whether they run in a forked child.
_pid = os.getpid()


def process_id() -> int:
    """``os.getpid()``, without the system call."""
    return _pid


@contextlib.contextmanager
def no_fork() -> Iterator[None]:
    """Keep other threads from forking for the span of the block: around the opening of a
    descriptor that a forked child must close, and its registration with the hook that closes
    it. A child made in between would keep a descriptor its hook does not know of."""
    with _fork_guard:
        yield


class OwnDescription:
    """An open file description of the store that this process alone holds byte locks on (see
    the module docstring): opened again through /proc/self/fd from ``store_fd``, close-on-exec,
    and closed in a forked child before the child runs anything else."""

    def __init__(self, store_fd: int) -> None:
        self.fd = -1
        with no_fork():
            self.fd = os.open(f"/proc/self/fd/{store_fd}", os.O_RDWR | os.O_CLOEXEC)
            _own.add(self)

    def close(self) -> None:
        """Close it, dropping its locks; closing it again does nothing."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def let_go(self) -> None:
        """Drop this description while another thread may be in a lock request on it: the
        descriptor is pointed at /dev/null (see ``StoreLock.close``), and the request under way
        keeps the description, and any lock it is granted, only until it returns. ``close``
        still closes the number."""
        if self.fd >= 0:
            _point_at_null([self.fd])

    def __del__(self) -> None:
        self.close()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    _fork_guard.release()
    # The parent's locks: shared with the parent, they would outlive it in this process.
    for own in list(_own):
        own.close()


# Registered when this module is imported, so before segment.py's hook, which runs after this
# one in the child and takes the child's own marks.
os.register_at_fork(
    before=_fork_guard.acquire,
    after_in_parent=_fork_guard.release,
    after_in_child=_after_fork_in_child,
)
