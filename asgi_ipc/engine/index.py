"""The chained hash index: the one structure that maps a name to its record in a heap.

Three indexes use it: channels (queues.py), groups and memberships (groups.py). Each is an
array of ``buckets`` bucket heads (a power of two) in the segment; each bucket chains, newest
first, the records whose keyed hash falls there. Every record of every index starts the same
way, in words from the block header (word 0):

  1 next in bucket, 2 hash, 3 ... fields of the record's own, ``length_field`` name length,
  ``length_field + 1``... name

so one find, insert and unchain serve them all; what differs is only ``length_field`` (and, for
memberships, an owner field that a find may also match). A record may have words of its own
after the name too (``insert``'s ``extra``): those of process-specific channels and of their
memberships do (queues.py, groups.py). A record enters its bucket with one
journaled word (the bucket head) and leaves it with one (the link that pointed to it), so an
index changes all-or-nothing with the operation around it (journal.py).

A chain longer than ``MAX_CHAIN`` can only be a cycle in a damaged store: every walk stops there
with ``StoreCorrupted`` rather than loop for ever.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator

from ..exceptions import StoreCorrupted
from .heap import Heap
from .journal import Journal
from .layout import WORD

NEXT, HASH = 1, 2

MAX_CHAIN = 1 << 20  # a longer bucket chain can only be a cycle in a corrupt store
# Compiled, index.pxd makes the constants above C variables, which are not attributes of the
# module: they are made attributes as well, for the modules that import them.
globals().update(NEXT=NEXT, HASH=HASH, MAX_CHAIN=MAX_CHAIN)


class KeyedHash:
    """The hash that names are bucketed by: blake2b keyed with the store's secret key, so that
    names chosen by an attacker cannot pile into one bucket, and remembered for up to
    ``cache_size`` names, since the same channels come back again and again. The compiled
    engine calls ``of``, a C call: through a Python function, the hash was a fifth of what a
    group_send costs a member (0.48 us a member, against 0.38 now)."""

    def __init__(self, key: bytes, cache_size: int) -> None:
        self._key = key
        self._cache: dict[bytes, int] = {}
        self._cache_size = cache_size

    def of(self, name: bytes) -> int:
        h = self._cache.get(name)
        if h is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            h = self._cache[name] = int.from_bytes(
                hashlib.blake2b(name, key=self._key, digest_size=8).digest(), "little"
            )
        return h


def words_for(nbytes: int) -> int:
    return -(-nbytes // WORD)


class ChainedIndex:
    def __init__(
        self,
        words: memoryview,
        data: mmap.mmap,
        journal: Journal,
        heap: Heap,
        base: int,
        buckets: int,
        length_field: int,
        what: str,
    ) -> None:
        self._w = words
        self._b = data
        self._j = journal
        self._heap = heap
        self.base = base
        self.mask = buckets - 1
        self._length = length_field
        self._what = what  # for error messages: "channel", "group", "membership"

    def detach(self) -> None:
        """Let go of the store's words, so that the segment can unmap them: compiled, this
        object holds a buffer export of the view, which would keep the mapping open."""
        self._w = None  # type: ignore[assignment]

    def loops(self) -> StoreCorrupted:
        return StoreCorrupted(f"a {self._what} index chain loops")

    def bucket(self, h: int) -> int:
        """The word that heads the chain of hash ``h``."""
        return self.base + (h & self.mask)

    def find(self, name: bytes, h: int) -> int:
        """The record of ``name`` (whose hash is ``h``), or 0."""
        w, b, length = self._w, self._b, self._length
        rec, steps = w[self.base + (h & self.mask)], 0
        n = len(name)
        while rec:
            if w[rec + HASH] == h and w[rec + length] == n:
                start = (rec + length + 1) * WORD
                if b[start : start + n] == name:
                    return rec
            rec, steps = w[rec + NEXT], steps + 1
            if steps > MAX_CHAIN:
                raise self.loops()
        return 0

    def find_owned(self, name: bytes, h: int, owner_field: int, owner: int) -> int:
        """The record of ``name`` whose ``owner_field`` holds ``owner`` (a membership of one
        group), or 0."""
        w, length = self._w, self._length
        rec, steps = w[self.base + (h & self.mask)], 0
        n = len(name)
        while rec:
            if (
                w[rec + HASH] == h
                and w[rec + owner_field] == owner
                and w[rec + length] == n
                and self.name_of(rec) == name
            ):
                return rec
            rec, steps = w[rec + NEXT], steps + 1
            if steps > MAX_CHAIN:
                raise self.loops()
        return 0

    def insert(self, name: bytes, h: int, extra: int = 0) -> int:
        """Allocate a record for ``name``, its own fields and ``extra`` words after the name
        zeroed, and link it first in its bucket (one journaled word); 0 if the heap has no room
        for it."""
        length = self._length
        named = length + words_for(len(name))
        rec = self._heap.alloc(named + extra)
        if not rec:
            return 0
        w = self._w
        bucket = self.base + (h & self.mask)
        for k in range(HASH + 1, length):
            w[rec + k] = 0
        for k in range(named + 1, named + extra + 1):
            w[rec + k] = 0
        w[rec + NEXT] = w[bucket]
        w[rec + HASH] = h
        w[rec + length] = len(name)
        start = (rec + length + 1) * WORD
        self._b[start : start + len(name)] = name
        self._j.set(bucket, rec)
        return rec

    def unchain(self, rec: int) -> None:
        """Unlink ``rec`` from its bucket (one journaled word); the caller frees it."""
        w = self._w
        at, steps = self.base + (w[rec + HASH] & self.mask), 0
        while w[at] != rec:
            if not w[at] or steps > MAX_CHAIN:
                raise StoreCorrupted(f"{self._what} record {rec} is not in its bucket")
            at, steps = w[at] + NEXT, steps + 1
        self._j.set(at, w[rec + NEXT])

    def name_of(self, rec: int) -> bytes:
        start = (rec + self._length + 1) * WORD
        return self._b[start : start + self._w[rec + self._length]]

    def chain(self, bucket: int) -> Iterator[int]:
        """The records of bucket number ``bucket``. The next link is read before a record is
        handed out, so the caller may unchain and free it."""
        w = self._w
        rec, steps = w[self.base + (bucket & self.mask)], 0
        while rec:
            following = w[rec + NEXT]
            yield rec
            rec, steps = following, steps + 1
            if steps > MAX_CHAIN:
                raise self.loops()

    def records(self) -> Iterator[tuple[int, int]]:
        """(bucket, record) of every record, bucket by bucket (for stats and verify, under the
        lock)."""
        for bucket in range(self.mask + 1):
            for rec in self.chain(bucket):
                yield bucket, rec

    def count(self) -> int:
        """How many records the chains hold, each chain walked at most ``MAX_CHAIN`` steps (so
        that verify reports a loop as a wrong count rather than raising)."""
        w, total = self._w, 0
        for bucket in range(self.mask + 1):
            rec, steps = w[self.base + bucket], 0
            while rec and steps <= MAX_CHAIN:
                total, rec, steps = total + 1, w[rec + NEXT], steps + 1
        return total
