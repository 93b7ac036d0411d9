"""The layout of a prefix's shared-memory segment: where each area starts and what each header
word means.

One POSIX shared-memory object, ``/asgi_ipc.<prefix>``, holds everything. It is addressed in
64-bit words (a pointer is a word index; 0 is null, since word 0 is the magic word), and its areas
start on page boundaries so that each can be returned to the kernel on ``flush``::

    header          page 0: magic, layout version, geometry, the live words and counters below
    message heap    allocator metadata of the channel memory          (1 page)
    group heap      allocator metadata of the group memory            (1 page)
    process slots   one slot per process that waits or owns channels  (SLOTS x 7 words)
    journal         the undo journal of the operation in progress     (JOURNAL_ENTRIES x 2 words)
    channel index   hash buckets: channel name -> channel record      (the capacity lookups)
    channel memory  channel records, waiter records, queued messages  (channel_memory bytes)
    group index     hash buckets: group name -> group record
    member index    hash buckets: (group, channel) -> membership record
    group memory    group records and memberships                     (group_memory bytes)

The object is created with ``ftruncate`` and so is sparse, but no page is touched before it is
reserved with ``posix_fallocate``: on a full tmpfs, touching an unreserved page raises SIGBUS,
while a reservation fails with ENOSPC. Every area but the heaps is reserved whole at creation,
and of each heap its first and last pages; the rest of a heap is reserved as it fills (heap.py).

The first byte of each process slot is also that slot's lock byte: a slot is live while a process
holds an open-file-description lock on it (see ``slots.py``). ``SLOTS`` is therefore fixed by
the layout: it bounds the processes that can wait in receive(), or own channels made with
new_channel(), on one prefix at the same time.
Byte ``ATTACHED_BYTE`` (in the magic word, never a slot's) carries a shared lock of every process
attached to the store (see ``segment.py``). These byte locks are independent of the store lock
(a ``flock``, see ``lock.py``), and they sit at the same offsets in every store of a layout
version, so that they can be probed without reading the header.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from ..host import SHM_DIR

MAGIC = int.from_bytes(b"ASGI-IPC", "little")
LAYOUT_VERSION = 6  # 2: slots live by their byte lock, doorbells at paths; counters;
#                      3: a group_send stores its payload once (queues.py);
#                      4: the wake-up directory named by the store's key, the attached byte,
#                         the expiry-order hints (processes of 3 and 4 would miss each
#                         other's rings and in-use marks); process-specific channels record
#                         their owner and memberships;
#                      5: the owner part counts the messages lent to the channel's owner
#                         (queues.py), which a process of 4 would not count against capacity
#                      6: a group_send lends to the owners of its members in parcels, listed
#                         by each process slot (two more words a slot) and, once their owner
#                         is gone, in the header (queues.py); a process of 5 would neither
#                         drain nor free them

WORD = 8
# The byte that makes a channel name process-specific ("!"), as an int: ``OWNED_MARK in name``
# looks for one byte, where ``b"!" in name`` first tries its argument as an integer, raising and
# clearing a TypeError inside CPython (146 ns against 15 ns; a group_send asks it of every
# member).
OWNED_MARK = ord("!")
PAGE_WORDS = 512
SLOTS = 1024
SLOT_WORDS = 7
SLOT_TABLE = 3 * PAGE_WORDS  # the word where the process slots start
ATTACHED_BYTE = 0
JOURNAL_ENTRIES = 1 << 16

# Header words. Words 0 to H_GEOMETRY_END describe the geometry and never change after creation.
H_MAGIC = 0
H_VERSION = 1
H_TOTAL_BYTES = 2
H_CHANNEL_MEMORY = 3
H_GROUP_MEMORY = 4
H_HASH_KEY = 5  # two words: the key of the keyed hash used by every index
H_CHANNEL_BUCKETS = 7
H_GROUP_BUCKETS = 8
H_MEMBER_BUCKETS = 9
H_GEOMETRY_SUM = 10
H_GEOMETRY_END = 10
# Live words.
H_READY = 16  # 1 once the creator (or whoever found it unset) has initialised the areas
H_JOURNAL_COUNT = 17  # entries of the undo journal in force; 0 when no operation is under way
H_LOCK_PID = 18  # pid of the lock holder, for `asgi-ipc stats` only
H_FLUSHING = 19  # epoch a flush in progress moves to; 0 when none is under way
H_EPOCH = 20  # bumped by every flush, so waiting processes know to register again
H_EXPIRY_HEAD = 21  # oldest queued message, in the order of sending
H_EXPIRY_TAIL = 22
H_CHANNELS = 23  # channel records
H_GROUPS = 24
H_MEMBERSHIPS = 25
H_SWEEP_CHANNEL = 26  # clock hand of the incremental sweep over the channel index
H_SWEEP_GROUP = 27  # clock hand of the incremental sweep over the group index
# The reserved high-water marks of the two heaps (see heap.py): word index below which the heap's
# memory is reserved with posix_fallocate. Never journaled: they state a physical fact.
H_MESSAGE_RESERVED = 28
H_GROUP_RESERVED = 29
# Counters of the work of every process on the store, read by observe.py. Each changes through the
# journal (``Journal.add``) in the lock hold, and before the commit, of the change it counts, so
# an operation rolled back (by an exception or by the next holder after a kill) is never counted
# and one committed always is. They survive a flush (which counts in H_EPOCH) and wrap at 2**64.
H_SENT = 30  # messages queued by send()
H_RECEIVED = 31  # messages handed to receive() (taken out of their channel)
H_RETURNED = 32  # messages put back first in their channel by a cancelled receive
H_GROUP_SENDS = 33  # group_send() calls
H_DELIVERED = 34  # copies queued on members by group_send()
H_EXPIRED = 35  # messages dropped unread because they had expired
H_CHANNEL_FULL = 36  # sends refused because the channel was at capacity (ChannelFull)
H_GROUP_FULL = 37  # group_send() members skipped because their channel was at capacity
H_NO_MEMORY = 38  # sends refused, and group_send() members skipped, for want of channel memory
# Hints of the channel sweep (queues.py), never journaled: the latest expiry of a message linked
# since the last flush, and the time until which an expired message may be queued behind one
# that has not expired.
H_LATEST_EXPIRY = 39
H_DISORDER_UNTIL = 40
# Counters of the reaping of dead processes' channels (queues.py), as the ones above.
H_REAPED_CHANNELS = 41  # process-specific channels whose owner was gone, reaped
H_REAPED_MEMBERSHIPS = 42  # their memberships removed
H_REAPED_MESSAGES = 43  # messages dropped unread from them
# The first channel record of the list of channels whose owner is gone and that are still to
# be reaped (queues.py); changed through the journal.
H_REAP_HEAD = 44
# The words of a multi-host layer (asgi_ipc/multihost/), which a single-host layer never reads
# nor writes, so that both can share a store without a new layout version; a flush keeps them.
# The host id: random, set once (``Engine.host_id``), never 0 once set; it names this store
# to the other hosts. Changed through the journal.
H_HOST_ID = 45
# The relay's position in this host's inbox (``Engine.apply_relayed``): the epoch of the inbox
# (a random number kept in Redis beside the stream; a Redis that restarted empty or failed over
# gets a new one) and the id, milliseconds and sequence, of the last entry applied. All three
# change through the journal, in the lock hold that applies the entries they cover.
H_RELAY_EPOCH = 46
H_RELAY_MS = 47
H_RELAY_SEQ = 48
# Counters of the relay, as the ones above.
H_RELAYED = 49  # inbox entries applied to this store
H_RELAY_FENCED = 50  # entries skipped because the position says they were applied already
# Hints for `asgi-ipc stats`, written without the journal or the lock by the relay: its pid,
# when it last heard from Redis (ms since the epoch, 0 when Redis does not answer), the lag of
# the last entry it applied (ms between its id and its application) and the inbox's depth.
H_RELAY_PID = 51
H_RELAY_SEEN = 52
H_RELAY_LAG = 53
H_RELAY_DEPTH = 54
# Counters of what this host's processes sent to other hosts through Redis, as the ones above
# (each added in a lock hold of its own, after the Redis command it counts returned).
H_REMOTE_SENT = 55  # entries added to other hosts' inboxes: sends, group_adds, group_discards
H_REMOTE_GROUP_COPIES = 56  # group_send copies added to other hosts' inboxes (one per host)
H_REMOTE_FULL = 57  # sends refused with ChannelFull because the other host's inbox was full
# The byte whose open-file-description lock elects the relay of the host: in the version word,
# which no slot's byte is (see slots.py).
RELAY_BYTE = H_VERSION * WORD
# The first of the parcels whose owner is gone, still to be freed by reaping (queues.py);
# changed through the journal.
H_PARCELS_TO_FREE = 58
H_PARCELS = 59  # parcels made by group_send() (queues.py): one per owning process a call
COUNTERS = {
    "sent": H_SENT,
    "received": H_RECEIVED,
    "returned": H_RETURNED,
    "group_sends": H_GROUP_SENDS,
    "delivered": H_DELIVERED,
    "expired": H_EXPIRED,
    "channel_full": H_CHANNEL_FULL,
    "group_full": H_GROUP_FULL,
    "no_memory": H_NO_MEMORY,
    "reaped_channels": H_REAPED_CHANNELS,
    "reaped_memberships": H_REAPED_MEMBERSHIPS,
    "reaped_messages": H_REAPED_MESSAGES,
    "relayed": H_RELAYED,
    "relay_fenced": H_RELAY_FENCED,
    "remote_sent": H_REMOTE_SENT,
    "remote_group_copies": H_REMOTE_GROUP_COPIES,
    "remote_full": H_REMOTE_FULL,
    "parcels": H_PARCELS,
}

# \Z, not $: "$" would also let a trailing newline through into the object's name.
PREFIX_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,19}\Z")
PREFIX_RULE = "1 to 20 ASCII letters, digits, '-', '_' or '.', not starting with '-' or '.'"
# macOS limits shared-memory names to 31 bytes: "/asgi_ipc." is 10 of them, the prefix at most 20.
NAME_PREFIX = "/asgi_ipc."


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it may name a store, else raise ValueError saying why not."""
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise ValueError(f"invalid asgi_ipc prefix {prefix!r}: use {PREFIX_RULE}")
    return prefix


def shm_name(prefix: str) -> str:
    return NAME_PREFIX + validate_prefix(prefix)


# The directory of a store's wake-up sockets is named after the store and a tag keyed by the
# store's hash key, which only its owner can read: nobody else can learn the name before the
# directory exists, so nobody can take it first; and once it exists it stays until the store is
# unlinked (see doorbell.py), so nobody can take it later either. "+" cannot occur in a prefix,
# so no store's name can ever be a wake-up directory's, nor the reverse.
WAKE_DIR_RE = re.compile(re.escape(NAME_PREFIX[1:]) + r"([^+]+)\+wake\.[0-9a-f]{16}\Z")


def store_path(prefix: str) -> str:
    return SHM_DIR + shm_name(prefix)


def wake_dir(prefix: str, hash_key: bytes) -> str:
    """The wake-up directory of the store of ``prefix`` whose hash key is ``hash_key``."""
    tag = hashlib.blake2b(b"wake-up directory", key=hash_key, digest_size=8).hexdigest()
    return f"{store_path(prefix)}+wake.{tag}"


def wake_dir_prefix(entry: str) -> str | None:
    """The prefix whose wake-up directory an entry of SHM_DIR is named as, or None."""
    match = WAKE_DIR_RE.match(entry)
    return match.group(1) if match else None


def wake_dirs(prefix: str) -> list[str]:
    """The paths in SHM_DIR named as wake-up directories of ``prefix``, whoever made them: the
    store's own, and any left by an earlier store of the prefix or planted by someone else."""
    return [
        f"{SHM_DIR}/{entry}" for entry in sorted(os.listdir(SHM_DIR))
        if wake_dir_prefix(entry) == prefix
    ]


def _pages(words: int) -> int:
    return -(-words // PAGE_WORDS) * PAGE_WORDS


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


@dataclass(frozen=True)
class Geometry:
    """Word offsets of every area, derived from the two memory sizes alone."""

    channel_memory: int
    group_memory: int
    channel_buckets: int
    group_buckets: int
    member_buckets: int

    @classmethod
    def for_sizes(cls, channel_memory: int, group_memory: int) -> Geometry:
        return cls(
            channel_memory=channel_memory,
            group_memory=group_memory,
            # About one bucket per 512 bytes of messages (a 100-byte message takes ~160) and one
            # per 256 bytes of memberships keeps chains short without costing much memory.
            channel_buckets=_pow2_at_least(channel_memory // 512),
            group_buckets=_pow2_at_least(group_memory // 1024),
            member_buckets=_pow2_at_least(group_memory // 256),
        )

    @property
    def message_heap_meta(self) -> int:
        return PAGE_WORDS

    @property
    def group_heap_meta(self) -> int:
        return 2 * PAGE_WORDS

    @property
    def slots(self) -> int:
        return SLOT_TABLE

    @property
    def journal(self) -> int:
        return self.slots + _pages(SLOTS * SLOT_WORDS)

    @property
    def channel_index(self) -> int:
        return self.journal + _pages(2 * JOURNAL_ENTRIES)

    @property
    def message_heap(self) -> int:
        return self.channel_index + _pages(self.channel_buckets)

    @property
    def message_heap_end(self) -> int:
        return self.message_heap + _pages(self.channel_memory // WORD)

    @property
    def group_index(self) -> int:
        return self.message_heap_end

    @property
    def member_index(self) -> int:
        return self.group_index + _pages(self.group_buckets)

    @property
    def group_heap(self) -> int:
        return self.member_index + _pages(self.member_buckets)

    @property
    def group_heap_end(self) -> int:
        return self.group_heap + _pages(self.group_memory // WORD)

    @property
    def total_bytes(self) -> int:
        return self.group_heap_end * WORD

    def reserved_at_creation(self) -> list[tuple[int, int]]:
        """The word ranges reserved when the store is created, whatever its load: the header,
        allocator metadata, process slots, journal and indexes, and the first and last pages
        of each heap (which ``Heap.format`` writes)."""
        return [
            (0, self.message_heap + PAGE_WORDS),
            (self.message_heap_end - PAGE_WORDS, self.group_heap + PAGE_WORDS),
            (self.group_heap_end - PAGE_WORDS, self.group_heap_end),
        ]

    @property
    def bytes_reserved_at_creation(self) -> int:
        return WORD * sum(end - start for start, end in self.reserved_at_creation())
