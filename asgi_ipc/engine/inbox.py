"""Applying a batch of a host's inbox to its store, with the inbox position, in one lock hold.

The multi-host layer (asgi_ipc/multihost/) carries what other hosts send to this one through
a Redis stream per host, its *inbox*; the relay of the host reads it and hands each batch to
``apply_batch`` (``Engine.apply_relayed``). An entry is one of: a message for a channel
(``SEND``), a group_send to the local members of a group (``GROUP``), a group_add or
group_discard of a local channel (``ADD``, ``DISCARD``), or a flush (``FLUSH``).

**Exactly once.** The store keeps the position of its inbox: the inbox's epoch and the id of
the last entry applied (``H_RELAY_*`` in layout.py). Entries whose id is not after it are
skipped (counted in ``relay_fenced``), and a batch read from past the position is refused whole
(``behind``: the relay reads the position without the lock, so only as a hint). The position
moves through the journal in the same hold as the entries it covers, and the journal commits
within a hold only at ``checkpoint``/``step`` calls, so whatever commits (at the hold's end, or
at such a step) carries a position that matches what it applied:

* a send, a group_add or a group_discard is applied *first*, then the position moves past it:
  a step inside its application (the allocator's, after expired messages were freed) commits
  the entries before it and their position, never a part of it without the position;
* a group_send moves the position *first*, then queues its copies: a group_send to many
  members may commit between runs of members, and a relay killed right after such a commit
  leaves some members served and the entry counted as applied. So a member may miss that one
  message, as a full member is skipped; none ever gets it twice;
* a flush commits what came before it, then runs as ``Engine.flush`` does (its commit is
  ``H_FLUSHING``), and the position moves past it in the journal after that: a relay killed
  in between applies that flush a second time, which empties the store again.

A relay killed anywhere else loses its hold's journal to the next holder's rollback, and the
entries are read again from the inbox and applied then. Two relays racing (a standby that took
over from one that only looked dead) are serialised by the lock, and the later one finds the
entries behind the position. An inbox whose epoch changed (Redis restarted empty, or failed
over to a replica that missed writes: see multihost/redis_side.py) starts at the position that
epoch gives, in the same hold.
"""

from __future__ import annotations

import fcntl
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..exceptions import GroupMemoryFull
from .layout import (
    H_CHANNEL_FULL,
    H_EPOCH,
    H_FLUSHING,
    H_GROUP_SENDS,
    H_HOST_ID,
    H_NO_MEMORY,
    H_RELAY_DEPTH,
    H_RELAY_EPOCH,
    H_RELAY_FENCED,
    H_RELAY_LAG,
    H_RELAY_MS,
    H_RELAY_PID,
    H_RELAY_SEEN,
    H_RELAY_SEQ,
    H_RELAYED,
    H_SENT,
    OWNED_MARK,
    RELAY_BYTE,
)
from .lock import byte_lock
from .queues import OUT_OF_MEMORY, OVER_CAPACITY, QUEUED

if TYPE_CHECKING:
    from .store import Engine

SEND = b"s"
GROUP = b"g"
ADD = b"a"
DISCARD = b"r"
FLUSH = b"f"
OPS = (SEND, GROUP, ADD, DISCARD, FLUSH)

_SEND_OUTCOME = {QUEUED: H_SENT, OVER_CAPACITY: H_CHANNEL_FULL, OUT_OF_MEMORY: H_NO_MEMORY}


class Entry(NamedTuple):
    """One inbox entry: its stream id (``ms``-``seq``), what it does (one of ``OPS``), the group
    (GROUP, ADD, DISCARD) and channel (SEND, ADD, DISCARD) it names, and the message."""

    ms: int
    seq: int
    op: bytes
    group: bytes = b""
    channel: bytes = b""
    data: bytes = b""


class Applied(NamedTuple):
    """What a batch did: entries applied, entries skipped as applied already, entries refused
    (a message whose channel was full or memory short, a membership group memory had no room
    for), group copies skipped (members full), the position afterwards, and whether the batch
    was refused whole because it was read from past the position (``behind``)."""

    applied: int
    fenced: int
    refused: int
    skipped: int
    position: tuple[int, int, int]
    behind: bool = False


def position(words: memoryview) -> tuple[int, int, int]:
    """(epoch, ms, seq) of the inbox as the store has it: read without the lock it is a hint,
    good for where to read from (the hold that applies checks again)."""
    return words[H_RELAY_EPOCH], words[H_RELAY_MS], words[H_RELAY_SEQ]


# Redis counts as reachable when the relay heard from it this recently (it reads at least
# once a second).
REACHABLE_WITHIN_MS = 5000


def relay_state(words: memoryview, fd: int, now: int) -> dict | None:
    """What `asgi-ipc stats`, top and the metrics show of the relay of a multi-host store
    (None for a store no multi-host layer has used): read without the lock, hints all. ``fd``
    holds no byte lock (``Segment.fd``), so the probe of the relay byte sees every holder."""
    if not words[H_HOST_ID]:
        return None
    seen = words[H_RELAY_SEEN]
    leading = byte_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, RELAY_BYTE) != fcntl.F_UNLCK
    return {
        "host": f"{words[H_HOST_ID]:016x}",
        "leading": leading,
        "pid": words[H_RELAY_PID] if leading else None,
        "redis_reachable": leading and bool(seen) and now - seen <= REACHABLE_WITHIN_MS,
        "lag_ms": words[H_RELAY_LAG],
        "inbox_depth": words[H_RELAY_DEPTH],
        "position": f"{words[H_RELAY_MS]}-{words[H_RELAY_SEQ]}",
    }


def apply_batch(
    engine: Engine,
    now: int,
    epoch: int,
    start: tuple[int, int],
    read_from: tuple[int, int],
    entries: Sequence[Entry],
    capacity_of: Callable[[bytes], int],
    expiry_ms: int,
    group_expiry_ms: int,
) -> Applied:
    """Under the lock: apply ``entries``, every entry of the inbox of ``epoch`` (which starts
    after ``start``) after ``read_from`` up to the last of them, in id order; see the module
    docstring. Expiries count from now: the time an entry waited in the inbox is not counted
    (hosts' clocks need not agree)."""
    w, j = engine.words, engine.journal
    queues, groups = engine.queues, engine.groups
    if w[H_RELAY_EPOCH] != epoch:
        j.set(H_RELAY_EPOCH, epoch)
        j.set(H_RELAY_MS, start[0])
        j.set(H_RELAY_SEQ, start[1])
    at = (w[H_RELAY_MS], w[H_RELAY_SEQ])
    if entries and at < read_from:
        # Read from past what the store applied (its position was read, without the lock, as
        # another relay moved it, or torn between its two words, or under another epoch):
        # applying the batch would skip the entries in between, and fence them for good.
        # Nothing is applied; the relay reads again from the position.
        return Applied(0, 0, 0, 0, (epoch, *at), behind=True)
    applied = fenced = refused = skipped = 0
    expires = now + expiry_ms

    def move(ms: int, seq: int) -> None:
        j.set(H_RELAY_MS, ms)
        j.set(H_RELAY_SEQ, seq)

    for entry in entries:
        ms, seq, op = entry.ms, entry.seq, entry.op
        if (ms, seq) <= at:
            fenced += 1
            continue
        j.checkpoint()
        if op == SEND:
            result = queues.append(
                entry.channel, entry.data, zlib.crc32(entry.data),
                capacity_of(entry.channel), expires, now, engine._rings,
            )
            j.add(_SEND_OUTCOME[result])
            refused += result != QUEUED
            move(ms, seq)
        elif op == GROUP:
            move(ms, seq)
            j.add(H_GROUP_SENDS)
            members = groups.members(entry.group, now - group_expiry_ms)
            skipped += queues.append_to_all(
                members, entry.data, zlib.crc32(entry.data), capacity_of, expires, now,
                engine._rings,
            )
        elif op == ADD:
            # Group memory full: the membership is refused as a group_add would be, and the
            # relay goes on (a relay that stopped at it would never get past it).
            savepoint, commits = j.count, j.commits
            try:
                owned = OWNED_MARK in entry.channel
                channel_list = queues.members_at(entry.channel) if owned else 0
                groups.add(entry.group, entry.channel, now, channel_list)
            except GroupMemoryFull:
                if j.commits == commits:
                    j.rollback(savepoint)
                refused += 1
            move(ms, seq)
        elif op == DISCARD:
            groups.discard(entry.group, entry.channel)
            move(ms, seq)
        elif op == FLUSH:
            j.commit()  # what came before, with its position
            w[H_FLUSHING] = w[H_EPOCH] + 1
            engine._finish_flush()
            move(ms, seq)
        else:  # written by a later version: skipped, but passed
            move(ms, seq)
        j.add(H_RELAYED)
        at = (ms, seq)
        applied += 1
    if fenced:
        j.add(H_RELAY_FENCED, fenced)
    return Applied(applied, fenced, refused, skipped, (epoch, *at))
