"""The undo journal: what makes every operation on the store all-or-nothing, and the only place
that commits one.

An operation changes the store only under the global lock, and only in two ways:

* words that other records may reach (links, counters, allocator metadata, bucket heads) are
  changed through ``Journal.set``: it appends ``(word, old value)`` to the journal area, then
  stores the new count of entries in ``H_JOURNAL_COUNT``, and only then writes the new value;
* bytes inside a block that the operation itself allocated are written directly, since nothing
  reaches them until a journaled word links the block in (the allocator journals the old contents
  of a block's free-list words when it hands the block out, so that an undo can put them back).

**What makes an operation visible.** The commit: one aligned 8-byte store, ``H_JOURNAL_COUNT =
0`` (``commit``). Before it, every word the operation changed is covered by the journal, and a
process killed there leaves a non-zero count; the next holder of the lock finds it and writes
the old values back, newest first, then sets the count to 0 (``rollback``), so the operation
never happened. A rollback cut short by another kill is simply done again: it only ever writes
old values, so it is idempotent. The entry is fully written before the count that covers it, and
the count before the word it protects, so a kill between any two stores leaves a journal that
describes exactly the words already changed. An operation that raises (bad input found late,
memory full, a corrupt record) is rolled back the same way before the exception leaves the
store, so a failed call leaves the store as it was.

Which word is linked last, and so what the commit publishes, for each operation: a send, the
words that link its block into its channel and into the order of sending (queues.py); a receive,
the unlinking of its message; a group_add or group_discard, the membership's links in the member
index, its group's list and, for a process-specific channel, its channel's list (groups.py); a
registration, the head of the channel's waiter list; the freeing or taking of a process slot, the
slot's token, with its list of owned channels moved to the list to reap (queues.py); a step of
reaping, the unlinking of the one membership, message or channel it removes.
``flush`` is redone rather than undone: its commit is the store of ``H_FLUSHING`` (see
``Engine``).

**Who commits.** ``one_hold`` (engine/store.py) commits each operation once, at its end
(``Engine.take`` makes that last commit itself, to count what it made durable). Within an
operation, the journal commits in *steps*, at two named calls only, made by the operation:

* ``checkpoint()``, between two self-contained pieces of housekeeping (dropping an expired
  message or membership, registering one more channel, a step of reaping): commits when the
  journal is nearly full, so that any amount of housekeeping fits;
* ``step()``, before an operation allocates after it freed a block: commits what it did so far,
  because a block freed by an operation must not be handed out again before that free commits
  (an undo would need the block's whole old contents back). The allocator checks this and never
  commits for its caller.

A step boundary is a commit like the last one: a process killed after it keeps everything the
operation did up to the step (expired messages dropped, messages handed to receives, channels
registered, each complete in itself) and loses only what came after; a receive whose message
was committed in a step but never reached its caller is lost, as after any commit (delivery is
at most once). ``commits`` counts this process's commits, so that ``Engine.take`` can tell which
of the messages it handed out are taken for good when its hold fails.
"""

from __future__ import annotations

from collections.abc import Callable

from ..exceptions import StoreCorrupted, StoreError
from .layout import H_JOURNAL_COUNT, JOURNAL_ENTRIES


class JournalFull(StoreError):
    """The operation changed more words than the journal holds; it is rolled back."""


class Journal:
    def __init__(self, words: memoryview, base: int) -> None:
        self._w = words
        self._base = base
        self._count = 0
        # Set when a block is freed; see the module docstring.
        self.freed = False
        # Commits made by this process, so that an operation committed in steps can tell
        # which of its steps are done for good.
        self.commits = 0
        # The fault-injection seam of crash tests (``Engine.inject``): called with the word
        # after each journaled write. A test on the object itself rather than a method
        # replaced on the instance, so that the compiled journal, whose methods cannot be
        # replaced and whose callers reach ``set`` directly, stops at the same writes; unset,
        # it costs each write one comparison.
        self.hook: Callable[[int], None] | None = None
        # The same for each commit, called once it is made.
        self.commit_hook: Callable[[], None] | None = None

    def detach(self) -> None:
        """Let go of the store's words, so that the segment can unmap them: compiled, this
        object holds a buffer export of the view, which would keep the mapping open."""
        self._w = None  # type: ignore[assignment]

    @property
    def count(self) -> int:
        return self._count

    def set(self, index: int, value: int) -> None:
        """Change one word so that a rollback can restore it."""
        w = self._w
        n = self._count
        if n >= JOURNAL_ENTRIES:
            raise JournalFull
        entry = self._base + 2 * n
        w[entry] = index
        w[entry + 1] = w[index]
        self._count = n + 1
        w[H_JOURNAL_COUNT] = n + 1
        w[index] = value
        if self.hook is not None:
            self.hook(index)

    def add(self, index: int, n: int = 1) -> None:
        """Add ``n`` to a counter word (modulo 2**64) so that a rollback takes it back."""
        self.set(index, (self._w[index] + n) & 0xFFFF_FFFF_FFFF_FFFF)

    def keep(self, index: int) -> None:
        """Record a word's value before it is overwritten directly (see the module docstring)."""
        w = self._w
        n = self._count
        if n >= JOURNAL_ENTRIES:
            raise JournalFull
        entry = self._base + 2 * n
        w[entry] = index
        w[entry + 1] = w[index]
        self._count = n + 1
        w[H_JOURNAL_COUNT] = n + 1

    def begin(self) -> None:
        """Start an operation on a journal found empty: forget whatever this process knew of
        an earlier one (cut off by a failure, or inherited across fork())."""
        self._count = 0
        self.freed = False

    def step(self) -> None:
        """Before an allocation: commit if this operation freed a block (see the module
        docstring), so that the allocator may hand its space out again."""
        if self.freed:
            self.commit()

    def checkpoint(self) -> None:
        """Between two self-contained steps of housekeeping (dropping expired messages or
        memberships), commit if the journal is filling up, so that any amount of it fits."""
        if self._count > JOURNAL_ENTRIES - 4096:
            self.commit()

    def commit(self) -> None:
        self._w[H_JOURNAL_COUNT] = 0
        self._count = 0
        self.freed = False
        self.commits += 1
        if self.commit_hook is not None:
            self.commit_hook()

    def rollback(self, savepoint: int = 0) -> None:
        """Undo every change journaled since ``savepoint`` (by default since the last commit,
        ours or a dead holder's)."""
        w = self._w
        n = w[H_JOURNAL_COUNT]
        if n > JOURNAL_ENTRIES or savepoint > n:
            raise StoreCorrupted(f"undo journal claims {n} entries, more than it can hold")
        limit = len(w)
        for k in range(n - 1, savepoint - 1, -1):
            entry = self._base + 2 * k
            index = w[entry]
            if not 0 < index < limit or index == H_JOURNAL_COUNT:
                raise StoreCorrupted(f"undo journal entry {k} points outside the store")
            w[index] = w[entry + 1]
            # Shrink as we go, so a rollback cut short is resumed where it stopped.
            w[H_JOURNAL_COUNT] = k
        self._count = savepoint
        if not savepoint:
            self.freed = False
