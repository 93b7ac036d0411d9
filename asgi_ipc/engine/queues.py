"""The channel store: a hash table of FIFO message lists in the channel memory.

The channel index (a ``ChainedIndex``, index.py) chains the *channel records* by the hash of
their name. A record holds the channel's first and last message and its message count, so
the capacity check and the append happen under one lock hold in O(1), and the list of processes
waiting on it. A message is one block: links, expiry, length and CRC-32, then the msgpack bytes.
A group_send to several channels stores its body once instead, in a *payload block* that counts
its references, and gives each channel a *shared node*: a message block of 64 bytes whose length
word is ``SHARED`` and whose data word holds the payload block's address. A 10 KiB message to
1000 members takes about 10 KiB plus 1000 x 64 B, not 10 MB. A send, a put_back and a group_send
to one channel store the message inline (no second allocation on the hot path).

Expiry. Every queued message is also on one global list in the order of sending, and each channel's
list is that order restricted to the channel (a put_back goes just before its channel's first
message), so the oldest message of the store is always the first of its own channel. Each send
reclaims expired messages from the front of that order, a few at a time, wherever they are queued,
even in channels nobody reads (``expire``), and stops at the first that has not expired. That finds
every expired message while messages expire in the order they are linked in, but not behind a
message that expires later: one sent by a layer of the same prefix with a longer expiry, sent
before the clock stepped back, or put back ahead of others. Two hints in the header, never
journaled, say how long that can be the case: the latest expiry of a message linked since the last
flush (``H_LATEST_EXPIRY``), and ``H_DISORDER_UNTIL``, raised to it whenever a message is linked
with an earlier expiry or put back. (An expired message queued behind one that has not expired was
linked after it with an earlier expiry, or that one was put back ahead of it: either way the hint
is at least that one's expiry, so still to come.) Until then the incremental sweep of the channel
index (``sweep``: a few buckets per send, 1024 when memory runs short) also walks each channel it
passes and reclaims its expired messages wherever they are in its list, a bounded number per call.
A rollback leaves the hints later than they need be, which only makes the sweep walk longer.

Visibility: a send becomes visible when the journal commits the words that link its block in (the
previous tail's ``next``, the record's tail and count); a receive, or the dropping of an expired
message, when the journal commits the unlinking. A group_send writes the payload block unjournaled
with no reference (nothing reaches it yet), cuts the nodes for a run of members from one allocation
and writes them unjournaled too, then links each into its channel with three journaled words, the
run into the order of sending with two, and adds the run's nodes to the payload's count with one;
all of it commits with the group_send, or with a step of it (a run at a time). A payload block
whose run found no room is freed before anything can commit, so a commit never leaves one
unreachable. A parcel (below) is written unjournaled too, allocated with the payload and the
nodes before any count changes; its members' counts and lent counts go up with two journaled
words each, and the journaled link from its owner's slot list (the previous last parcel's
``next``, or the slot's first word, and the slot's last word) makes it visible, with the run.
Draining a parcel becomes visible when the journal commits its unlinking from the slot's list,
which the owner commits at once; a kill before that leaves it pending, a kill after, drained
into the dead process (reaping forgets what was lent to it). A message handed to a receive
that was then cancelled is linked back in first (``put_back``), inline. See ``journal.py`` for
what a kill in between leaves.

Freeing: whatever unlinks a message (a receive, an expiry) frees its block, in a journal step of
its own (``checkpoint`` before each). Unlinking journals the link that led to it (its channel's
head, or in the middle of a channel, which only the sweep unlinks from, its predecessor's next),
the record's tail if it was last, the count, and the links of its neighbours in the order of
sending. A shared node first gives up its reference (``_unref``): the count is journaled one lower,
or the payload block is freed with its last reference, in the same journal step as the unlinking
(a parcel holds one reference, given up when it is drained or freed).
So at every commit, and so after any kill, each payload block's count is the number of nodes linked
to it; and since a freed block is never reused before its free commits (``Journal.step``), a
rollback never finds a payload block handed out again. A flush clears everything at once. A
reference is checked before a count is changed through it: a damaged one raises StoreCorrupted (a
read through it fails its CRC check), and ``verify`` reports it, and any count that differs from
the nodes found, as a problem.

Owners. The record of a process-specific channel (a name with "!") has an *owner part* after its
name: the slot and token of the process that owns it (0 when none does), its links in its owner's
list, and the first of the channel's memberships (groups.py links them, so that reaping finds them
all and a group_discard still unlinks one in O(1)). ``own`` (new_channel) and a registration on
a channel nobody owns (``add_waiter``) record an owner and put the record first on the list of
the owner's slot (``ProcessSlots.owned_at``: first and last record); a record made by
new_channel() is *fresh* until its owner first waits on it. Such a record is kept while it has
messages, waiters or memberships, or is fresh, and only then freed by the sweep: so a consumer's
channel is there for its first group_add, and the record of a channel done with goes like any
other. A record is on its slot's list while the slot holds its owner's token; before that token
changes (the slot freed, or taken by a new process: ``ProcessSlots.vacate``), ``orphan`` moves
the slot's whole list to the front of the list to reap (``H_REAP_HEAD``), in O(1). So the
token tells which of the two lists an owned record is on.

Reaping (``Engine._reap``) works on the first record of the list to reap, a bounded number of
steps per lock hold, each self-contained (a ``checkpoint`` between two): remove a membership
(``GroupStore.remove``), or else drop a message (``reap_message``), or else end it (``disown``):
drop the registrations of processes that are gone, take it off the list, and free it unless a
live process still waits on it. Each state between two steps is sound, so a hold may commit
after any of them; a kill rolls back what the hold did since its last commit, and the next
holder takes the list up from there.

Lending. The process that owns a process-specific channel is the only one that receives from
it, so when one of its receives takes a message and more are queued, it may take the next ones
too, in the same hold (``lend``), and hand them to its next receives without the lock. A lent
message leaves the channel's list but not its count: the record's ``X_LENT`` says how many of
the count are lent, and the owner gives them back (``settle``) at its next lock hold once
they are handed out, so a sender's capacity check still counts every message no receive has
had, and a channel that looked full to a sender was full. Until the owner settles, the check
errs on the full side only. Reaping a channel forgets what was lent (``disown``): those
messages died with their owner, as the queued ones are dropped. A channel's list is empty when
its first message is 0, whatever its count: that is what a send tests before it rings.

Parcels. A group_send lends its message to the owner of each member that has one alive (its
slot carries the record's token) and whose list is empty, rather than queue a node: one
*parcel* a process, a block that holds the next parcel, the payload block, the expiry, the
number of members and their records, linked last on the owner slot's list of parcels
(``ProcessSlots.parcels_at``). Each member's count and ``X_LENT`` go up by one when it is
named, so capacity counts it as any lent message; a member with messages queued takes the node
path, so whatever a channel's list holds is newer than every parcel naming it. The owner
drains its parcels at the start of each lock hold that takes messages, or of its periodic
check, before taking anything else (``drain_parcel``): the message is read once, counted
received for each member (an expired one's members are counted expired and settled there),
the parcel freed, its payload reference dropped; the receiver keeps the message as lent for
each member and settles it as such once handed out. When the slot's token changes, ``orphan``
moves its whole list of parcels, in O(1), to the front of the list of parcels to free
(``H_PARCELS_TO_FREE``), and reaping frees one a step (``free_parcel``), leaving the members
to ``disown``, which forgets what was lent to them and counts it reaped. A flush clears both
lists with the heaps. ``verify`` counts each parcel's reference to its payload and its block
among the words reachable, and checks that each member of a pending parcel is a record its
slot's process owns, lent at least as many messages as pending parcels name it.

Counting (the counters of layout.py): each message taken, put back, dropped as expired or reaped,
each channel reaped, and each group_send copy queued or skipped, is counted here with
``Journal.add`` right after the journaled change it counts and before the next ``checkpoint``, so
the count commits or rolls back with it. The outcome of a send is counted by its caller
(``Engine.send``), each membership reaped by ``Engine._reap``.

Layouts, in words from the block header (word 0):
  channel record   (kept while it has messages or waiters, and until the sweep passes after;
                   one with an owner part also while it has memberships or is fresh)
                   1 next in bucket, 2 hash, 3 head, 4 tail, 5 count, 6 waiters, 7 name length,
                   8... name, then for a name with "!" its owner part, in words from the end of
                   the name: 0 owner slot + 1 | FRESH, 1 owner token, 2 next and 3 previous
                   record on the owner's list (or the list to reap), 4 first membership,
                   5 messages lent to the owner (counted in the count, see ``lend``)
  message          1 next in channel, 2 next sent, 3 previous sent, 4 channel record, 5 expiry
                   (ms since the epoch), 6 length | crc32 << 32, 7... msgpack bytes
  shared node      1-5 as a message, 6 SHARED, 7 payload block
  payload block    1 references (shared nodes linked to it), 2 length | crc32 << 32,
                   3... msgpack bytes
  waiter           1 next, 2 process slot, 3 slot token
  parcel           1 next parcel (on its owner slot's list or the list to free), 2 payload
                   block, 3 expiry, 4 members, 5... their channel records
"""

from __future__ import annotations

import heapq
import mmap
import zlib
from collections.abc import Callable, Container

from ..exceptions import StoreCorrupted
from .heap import USED, Heap
from .index import MAX_CHAIN, ChainedIndex, KeyedHash, words_for
from .journal import Journal
from .layout import (
    H_CHANNELS,
    H_DELIVERED,
    H_DISORDER_UNTIL,
    H_EXPIRED,
    H_EXPIRY_HEAD,
    H_EXPIRY_TAIL,
    H_GROUP_FULL,
    H_LATEST_EXPIRY,
    H_NO_MEMORY,
    H_PARCELS,
    H_PARCELS_TO_FREE,
    H_REAP_HEAD,
    H_REAPED_CHANNELS,
    H_REAPED_MESSAGES,
    H_RECEIVED,
    H_RETURNED,
    H_SWEEP_CHANNEL,
    OWNED_MARK,
    SLOTS,
    WORD,
)
from .slots import ProcessSlots

C_NEXT, C_HASH, C_HEAD, C_TAIL, C_COUNT, C_WAITERS, C_NAME_LENGTH, C_NAME = range(1, 9)
M_NEXT, M_SENT_NEXT, M_SENT_PREV, M_CHANNEL, M_EXPIRES, M_LENGTH, M_DATA = range(1, 8)
P_REFS, P_LENGTH, P_DATA = range(1, 4)
# The length word of a shared node: the length field all ones, which no inline message has (a
# message is at most 1 MiB, see layer.py, and the field holds 32 bits).
SHARED = 0xFFFF_FFFF
# The words after the header of a shared node: the message words up to M_DATA, which holds the
# payload block's address; with the header, 64 bytes.
NODE_WORDS = M_DATA
W_NEXT, W_SLOT, W_TOKEN = range(1, 4)
# A parcel: what a group_send lends to one owning process (see the module docstring).
PC_NEXT, PC_PAYLOAD, PC_EXPIRES, PC_COUNT, PC_MEMBERS = range(1, 6)
# The owner part of the record of a process-specific channel (a name with "!"), in words from
# the end of its name; see the module docstring.
X_OWNER, X_TOKEN, X_NEXT, X_PREV, X_MEMBERS, X_LENT = range(6)
OWNER_WORDS = 6
# In X_OWNER, beside the owner's slot + 1: made by new_channel() and not waited on yet.
FRESH = 1 << 32
SLOT_MASK = 0xFFFF_FFFF

# How send() reports that the message was not queued.
QUEUED, OVER_CAPACITY, OUT_OF_MEMORY = range(3)
# The counter of each outcome of a group_send copy.
_GROUP_OUTCOME = {QUEUED: H_DELIVERED, OVER_CAPACITY: H_GROUP_FULL, OUT_OF_MEMORY: H_NO_MEMORY}

# A group_send cuts the nodes for up to this many channels (64 B each) from one allocation
# (see ``append_to_all``); it journals three words per node, well within the room that
# ``Journal.checkpoint`` leaves.
RUN_CHANNELS = 512
# A group_send lends a parcel to a process that owns at least this many of a run's members;
# to fewer, the nodes cost less (measured: a parcel of 10 members delivered 0.6 as fast as
# their nodes, one of 100 1.3 times as fast).
PARCEL_MEMBERS = 16
# Past this many of a parcel's members waiting, its owner is rung once to look at every
# channel rather than given each name.
RING_NAMES = 64
# Compiled, queues.pxd makes the offsets above C variables, which are not attributes of the
# module: they are made attributes as well, for the tests and tools that read records.
globals().update(
    C_NEXT=C_NEXT, C_HASH=C_HASH, C_HEAD=C_HEAD, C_TAIL=C_TAIL, C_COUNT=C_COUNT,
    C_WAITERS=C_WAITERS, C_NAME_LENGTH=C_NAME_LENGTH, C_NAME=C_NAME, M_NEXT=M_NEXT,
    M_SENT_NEXT=M_SENT_NEXT, M_SENT_PREV=M_SENT_PREV, M_CHANNEL=M_CHANNEL, M_EXPIRES=M_EXPIRES,
    M_LENGTH=M_LENGTH, M_DATA=M_DATA, P_REFS=P_REFS, P_LENGTH=P_LENGTH, P_DATA=P_DATA,
    SHARED=SHARED, NODE_WORDS=NODE_WORDS, W_NEXT=W_NEXT, W_SLOT=W_SLOT, W_TOKEN=W_TOKEN,
    RUN_CHANNELS=RUN_CHANNELS, PC_NEXT=PC_NEXT, PC_PAYLOAD=PC_PAYLOAD, PC_EXPIRES=PC_EXPIRES,
    PC_COUNT=PC_COUNT, PC_MEMBERS=PC_MEMBERS, X_OWNER=X_OWNER, X_TOKEN=X_TOKEN, X_NEXT=X_NEXT,
    X_PREV=X_PREV, X_MEMBERS=X_MEMBERS, X_LENT=X_LENT, OWNER_WORDS=OWNER_WORDS, FRESH=FRESH,
    SLOT_MASK=SLOT_MASK,
)


class ChannelQueues:
    def __init__(
        self,
        words: memoryview,
        data: mmap.mmap,
        journal: Journal,
        heap: Heap,
        slots: ProcessSlots,
        index: int,
        buckets: int,
        hasher: KeyedHash,
    ) -> None:
        self._w = words
        self._b = data
        self._j = journal
        self.heap = heap
        self._slots = slots
        self.index = ChainedIndex(
            words, data, journal, heap, index, buckets, C_NAME_LENGTH, "channel"
        )
        self.find = self.index.find  # (name, hash) -> record or 0; the hot path calls it
        self.name_of = self.index.name_of
        self.hash = hasher

    def detach(self) -> None:
        """Let go of the store's words, so that the segment can unmap them: compiled, this
        object holds a buffer export of the view, which would keep the mapping open."""
        self._w = None  # type: ignore[assignment]
        self.index.detach()

    # --- records ---------------------------------------------------------------------------

    def _create(self, name: bytes, h: int) -> int:
        rec = self.index.insert(name, h, OWNER_WORDS if OWNED_MARK in name else 0)
        if rec:
            self._j.add(H_CHANNELS)
        return rec

    def _delete(self, rec: int) -> None:
        self.index.unchain(rec)
        self._j.add(H_CHANNELS, -1)
        self.heap.free(rec)

    def _delete_if_idle(self, rec: int) -> None:
        w = self._w
        if w[rec + C_COUNT] or w[rec + C_WAITERS]:
            return
        x = self.owner_part(rec)
        if x:
            if w[x + X_MEMBERS] or w[x + X_OWNER] & FRESH:
                return
            if w[x + X_OWNER]:
                self._unlink_owned(rec, x)
        self._delete(rec)

    # --- owners ----------------------------------------------------------------------------

    def owner_part(self, rec: int) -> int:
        """The owner part of the record at ``rec`` if it is a process-specific channel's, else
        0."""
        w = self._w
        n = w[rec + C_NAME_LENGTH]
        start = (rec + C_NAME) * WORD
        if self._b.find(b"!", start, start + n) < 0:
            return 0
        return rec + C_NAME + words_for(n)

    def _part(self, rec: int) -> int:
        """The owner part of a record known to have one (it is on an owner's list)."""
        return rec + C_NAME + words_for(self._w[rec + C_NAME_LENGTH])

    def _list_head(self, x: int) -> int:
        """The word that heads the list the owned record whose owner part is at ``x`` is on:
        its owner's slot's, or, once that owner is gone (the slot's token changed), the list
        of channels to reap."""
        w, slots = self._w, self._slots
        owner = w[x + X_OWNER] & SLOT_MASK
        if not 1 <= owner <= SLOTS:
            raise StoreCorrupted(f"the owner part at {x} names no process slot")
        slot = owner - 1
        if slots.token(slot) == w[x + X_TOKEN]:
            return slots.owned_at(slot)
        return H_REAP_HEAD

    def _unlink_owned(self, rec: int, x: int) -> None:
        """Take the record at ``rec`` off its owner's list (or the list to reap): it has no
        owner any more."""
        w, j = self._w, self._j
        head = self._list_head(x)
        before, after = w[x + X_PREV], w[x + X_NEXT]
        at = self._part(before) + X_NEXT if before else head
        if w[at] != rec:
            raise StoreCorrupted(f"channel record {rec} is not on its owner's list")
        j.set(at, after)
        if after:
            j.set(self._part(after) + X_PREV, before)
        elif head != H_REAP_HEAD:
            j.set(head + 1, before)
        for field in (X_OWNER, X_TOKEN, X_NEXT, X_PREV):
            j.set(x + field, 0)

    def own(self, name: bytes, slot: int, token: int, fresh: bool) -> int:
        """Make the process of ``slot`` and ``token`` the owner of the process-specific channel
        ``name`` unless it has an owner; mark it ``fresh`` (kept, while its owner lives, even
        with nothing in it) if it was made just now by new_channel(). Its record, or 0 if
        channel memory has no room for one."""
        self._j.step()
        h = self.hash.of(name)
        rec = self.find(name, h) or self._create(name, h)
        if rec:
            self._adopt(rec, self._part(rec), slot, token, fresh)
        return rec

    def _adopt(self, rec: int, x: int, slot: int, token: int, fresh: bool) -> None:
        w, j = self._w, self._j
        if w[x + X_OWNER]:
            return
        head = self._slots.owned_at(slot)
        first = w[head]
        j.set(x + X_OWNER, (slot + 1) | (FRESH if fresh else 0))
        j.set(x + X_TOKEN, token)
        j.set(x + X_NEXT, first)
        j.set(self._part(first) + X_PREV if first else head + 1, rec)
        j.set(head, rec)

    def members_at(self, name: bytes) -> int:
        """The word that heads the list of memberships of the process-specific channel
        ``name``, whose record is made (with no owner) if it has none; 0 if channel memory has
        no room for one."""
        self._j.step()
        h = self.hash.of(name)
        rec = self.find(name, h) or self._create(name, h)
        return self._part(rec) + X_MEMBERS if rec else 0

    def orphan(self, slot: int) -> None:
        """Under the lock, before ``slot``'s token changes (its process is gone): move the
        channels it owned, all at once, to the front of the list of channels to reap, and the
        parcels lent to it to the front of the list of parcels to free."""
        w, j = self._w, self._j
        head = self._slots.parcels_at(slot)
        first = w[head]
        if first:
            j.set(w[head + 1] + PC_NEXT, w[H_PARCELS_TO_FREE])
            j.set(H_PARCELS_TO_FREE, first)
            j.set(head, 0)
            j.set(head + 1, 0)
        head = self._slots.owned_at(slot)
        first = w[head]
        if not first:
            return
        last, reap = w[head + 1], w[H_REAP_HEAD]
        j.set(self._part(last) + X_NEXT, reap)
        if reap:
            j.set(self._part(reap) + X_PREV, last)
        j.set(H_REAP_HEAD, first)
        j.set(head, 0)
        j.set(head + 1, 0)

    # --- reaping ---------------------------------------------------------------------------

    def first_member(self, rec: int) -> int:
        """The first membership of the owned record at ``rec``, or 0."""
        return self._w[self._part(rec) + X_MEMBERS]

    def reap_message(self, rec: int) -> bool:
        """Drop the first message of the record at ``rec``, which is being reaped: False if it
        has none."""
        w = self._w
        if not w[rec + C_HEAD]:
            return False
        node = self._unlink(rec)
        if w[node + M_LENGTH] == SHARED:
            self._unref(node)
        self.heap.free(node)
        self._j.add(H_REAPED_MESSAGES)
        return True

    def disown(self, rec: int) -> None:
        """The last step of reaping the record at ``rec``, emptied of its memberships and
        messages: drop the registrations of processes that are gone, take it off the list to
        reap, and free it unless a live process still waits on it."""
        w, x = self._w, self._part(rec)
        if w[rec + C_WAITERS]:
            self._prune_waiters(rec, self._stale)
        if w[x + X_LENT]:  # gone with its owner, unread (in its parcels or lent to it)
            self._j.set(rec + C_COUNT, w[rec + C_COUNT] - w[x + X_LENT])
            self._j.add(H_REAPED_MESSAGES, w[x + X_LENT])
            self._j.set(x + X_LENT, 0)
        self._unlink_owned(rec, x)
        self._j.add(H_REAPED_CHANNELS)
        self._delete_if_idle(rec)

    # --- messages --------------------------------------------------------------------------

    def _unlink(self, rec: int, prev: int = 0) -> int:
        """Unlink from both lists the message that follows ``prev`` in the channel of the
        record at ``rec`` (its first if ``prev`` is 0), and return it."""
        w, j = self._w, self._j
        node = w[prev + M_NEXT] if prev else w[rec + C_HEAD]
        if w[node + M_CHANNEL] != rec:
            # A damaged link must not hand one channel's message to another's receiver.
            raise StoreCorrupted(f"message {node} is linked into a channel not its own")
        following = w[node + M_NEXT]
        j.set(prev + M_NEXT if prev else rec + C_HEAD, following)
        if not following:
            j.set(rec + C_TAIL, prev)
        j.set(rec + C_COUNT, w[rec + C_COUNT] - 1)
        before, after = w[node + M_SENT_PREV], w[node + M_SENT_NEXT]
        j.set(before + M_SENT_NEXT if before else H_EXPIRY_HEAD, after)
        j.set(after + M_SENT_PREV if after else H_EXPIRY_TAIL, before)
        return node

    def _drop_expired(self, rec: int, now: int) -> None:
        w = self._w
        while True:
            head = w[rec + C_HEAD]
            if not head or w[head + M_EXPIRES] > now:
                return
            self._drop(rec)

    def _drop(self, rec: int, prev: int = 0) -> None:
        """Unlink and free the message that follows ``prev`` in the record at ``rec`` (its
        first if ``prev`` is 0), which has expired: one journal step of its own."""
        self._j.checkpoint()
        node = self._unlink(rec, prev)
        if self._w[node + M_LENGTH] == SHARED:
            self._unref(node)
        self.heap.free(node)
        self._j.add(H_EXPIRED)

    def _reclaim(self, rec: int, now: int, limit: int) -> int:
        """Drop up to ``limit`` expired messages of the record at ``rec``, wherever they are in
        its list: the number dropped."""
        w = self._w
        prev, node, dropped = 0, w[rec + C_HEAD], 0
        # A list longer than its count loops (damage): it must not be walked forever.
        left = w[rec + C_COUNT]
        while node and dropped < limit:
            if not left:
                raise StoreCorrupted(f"the message list of channel record {rec} loops")
            left -= 1
            following = w[node + M_NEXT]
            if w[node + M_EXPIRES] <= now:
                self._drop(rec, prev)
                dropped += 1
            else:
                prev = node
            node = following
        return dropped

    def _read(self, node: int) -> bytes:
        """The bytes of the message at ``node``. A shared node's reference is read through
        unchecked: whatever a damaged one points at fails the length or CRC check (or lies
        outside the store: IndexError, which a hold reports as corruption)."""
        w = self._w
        packed, start = w[node + M_LENGTH], node + M_DATA
        if packed == SHARED:
            payload = w[node + M_DATA]
            packed, start = w[payload + P_LENGTH], payload + P_DATA
        length, crc = packed & 0xFFFFFFFF, packed >> 32
        start *= WORD
        data = self._b[start : start + length]
        # A message is never empty, and an empty one would pass (the CRC-32 of nothing is 0):
        # a length word cleared by damage must not hand out nothing.
        if not length or len(data) != length or zlib.crc32(data) != crc:
            raise StoreCorrupted(f"message at word {node} fails its CRC check")
        return data

    def _is_payload(self, block: int) -> bool:
        """Whether ``block`` can be a payload block: a used block of this heap with room for
        the length it states. Checked before its count is changed through a reference, so
        that a damaged reference raises StoreCorrupted rather than change or free another
        block's words."""
        w, heap = self._w, self.heap
        # Nothing is added to ``block`` or ``size`` before they are checked (heap.pxd).
        if not heap.start <= block or block >= heap.end - P_DATA:
            return False
        header = w[block]
        size = header >> 2
        return bool(header & USED) and size < heap.end - block and size >= P_DATA and (
            (size - P_DATA) * WORD >= w[block + P_LENGTH] & 0xFFFFFFFF
        )

    def _unref(self, node: int) -> None:
        """Give up the reference of the shared node ``node``, unlinked from its channel: the
        count goes down by one, journaled, and the last reference frees the payload block, in
        the same journal step as the unlinking. The caller frees the node."""
        w = self._w
        payload = w[node + M_DATA]
        refs = w[payload + P_REFS] if self._is_payload(payload) else 0
        if refs < 1:
            raise StoreCorrupted(f"message {node} references {payload}, not a payload block")
        if refs == 1:
            self.heap.free(payload)
        else:
            self._j.set(payload + P_REFS, refs - 1)

    def _note_expiry(self, expires: int, ahead: bool) -> None:
        """Before a message that expires at ``expires`` is linked, last in the order of sending
        or ``ahead`` of messages queued already (a put_back): keep the sweep's hints (see the
        module docstring)."""
        w = self._w
        latest = w[H_LATEST_EXPIRY]
        if expires > latest:
            w[H_LATEST_EXPIRY] = latest = expires
        if (ahead or expires < latest) and w[H_DISORDER_UNTIL] < latest:
            w[H_DISORDER_UNTIL] = latest

    def append(
        self,
        name: bytes,
        data: bytes,
        crc: int,
        capacity: int,
        expires: int,
        now: int,
        rings: list,
    ) -> int:
        """Queue ``data`` (whose CRC-32 is ``crc``) on ``name`` unless it holds ``capacity``
        messages already.

        Returns QUEUED, OVER_CAPACITY or OUT_OF_MEMORY; appends to ``rings`` the
        (slot, token, channel) of each doorbell to ring once the lock is released.
        """
        w, j = self._w, self._j
        h = self.hash.of(name)
        rec = self.find(name, h)
        if rec:
            self._drop_expired(rec, now)
            if w[rec + C_COUNT] >= capacity:
                return OVER_CAPACITY
        elif capacity < 1:
            return OVER_CAPACITY
        payload_words = M_DATA - 1 + words_for(len(data))
        self._j.step()  # expired messages dropped above stay dropped
        savepoint = self._j.count
        node = self.heap.alloc(payload_words)
        if not node:
            # Short of memory: reclaim expired messages and idle records, a bounded amount,
            # for good. The sweep may free this very record, so look it up again.
            self.expire(now, 256)
            self.sweep(now, 1024, 256)
            self._j.step()
            savepoint = self._j.count
            node = self.heap.alloc(payload_words)
            if not node:
                return OUT_OF_MEMORY
            rec = self.find(name, h)
        if not rec:
            rec = self._create(name, h)
            if not rec:
                # The message took the room the record needed: undo its allocation.
                self._j.rollback(savepoint)
                return OUT_OF_MEMORY
        self._note_expiry(expires, False)
        count = w[rec + C_COUNT]
        last = w[H_EXPIRY_TAIL]
        w[node + M_NEXT] = 0
        w[node + M_SENT_NEXT] = 0
        w[node + M_SENT_PREV] = last
        self._write_message(node, rec, data, crc, expires)
        tail = w[rec + C_TAIL]
        j.set(tail + M_NEXT if tail else rec + C_HEAD, node)
        j.set(rec + C_TAIL, node)
        j.set(rec + C_COUNT, count + 1)
        j.set(last + M_SENT_NEXT if last else H_EXPIRY_HEAD, node)
        j.set(H_EXPIRY_TAIL, node)
        if not tail and w[rec + C_WAITERS]:
            self._collect_doorbells(rec, name, rings)
        return QUEUED

    def append_to_all(
        self,
        names: list[bytes],
        data: bytes,
        crc: int,
        capacity_of: Callable[[bytes], int],
        expires: int,
        now: int,
        rings: list,
    ) -> int:
        """Queue ``data`` on each channel of ``names`` that has room (a group_send): the
        number of channels skipped, full or out of memory. Each channel gets its copy or not on
        its own.

        The body is stored once, in a payload block, and each channel gets a shared node that
        references it; the nodes for up to a run of channels are cut from one allocation and
        linked into the order of sending together. A group_send to one channel queues an
        ordinary message, as a send does."""
        if len(names) < 2:
            return self._append_each(
                [(name, capacity_of(name)) for name in names], data, crc, expires, now, rings
            )
        w, j = self._w, self._j
        skipped = payload = 0
        for first in range(0, len(names), RUN_CHANNELS):
            accepted, full = self._accept_run(names[first : first + RUN_CHANNELS], capacity_of,
                                              now)
            skipped += full
            if not accepted:
                continue
            j.checkpoint()
            j.step()  # before the allocations below
            nodes: list[int] = []
            parcels: list = []
            if all(rec for _name, rec, _capacity in accepted):
                payload = payload or self._store_payload(data, crc)
                if payload:
                    # Every block allocated before any count changes: the members whose
                    # parcel found no room take the node path.
                    accepted, parcels = self._make_parcels(accepted, payload, expires)
                    if accepted:
                        nodes = self.heap.alloc_run(NODE_WORDS, len(accepted))
            if parcels:
                self._link_parcels(parcels, payload, rings)
            if not accepted:
                continue
            if not nodes:
                if payload and not w[payload + P_REFS]:
                    # Referenced by nothing: freed before the sends below reclaim memory, and
                    # commit, so that no commit ever leaves it allocated and unreachable.
                    self.heap.free(payload)
                    payload = 0
                # No room for the run in one piece: one send at a time, which reclaims
                # memory where it can and skips the channels that still find none.
                skipped += self._append_each(
                    [(name, capacity) for name, _rec, capacity in accepted],
                    data, crc, expires, now, rings,
                )
                continue
            self._link_run(accepted, nodes, payload, expires, rings)
        return skipped

    def _accept_run(
        self, names: list[bytes], capacity_of: Callable[[bytes], int], now: int
    ) -> tuple[list[tuple[bytes, int, int]], int]:
        """The capacity checks of a run of a group_send: (the channels of ``names`` that have
        room, as (name, record, capacity), the number that are full). Each channel's expired
        messages are dropped first; a channel with no record gets one (0 when channel memory
        has no room for it, which the caller finds)."""
        w, j = self._w, self._j
        accepted: list[tuple[bytes, int, int]] = []
        full = 0
        for name in names:
            j.checkpoint()
            capacity = capacity_of(name)
            h = self.hash.of(name)
            rec = self.find(name, h)
            if rec:
                self._drop_expired(rec, now)
                if w[rec + C_COUNT] >= capacity:
                    full += 1
                    j.add(H_GROUP_FULL)
                    continue
            elif capacity < 1:
                full += 1
                j.add(H_GROUP_FULL)
                continue
            if not rec:
                j.step()  # expired messages of the channels before stay dropped
                rec = self._create(name, h)
            accepted.append((name, rec, capacity))
        return accepted, full

    def _link_run(
        self,
        accepted: list[tuple[bytes, int, int]],
        nodes: list[int],
        payload: int,
        expires: int,
        rings: list,
    ) -> None:
        """Link the shared nodes ``nodes`` of a run of a group_send, one per channel of
        ``accepted``, each referencing ``payload``: last into its channel, then the whole run
        into the order of sending, and add them to the payload's count."""
        w, j = self._w, self._j
        self._note_expiry(expires, False)
        last = w[H_EXPIRY_TAIL]
        previous, woken = last, []
        for k in range(len(nodes)):
            name, rec, _capacity = accepted[k]
            node = nodes[k]
            # Written without the journal: nothing reaches the node before it is linked.
            w[node + M_NEXT] = 0
            w[node + M_SENT_NEXT] = nodes[k + 1] if k + 1 < len(nodes) else 0
            w[node + M_SENT_PREV] = previous
            w[node + M_CHANNEL] = rec
            w[node + M_EXPIRES] = expires
            w[node + M_LENGTH] = SHARED
            w[node + M_DATA] = payload
            previous = node
            count, tail = w[rec + C_COUNT], w[rec + C_TAIL]
            j.set(tail + M_NEXT if tail else rec + C_HEAD, node)
            j.set(rec + C_TAIL, node)
            j.set(rec + C_COUNT, count + 1)
            if not tail and w[rec + C_WAITERS]:
                woken.append((name, rec))
        j.set(last + M_SENT_NEXT if last else H_EXPIRY_HEAD, nodes[0])
        j.set(H_EXPIRY_TAIL, nodes[-1])
        j.set(payload + P_REFS, w[payload + P_REFS] + len(nodes))
        j.add(H_DELIVERED, len(nodes))
        # Only now that the whole run is linked and counted: pruning stale waiters may
        # commit.
        for name, rec in woken:
            self._collect_doorbells(rec, name, rings)

    def _make_parcels(
        self, accepted: list[tuple[bytes, int, int]], payload: int, expires: int
    ) -> tuple[list[tuple[bytes, int, int]], list]:
        """Split the channels of a run of a group_send, ``accepted``, into those that take the
        node path and the parcels of the others: (the first, [(slot, token, parcel block,
        [(name, record, capacity)])]). A channel goes in a parcel to its owner when it has one that
        lives (its slot still carries its token) and its list is empty, so that every message
        queued on it is newer than its parcels. Each parcel is allocated and written here,
        unjournaled: nothing reaches it before ``_link_parcels``."""
        w, slots = self._w, self._slots
        rest: list[tuple[bytes, int, int]] = []
        by_slot: dict[int, list[tuple[bytes, int, int]]] = {}
        tokens: dict[int, int] = {}  # of the owners met, read once
        for item in accepted:
            name, rec, _capacity = item
            if w[rec + C_HEAD] or OWNED_MARK not in name:
                rest.append(item)
                continue
            x = self._part(rec)
            owner = w[x + X_OWNER] & SLOT_MASK
            token = tokens.get(owner)
            if token is None:
                token = tokens[owner] = slots.token(owner - 1) if owner else 0
            if not owner or token != w[x + X_TOKEN]:
                rest.append(item)
                continue
            members = by_slot.get(owner - 1)
            if members is None:
                members = by_slot[owner - 1] = []
            members.append(item)
        parcels = []
        for slot, members in by_slot.items():
            n = len(members)
            block = self.heap.alloc(PC_MEMBERS - 1 + n) if n >= PARCEL_MEMBERS else 0
            if not block:
                rest.extend(members)
                continue
            w[block + PC_NEXT] = 0
            w[block + PC_PAYLOAD] = payload
            w[block + PC_EXPIRES] = expires
            w[block + PC_COUNT] = n
            for k in range(n):
                w[block + PC_MEMBERS + k] = members[k][1]
            parcels.append((slot, slots.token(slot), block, members))
        return rest, parcels

    def _link_parcels(self, parcels: list, payload: int, rings: list) -> None:
        """Lend the parcels of a run of a group_send (``_make_parcels``) to their owners: each
        member's count and lent count go up by one, each parcel is linked last on its owner's
        slot's list, and the payload counts one reference a parcel. The link from the slot's
        list is what makes a parcel visible, and it commits with the rest of the run. An owner
        registered on a member is rung for it (``Receiver._ring`` rings a process once)."""
        w, j = self._w, self._j
        delivered = 0
        for slot, token, block, members in parcels:
            waiting = []
            for name, rec, _capacity in members:
                x = self._part(rec)
                j.set(rec + C_COUNT, w[rec + C_COUNT] + 1)
                j.set(x + X_LENT, w[x + X_LENT] + 1)
                if w[rec + C_WAITERS]:
                    waiting.append(name)
            if len(waiting) > RING_NAMES:
                rings.append((slot, token, b""))
            else:
                rings.extend([(slot, token, name) for name in waiting])
            delivered += len(members)
            head = self._slots.parcels_at(slot)
            last = w[head + 1]
            j.set(last + PC_NEXT if last else head, block)
            j.set(head + 1, block)
        j.set(payload + P_REFS, w[payload + P_REFS] + len(parcels))
        j.add(H_DELIVERED, delivered)
        j.add(H_PARCELS, len(parcels))

    def drain_parcel(self, slot: int, now: int, out: list) -> None:
        """Under the lock, for the owner of ``slot``: take the first parcel lent to it off the
        slot's list and free it. Its message, if it has not expired, is appended to ``out`` as
        (data, expiry, [member channel names]), each member counted as received; an expired
        one's members are counted as expired and settled here (they leave their counts). No
        commit: the caller's."""
        w, j = self._w, self._j
        head = self._slots.parcels_at(slot)
        block = w[head]
        following = w[block + PC_NEXT]
        j.set(head, following)
        if not following:
            j.set(head + 1, 0)
        payload, expires, n = w[block + PC_PAYLOAD], w[block + PC_EXPIRES], w[block + PC_COUNT]
        if n > (w[block] >> 2) - PC_COUNT:
            raise StoreCorrupted(f"parcel {block} names more members than it holds")
        if expires > now:
            data = self._read_payload(payload)
            names = []
            for k in range(n):
                names.append(self._lent_name(w[block + PC_MEMBERS + k], slot))
            out.append((data, expires, names))
            j.add(H_RECEIVED, n)
        else:
            for k in range(n):
                rec = w[block + PC_MEMBERS + k]
                self._lent_name(rec, slot)
                x = self._part(rec)
                j.set(x + X_LENT, w[x + X_LENT] - 1)
                j.set(rec + C_COUNT, w[rec + C_COUNT] - 1)
            j.add(H_EXPIRED, n)
        self._drop_payload(payload)
        self.heap.free(block)

    def _lent_name(self, rec: int, slot: int) -> bytes:
        """The name of ``rec``, a member of a parcel of ``slot``: it must be a process-specific
        channel owned by that slot's process, with a message lent. (Its "!" is looked for in
        the name the drain needs anyway, which costs less than ``owner_part``'s search.)"""
        if not self.heap.start <= rec < self.heap.end:
            raise StoreCorrupted(f"a parcel names {rec}, not a channel record")
        name = self.name_of(rec)
        if OWNED_MARK in name:
            w, x = self._w, self._part(rec)
            if w[x + X_OWNER] & SLOT_MASK == slot + 1 and w[x + X_LENT]:
                return name
        raise StoreCorrupted(f"a parcel names channel record {rec}, which it is not lent to")

    def free_parcel(self) -> bool:
        """A step of reaping: free the first parcel whose owner is gone, with its reference
        to its payload; its members' records are not touched (``disown`` forgets what was lent
        to a reaped channel). False if none is left."""
        w = self._w
        block = w[H_PARCELS_TO_FREE]
        if not block:
            return False
        self._j.set(H_PARCELS_TO_FREE, w[block + PC_NEXT])
        self._drop_payload(w[block + PC_PAYLOAD])
        self.heap.free(block)
        return True

    def _read_payload(self, payload: int) -> bytes:
        """The bytes of the payload block at ``payload``, checked as ``_read`` checks."""
        w = self._w
        if not self._is_payload(payload):
            raise StoreCorrupted(f"a parcel references {payload}, not a payload block")
        packed = w[payload + P_LENGTH]
        length, crc = packed & 0xFFFFFFFF, packed >> 32
        start = (payload + P_DATA) * WORD
        data = self._b[start : start + length]
        if not length or len(data) != length or zlib.crc32(data) != crc:
            raise StoreCorrupted(f"payload block {payload} fails its CRC check")
        return data

    def _drop_payload(self, payload: int) -> None:
        """Give up a parcel's reference to the payload block at ``payload``: as ``_unref``."""
        w = self._w
        refs = w[payload + P_REFS] if self._is_payload(payload) else 0
        if refs < 1:
            raise StoreCorrupted(f"a parcel references {payload}, not a payload block")
        if refs == 1:
            self.heap.free(payload)
        else:
            self._j.set(payload + P_REFS, refs - 1)

    def _append_each(
        self,
        targets: list[tuple[bytes, int]],
        data: bytes,
        crc: int,
        expires: int,
        now: int,
        rings: list,
    ) -> int:
        """Queue an ordinary message of ``data`` on each (channel, capacity) of ``targets``,
        one send at a time, counting each outcome as a group_send copy's: the number
        skipped."""
        skipped = 0
        for name, capacity in targets:
            self._j.checkpoint()
            result = self.append(name, data, crc, capacity, expires, now, rings)
            skipped += result != QUEUED
            self._j.add(_GROUP_OUTCOME[result])
        return skipped

    def _store_payload(self, data: bytes, crc: int) -> int:
        """A payload block holding ``data`` and no reference yet, or 0 if memory is short.
        Written without the journal: nothing reaches it before a node is linked, and its count
        is journaled from the first run of nodes on."""
        block = self.heap.alloc(P_DATA - 1 + words_for(len(data)))
        if block:
            w = self._w
            w[block + P_REFS] = 0
            w[block + P_LENGTH] = len(data) | crc << 32
            start = (block + P_DATA) * WORD
            self._b[start : start + len(data)] = data
        return block

    def pop(self, name: bytes, now: int, rec: int = 0) -> tuple[bytes, int] | None:
        """The oldest unexpired message of ``name`` and its expiry, or None. ``rec``, when
        the caller knows it (a registration of its own keeps it in place), saves the lookup."""
        w = self._w
        if not rec:
            rec = self.find(name, self.hash.of(name))
        if not rec:
            return None
        found = None
        while found is None and w[rec + C_HEAD]:
            self._j.checkpoint()  # a channel whose whole backlog expired
            node = self._unlink(rec)
            expires = w[node + M_EXPIRES]
            if expires > now:
                found = self._read(node), expires
                self._j.add(H_RECEIVED)
            else:
                self._j.add(H_EXPIRED)
            if w[node + M_LENGTH] == SHARED:
                self._unref(node)
            self.heap.free(node)
        return found

    def lend(self, rec: int, now: int, slot: int, token: int, limit: int, budget: int) -> list:
        """Take up to ``limit`` unexpired messages (and up to about ``budget`` bytes) of the
        process-specific channel whose record is at ``rec`` for its owner, the process of
        ``slot`` and ``token``, ahead of its receives: [(data, expiry)], oldest first, or []
        if that process does not own it. A lent message leaves the list but stays in the
        count (and in ``X_LENT``) until its owner settles it (``settle``), so that the
        channel's capacity still bounds the messages not yet handed to a receive. Only the
        owner receives on such a channel (Channels' contract), and what it has been lent goes
        with it, as the channel's messages would be reaped: its death loses nothing more."""
        w, j = self._w, self._j
        x = self._part(rec)
        lent: list[tuple[bytes, int]] = []
        if w[x + X_OWNER] & SLOT_MASK != slot + 1 or w[x + X_TOKEN] != token:
            return lent
        while len(lent) < limit and budget > 0 and w[rec + C_HEAD]:
            j.checkpoint()
            node = self._unlink(rec)
            expires = w[node + M_EXPIRES]
            if expires > now:
                data = self._read(node)
                lent.append((data, expires))
                budget -= len(data)
                j.set(rec + C_COUNT, w[rec + C_COUNT] + 1)
                j.set(x + X_LENT, w[x + X_LENT] + 1)
                j.add(H_RECEIVED)
            else:
                j.add(H_EXPIRED)
            if w[node + M_LENGTH] == SHARED:
                self._unref(node)
            self.heap.free(node)
        return lent

    def settle(self, name: bytes, handed: int) -> None:
        """Of the messages lent to the owner of ``name`` (``lend``), ``handed`` were handed to
        its receives or expired there: they leave the count. A negative number gives back to
        the count messages the owner keeps again (taken for a receive that was cancelled).
        Nothing happens if the channel has gone meanwhile; the count never drops below what
        is lent."""
        rec = self.find(name, self.hash.of(name)) if OWNED_MARK in name else 0
        if not rec:
            return
        x = self._part(rec)
        w, j = self._w, self._j
        lent = w[x + X_LENT]
        handed = min(handed, lent)
        j.set(x + X_LENT, lent - handed)
        j.set(rec + C_COUNT, w[rec + C_COUNT] - handed)

    def put_back(self, name: bytes, data: bytes, crc: int, expires: int, rings: list) -> bool:
        """Queue ``data`` first on ``name`` again, as if it had never been taken: a receive
        that was handed it got cancelled. Capacity does not apply (it was counted before);
        False if there is no memory left for it."""
        w, j = self._w, self._j
        h = self.hash.of(name)
        self._j.step()  # before the savepoint is taken
        savepoint = self._j.count
        node = self.heap.alloc(M_DATA - 1 + words_for(len(data)))
        if not node:
            return False
        rec = self.find(name, h) or self._create(name, h)
        if not rec:
            self._j.rollback(savepoint)
            return False
        self._note_expiry(expires, True)
        head = w[rec + C_HEAD]
        # In the order of sending it goes just before its channel's first message (or last
        # of all), which keeps the oldest message of the store first in its own channel.
        before = w[head + M_SENT_PREV] if head else w[H_EXPIRY_TAIL]
        w[node + M_NEXT] = head
        w[node + M_SENT_NEXT] = head
        w[node + M_SENT_PREV] = before
        self._write_message(node, rec, data, crc, expires)
        j.set(before + M_SENT_NEXT if before else H_EXPIRY_HEAD, node)
        j.set(head + M_SENT_PREV if head else H_EXPIRY_TAIL, node)
        j.set(rec + C_HEAD, node)
        if not head:
            j.set(rec + C_TAIL, node)
        j.set(rec + C_COUNT, w[rec + C_COUNT] + 1)
        self._j.add(H_RETURNED)
        if not head and w[rec + C_WAITERS]:
            self._collect_doorbells(rec, name, rings)
        return True

    def _write_message(self, node: int, rec: int, data: bytes, crc: int, expires: int) -> None:
        w = self._w
        w[node + M_CHANNEL] = rec
        w[node + M_EXPIRES] = expires
        w[node + M_LENGTH] = len(data) | crc << 32
        start = (node + M_DATA) * WORD
        self._b[start : start + len(data)] = data

    def expire(self, now: int, limit: int) -> int:
        """Reclaim up to ``limit`` expired messages from the front of the order of sending,
        wherever they are queued; it stops at the first one not yet expired (those that expire
        out of that order are the sweep's)."""
        w, done = self._w, 0
        while done < limit:
            node = w[H_EXPIRY_HEAD]
            if not node or w[node + M_EXPIRES] > now:
                break
            rec = w[node + M_CHANNEL]
            if not self.heap.start <= rec < self.heap.end or w[rec + C_HEAD] != node:
                raise StoreCorrupted(f"the oldest message {node} is not first in its channel")
            self._drop(rec)
            done += 1
        return done

    # --- waiting receivers -----------------------------------------------------------------

    def add_waiter(self, name: bytes, slot: int, token: int) -> int:
        """Register a process's doorbell on ``name``: the channel's record, which stays put
        while the registration lasts, or 0 if channel memory is full."""
        w = self._w
        h = self.hash.of(name)
        self._j.step()
        rec = self.find(name, h) or self._create(name, h)
        if not rec:
            return 0
        node = self.heap.alloc(W_TOKEN)
        if not node:
            self._delete_if_idle(rec)
            return 0
        w[node + W_NEXT] = w[rec + C_WAITERS]
        w[node + W_SLOT] = slot
        w[node + W_TOKEN] = token
        self._j.set(rec + C_WAITERS, node)
        if OWNED_MARK in name:
            # The process that receives on a process-specific channel owns it; one it made
            # is fresh no more.
            x = self._part(rec)
            owner = w[x + X_OWNER]
            if not owner:
                self._adopt(rec, x, slot, token, False)
            elif owner & FRESH and w[x + X_TOKEN] == token:
                self._j.set(x + X_OWNER, owner & ~FRESH)
        return rec

    def queued_at(self, rec: int) -> int:
        """Under the lock: whether the record at ``rec``, which a registration of this process
        keeps in place (``Engine.take``), has messages queued (its first, or 0)."""
        return self._w[rec + C_HEAD]

    def has_messages(self, name: bytes) -> bool:
        rec = self.find(name, self.hash.of(name))
        return bool(rec and self._w[rec + C_HEAD])

    def remove_waiter(self, name: bytes, slot: int, token: int) -> None:
        rec = self.find(name, self.hash.of(name))
        if rec:
            self._prune_waiters(rec, lambda s, t: s == slot and t == token)

    def _prune_waiters(self, rec: int, drop: Callable[[int, int], bool]) -> None:
        w, j = self._w, self._j
        at, steps = rec + C_WAITERS, 0
        while w[at]:
            node = w[at]
            if drop(w[node + W_SLOT], w[node + W_TOKEN]):
                self._j.checkpoint()
                j.set(at, w[node + W_NEXT])
                self.heap.free(node)
            else:
                at = node + W_NEXT
            steps += 1
            if steps > MAX_CHAIN:
                raise StoreCorrupted(f"the waiter list of channel record {rec} loops")

    def _stale(self, slot: int, token: int) -> bool:
        return self._slots.token(slot) != token

    def _collect_doorbells(self, rec: int, name: bytes, rings: list) -> None:
        self._prune_waiters(rec, self._stale)
        w = self._w
        node = w[rec + C_WAITERS]
        while node:
            rings.append((w[node + W_SLOT], w[node + W_TOKEN], name))
            node = w[node + W_NEXT]

    def sweep(self, now: int, buckets: int, limit: int) -> None:
        """Free the idle records (no message, no live waiter) of the next ``buckets`` buckets;
        and while an expired message may be queued behind one that has not expired
        (``H_DISORDER_UNTIL``, see the module docstring), first reclaim the expired messages
        of each record passed, wherever they are in its list (a walk of its whole list). At
        most ``limit`` are dropped: reaching it, the sweep stops where it is and the next call
        takes the same bucket up again, so that each call either drops ``limit`` messages or
        passes a bucket.

        An emptied channel keeps its record until the sweep passes, so that a channel used
        over and over (a consumer's own) is not created and freed for every message."""
        w, base, mask = self._w, self.index.base, self.index.mask
        hand = w[H_SWEEP_CHANNEL] & mask
        passed = dropped = 0
        walk = now < w[H_DISORDER_UNTIL]
        while passed < buckets and dropped < limit:
            # The chain walked inline rather than through ``ChainedIndex.chain``: every send
            # sweeps, and a generator per bucket cost it about a microsecond under the lock.
            rec, steps = w[base + ((hand + passed) & mask)], 0
            while rec and dropped < limit:
                following = w[rec + C_NEXT]
                if walk and w[rec + C_COUNT]:
                    dropped += self._reclaim(rec, now, limit - dropped)
                if not w[rec + C_COUNT]:
                    self._j.checkpoint()
                    if w[rec + C_WAITERS]:
                        self._prune_waiters(rec, self._stale)
                    self._delete_if_idle(rec)
                rec, steps = following, steps + 1
                if steps > MAX_CHAIN:
                    raise self.index.loops()
            if not rec and dropped < limit:
                passed += 1
            # Else cut short, if only in the bucket's last record, which may hold more expired
            # messages: the next call walks the bucket again.
        w[H_SWEEP_CHANNEL] = (hand + passed) & mask  # a hint: never journaled

    # --- inspection ------------------------------------------------------------------------

    def waiter_count(self, rec: int) -> int:
        """Every registration on the record at ``rec``, of live processes or not."""
        live, dead, _words = self._waiters(rec, ())
        return live + dead

    def _check_record(
        self,
        bucket: int,
        rec: int,
        name: bytes,
        now: int,
        problems: list[str],
        references: dict[int, int],
    ) -> tuple[int, int, int]:
        """Walk one channel record's messages, adding what is wrong to ``problems`` and each
        shared node's reference to ``references`` (payload block -> nodes seen): (messages,
        words of the record's and messages' blocks, words of the expired ones). A payload
        block is read, and its words counted, at its first reference only."""
        w = self._w
        block_words = w[rec] >> 2
        expired = 0
        if (w[rec + C_HASH] & self.index.mask) != bucket or self.hash.of(name) != w[rec + C_HASH]:
            problems.append(f"channel record {rec} ({name!r}) is filed under a wrong hash")
        node, count, last = w[rec + C_HEAD], 0, 0
        while node:
            if w[node + M_CHANNEL] != rec:
                problems.append(f"message {node} points to the wrong channel")
            words, payload, seen = w[node] >> 2, 0, 0
            if w[node + M_LENGTH] == SHARED:
                payload = w[node + M_DATA]
                seen = references.get(payload, 0)
                references[payload] = seen + 1
                if not seen:
                    if self._is_payload(payload):
                        words += w[payload] >> 2
                    else:
                        problems.append(f"message {node} references {payload}, not a payload "
                                        "block")
                        seen = 1  # not to be read through
            if not seen:
                try:
                    self._read(node)
                except StoreCorrupted as exc:
                    problems.append(str(exc))
            if w[node + M_EXPIRES] <= now:
                expired += words
            block_words += words
            last, node, count = node, w[node + M_NEXT], count + 1
            if count > self.heap.size_words:
                problems.append(f"the message list of channel record {rec} loops")
                break
        x = self.owner_part(rec)
        lent = w[x + X_LENT] if x and w[rec] >> 2 >= x + OWNER_WORDS - rec else 0
        if count + lent != w[rec + C_COUNT] or last != w[rec + C_TAIL]:
            problems.append(
                f"channel record {rec} counts {w[rec + C_COUNT]}, holds {count} and lent {lent}"
            )
        return count, block_words, expired

    def _check_owner_part(self, rec: int, x: int, problems: list[str]) -> None:
        w = self._w
        if w[rec] >> 2 < x + OWNER_WORDS - rec:
            problems.append(f"channel record {rec} has no room for its owner")
            return
        owner = w[x + X_OWNER]
        if not owner and (w[x + X_TOKEN] or w[x + X_NEXT] or w[x + X_PREV]):
            problems.append(f"channel record {rec} has no owner but links to one")
        if owner and not (1 <= owner & SLOT_MASK <= SLOTS and w[x + X_TOKEN]):
            problems.append(f"channel record {rec} has a bad owner")

    def _owner_lists(self, records: int, problems: list[str] | None) -> tuple[list[int], int]:
        """Walk the list of channels to reap, then every slot's list of owned channels: (the
        records listed, how many of them are to reap). With ``problems`` given, check each
        record's owner and links there."""
        w, slots = self._w, self._slots
        listed: list[int] = []
        to_reap = 0
        for slot in range(-1, SLOTS):
            head = H_REAP_HEAD if slot < 0 else slots.owned_at(slot)
            rec, prev = w[head], 0
            while rec:
                if len(listed) >= records:
                    if problems is not None:
                        problems.append("a list of owned channels loops")
                    return listed, to_reap
                listed.append(rec)
                x = self._part(rec)
                if problems is not None:
                    owner, token = w[x + X_OWNER] & SLOT_MASK, w[x + X_TOKEN]
                    holder = slots.token(owner - 1) == token
                    # On a slot's list while its owner holds the slot's token, else to reap.
                    placed = not holder if slot < 0 else owner - 1 == slot and holder
                    if w[x + X_PREV] != prev or not owner or not placed:
                        problems.append(f"owned channel record {rec} is mislinked")
                prev, rec = rec, w[x + X_NEXT]
            if slot < 0:
                to_reap = len(listed)
            elif problems is not None and prev != w[head + 1]:
                problems.append(f"the list of channels owned by slot {slot} has a wrong end")
        return listed, to_reap

    def _waiters(self, rec: int, alive: Container[tuple[int, int]]) -> tuple[int, int, int]:
        """(waiters of live processes, waiters left by processes that have exited, words of
        their blocks) of the record at ``rec``."""
        w = self._w
        waiter, steps, live, dead, words = w[rec + C_WAITERS], 0, 0, 0, 0
        while waiter and steps <= MAX_CHAIN:
            words += w[waiter] >> 2
            if (w[waiter + W_SLOT], w[waiter + W_TOKEN]) in alive:
                live += 1
            else:
                dead += 1
            waiter, steps = w[waiter + W_NEXT], steps + 1
        return live, dead, words

    def _check_order_of_sending(self, messages: int, problems: list[str]) -> None:
        """Walk the order of sending, which must hold the ``messages`` found in channels, each
        linked back to the one before."""
        w = self._w
        sent, node, prev = 0, w[H_EXPIRY_HEAD], 0
        while node and sent <= messages:
            if w[node + M_SENT_PREV] != prev:
                problems.append(f"message {node} has a wrong back link in the order of sending")
            prev, node, sent = node, w[node + M_SENT_NEXT], sent + 1
        if sent != messages or prev != w[H_EXPIRY_TAIL]:
            problems.append(
                f"{messages} messages in channels, {sent} in the order of sending"
            )

    def _check_parcels(
        self, references: dict[int, int], problems: list[str]
    ) -> tuple[int, int, int, int]:
        """Walk the parcels of every slot's list and of the list to free, adding each one's
        reference to ``references`` and what is wrong to ``problems``: (parcels pending on
        slots, the messages they lend, parcels to free, words of their blocks and of payload
        blocks seen first here).
        Each member of a pending parcel must be an owned record of that slot's process whose
        lent count covers the pending parcels naming it."""
        w, slots = self._w, self._slots
        pending = to_free = words = lent = 0
        naming: dict[int, int] = {}
        limit = self.heap.size_words
        for slot in range(-1, SLOTS):
            head = H_PARCELS_TO_FREE if slot < 0 else slots.parcels_at(slot)
            block, last, seen = w[head], 0, 0
            while block:
                seen += 1
                if seen > limit:
                    problems.append("a list of parcels loops")
                    break
                words += w[block] >> 2
                payload = w[block + PC_PAYLOAD]
                first = not references.get(payload, 0)
                references[payload] = references.get(payload, 0) + 1
                if first:
                    if self._is_payload(payload):
                        words += w[payload] >> 2
                        try:
                            self._read_payload(payload)
                        except StoreCorrupted as exc:
                            problems.append(str(exc))
                    else:
                        problems.append(f"parcel {block} references {payload}, not a payload "
                                        "block")
                if slot >= 0:
                    n = w[block + PC_COUNT]
                    if n > (w[block] >> 2) - PC_COUNT:
                        problems.append(f"parcel {block} names more members than it holds")
                        n = 0
                    lent += n
                    for k in range(n):
                        rec = w[block + PC_MEMBERS + k]
                        naming[rec] = naming.get(rec, 0) + 1
                        x = self.owner_part(rec) if (
                            self.heap.start <= rec < self.heap.end
                        ) else 0
                        if not x or w[x + X_OWNER] & SLOT_MASK != slot + 1 or (
                            w[x + X_TOKEN] != slots.token(slot)
                        ):
                            problems.append(f"parcel {block} names {rec}, not a channel its "
                                            "owner owns")
                        elif w[x + X_LENT] < naming[rec]:
                            problems.append(f"channel record {rec} lends {w[x + X_LENT]}, "
                                            f"fewer than the parcels naming it")
                last, block = block, w[block + PC_NEXT]
            if slot < 0:
                to_free = seen
            else:
                pending += seen
                if last != w[head + 1]:
                    problems.append(f"the list of parcels of slot {slot} has a wrong end")
        return pending, lent, to_free, words

    def _check_references(self, references: dict[int, int], problems: list[str]) -> None:
        """Each payload block must count the shared nodes and parcels found referencing it
        (``references``: payload block -> nodes and parcels)."""
        w = self._w
        for payload, nodes in references.items():
            if self._is_payload(payload) and w[payload + P_REFS] != nodes:
                problems.append(
                    f"payload block {payload} counts {w[payload + P_REFS]} references, "
                    f"{nodes} messages reference it"
                )

    def verify(
        self, now: int, alive: Container[tuple[int, int]], top: int = 10, check: bool = True
    ) -> dict:
        """Walk every record, message and waiter; report problems and what they add up to.

        A waiter counts as waiting when its (slot, token) is in ``alive``; one left by a process
        that has exited counts in ``dead_waiters`` instead. ``channels`` are the records with
        messages or waiting receives, and only they are listed; the other records
        (``idle_records``) wait for the sweep, or are kept for their owner or their
        memberships. ``owned_channels`` are the records on the lists of their owners,
        ``channels_to_reap`` those on the list to reap. Of the channels, the ``top`` deepest
        and the ``top`` whose first message expires soonest are listed as (depth, name,
        waiting processes, expiry of the first message in ms since the epoch, 0 when empty).
        With ``check`` False the messages are not walked: the depths are the counts the
        records keep, nothing is checked (``problems`` and ``expired_bytes`` are None), and
        the walk is O(records) instead of O(messages). Checked, ``member_lists`` are the lists
        of memberships that records of process-specific channels start, for
        ``GroupStore.verify`` to check."""
        problems: list[str] = []
        w = self._w
        messages = expired = records = block_words = idle = dead = 0
        rows = []
        references: dict[int, int] = {}
        owned: set[int] = set()
        member_lists: list[tuple[bytes, int]] = []
        for bucket, rec in self.index.records():
            records += 1
            name = self.name_of(rec)
            if check:
                count, words, old = self._check_record(
                    bucket, rec, name, now, problems, references
                )
                block_words, expired = block_words + words, expired + old
                x = self.owner_part(rec)
                if x:
                    self._check_owner_part(rec, x, problems)
                    if w[x + X_OWNER]:
                        owned.add(rec)
                    if w[x + X_MEMBERS]:
                        member_lists.append((name, x + X_MEMBERS))
            else:
                count = w[rec + C_COUNT]
            waiters, gone, words = self._waiters(rec, alive)
            block_words, dead = block_words + words, dead + gone
            messages += count
            if not count and not waiters:
                idle += 1
                continue
            first = w[rec + C_HEAD]
            rows.append((count, name.decode("utf-8", "replace"), waiters,
                         w[first + M_EXPIRES] if first else 0))
        first = w[H_EXPIRY_HEAD]
        by_depth = heapq.nlargest(top, rows, key=lambda row: row[0])
        listed, to_reap = self._owner_lists(records, problems if check else None)
        figures = {
            "channels": records - idle,
            "idle_records": idle,
            "owned_channels": len(listed) - to_reap,
            "channels_to_reap": to_reap,
            "dead_waiters": dead,
            "messages": messages,
            "expired_bytes": expired * WORD if check else None,
            "by_depth": by_depth,
            "deepest": [row[:3] for row in by_depth],  # without the expiry, for the CLI
            "by_expiry": heapq.nsmallest(top, (row for row in rows if row[0]),
                                         key=lambda row: row[3]),
            "oldest_expires": w[first + M_EXPIRES] if first else 0,
        }
        if not check:
            return {"problems": None, **figures}
        if set(listed) != owned:
            problems.append(
                f"{len(owned)} channel records have an owner, {len(listed)} are on owners' "
                "lists and the list to reap"
            )
        if records != w[H_CHANNELS]:
            problems.append(f"{records} channel records, header says {w[H_CHANNELS]}")
        self._check_order_of_sending(messages, problems)
        pending, lent, to_free, words = self._check_parcels(references, problems)
        block_words += words
        # The messages lent in parcels are still to be had: counted as the channels hold them.
        figures["messages"] = messages + lent
        figures["parcels"], figures["parcels_to_free"] = pending, to_free
        self._check_references(references, problems)
        if block_words != self.heap.used_words():
            problems.append(
                f"channel memory: {self.heap.used_words()} words allocated, {block_words} "
                "reachable (leak or double use)"
            )
        return {"problems": problems, "member_lists": member_lists, **figures}
