"""The group store: group records and memberships in the group memory.

Two hash indexes (``ChainedIndex``, index.py) share the group memory: the group index maps a
group name to its *group record*, which heads a doubly-linked list of its memberships in the
order they were last added (so the expired ones are always at the front); the member index
maps ``(group, channel)`` to the *membership*, so that ``group_add`` and ``group_discard`` are
O(1) however large the group.

A membership expires ``group_expiry`` seconds after its last ``group_add``. Expired memberships
are dropped from the front of the list by every operation on the group, and by the incremental
sweep, one bucket of the group index per operation, for groups nobody touches any more. The list
is in time order because ``group_add`` reads the time under the lock (``one_hold``) and links a
membership last with a time no earlier than the last one's: after a clock stepped back, the
memberships added meanwhile take the latest time of their group, and so expire that much later.

A membership of a process-specific channel (a name with "!") is also on its channel's list of
memberships, which the channel's record starts (queues.py): its *link part*, after the name,
holds the next membership of the list and the address of the word that points to this one (the
record's, or the previous membership's), so that removing it, however it goes (group_discard,
expiry, reaping), unlinks it in O(1) without knowing the record. The reaping of a channel whose
owner is gone takes its memberships off that list one by one (``remove``). Only these
memberships pay the two words. Should channel memory have had no room for the channel's record
at its group_add, a membership is on no list (its link part says so) and lasts until it expires.

Visibility: ``group_add`` becomes visible when the journal commits the link of the membership into
the member index, the group's list and its channel's list; ``group_discard``, an expiry or a
reaping step when it commits the unlinking from all three.

Layouts, in words from the block header (word 0):
  group record  1 next in bucket, 2 hash, 3 first member, 4 last member, 5 members,
                6 name length, 7... name
  membership    1 next in bucket, 2 hash, 3 group record, 4 next in group, 5 previous in group,
                6 last added (ms since the epoch), 7 channel name length, 8... channel name, then
                for a name with "!" its link part, in words from the end of the name: 0 next
                membership of the channel, 1 the word that points to this one (0: on no list)
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator

from ..exceptions import GroupMemoryFull, StoreCorrupted
from .heap import MIN_BLOCK, Heap
from .index import MAX_CHAIN, ChainedIndex, KeyedHash, words_for
from .journal import Journal
from .layout import H_GROUPS, H_MEMBERSHIPS, H_SWEEP_GROUP, OWNED_MARK, WORD

G_NEXT, G_HASH, G_FIRST, G_LAST, G_MEMBERS, G_NAME_LENGTH, G_NAME = range(1, 8)
B_NEXT, B_HASH, B_GROUP, B_LIST_NEXT, B_LIST_PREV, B_ADDED, B_NAME_LENGTH, B_NAME = range(1, 9)
# The link part of a membership of a process-specific channel, in words from the end of the
# channel name: the next membership of the channel, and the word that points to this one.
L_NEXT, L_PREVIOUS = range(2)
LINK_WORDS = 2

SWEEP_PER_GROUP = 16
# Compiled, groups.pxd makes the offsets above C variables, which are not attributes of the
# module: they are made attributes as well, for the tests and tools that read records.
globals().update(
    G_NEXT=G_NEXT, G_HASH=G_HASH, G_FIRST=G_FIRST, G_LAST=G_LAST, G_MEMBERS=G_MEMBERS,
    G_NAME_LENGTH=G_NAME_LENGTH, G_NAME=G_NAME, B_NEXT=B_NEXT, B_HASH=B_HASH, B_GROUP=B_GROUP,
    B_LIST_NEXT=B_LIST_NEXT, B_LIST_PREV=B_LIST_PREV, B_ADDED=B_ADDED,
    B_NAME_LENGTH=B_NAME_LENGTH, B_NAME=B_NAME, L_NEXT=L_NEXT, L_PREVIOUS=L_PREVIOUS,
    LINK_WORDS=LINK_WORDS, SWEEP_PER_GROUP=SWEEP_PER_GROUP,
)


class GroupStore:
    def __init__(
        self,
        words: memoryview,
        data: mmap.mmap,
        journal: Journal,
        heap: Heap,
        group_index: int,
        group_buckets: int,
        member_index: int,
        member_buckets: int,
        hasher: KeyedHash,
    ) -> None:
        self._w = words
        self._b = data
        self._j = journal
        self.heap = heap
        self._groups = ChainedIndex(
            words, data, journal, heap, group_index, group_buckets, G_NAME_LENGTH, "group"
        )
        self._members = ChainedIndex(
            words, data, journal, heap, member_index, member_buckets, B_NAME_LENGTH,
            "membership",
        )
        self._hash = hasher
        self._most_records = heap.size_words // MIN_BLOCK

    def detach(self) -> None:
        """Let go of the store's words, so that the segment can unmap them: compiled, this
        object holds a buffer export of the view, which would keep the mapping open."""
        self._w = None  # type: ignore[assignment]
        self._groups.detach()
        self._members.detach()

    def find(self, group: bytes) -> int:
        """The record of ``group``, or 0."""
        return self._groups.find(group, self._hash.of(group))

    def _membership(self, group: bytes, channel: bytes, rec: int) -> tuple[int, int]:
        h = self._hash.of(group + b"\0" + channel)
        return self._members.find_owned(channel, h, B_GROUP, rec), h

    def _link_last(self, rec: int, member: int, added: int) -> None:
        w, j = self._w, self._j
        last = w[rec + G_LAST]
        j.set(member + B_LIST_PREV, last)
        j.set(member + B_LIST_NEXT, 0)
        j.set(member + B_ADDED, added)
        j.set(last + B_LIST_NEXT if last else rec + G_FIRST, member)
        j.set(rec + G_LAST, member)

    def _unlink(self, rec: int, member: int) -> None:
        w, j = self._w, self._j
        before, after = w[member + B_LIST_PREV], w[member + B_LIST_NEXT]
        j.set(before + B_LIST_NEXT if before else rec + G_FIRST, after)
        j.set(after + B_LIST_PREV if after else rec + G_LAST, before)

    def link_part(self, member: int) -> int:
        """The link part of ``member`` if it is a membership of a process-specific channel,
        else 0."""
        w = self._w
        n = w[member + B_NAME_LENGTH]
        start = (member + B_NAME) * WORD
        if self._b.find(b"!", start, start + n) < 0:
            return 0
        return member + B_NAME + words_for(n)

    def _part(self, member: int) -> int:
        """The link part of a membership known to have one (it is on its channel's list)."""
        return member + B_NAME + words_for(self._w[member + B_NAME_LENGTH])

    def _link_to_channel(self, member: int, x: int, head: int) -> None:
        """Put ``member``, whose link part is at ``x``, first on the list that the word
        ``head`` (in its channel's record) starts."""
        w, j = self._w, self._j
        first = w[head]
        j.set(x + L_NEXT, first)
        j.set(x + L_PREVIOUS, head)
        if first:
            j.set(self._part(first) + L_PREVIOUS, x + L_NEXT)
        j.set(head, member)

    def _unlink_from_channel(self, member: int, x: int) -> None:
        w, j = self._w, self._j
        at, after = w[x + L_PREVIOUS], w[x + L_NEXT]
        if not at:
            return  # not on a list: its channel had no record (channel memory was full)
        if w[at] != member:
            raise StoreCorrupted(f"membership {member} is mislinked in its channel's list")
        j.set(at, after)
        if after:
            j.set(self._part(after) + L_PREVIOUS, at)

    def _remove_member(self, rec: int, member: int, group: bytes) -> None:
        w, j = self._w, self._j
        self._unlink(rec, member)
        x = self.link_part(member)
        if x:
            self._unlink_from_channel(member, x)
        self._members.unchain(member)
        self.heap.free(member)
        j.set(rec + G_MEMBERS, w[rec + G_MEMBERS] - 1)
        j.set(H_MEMBERSHIPS, w[H_MEMBERSHIPS] - 1)
        if not w[rec + G_MEMBERS]:
            self._groups.unchain(rec)
            self.heap.free(rec)
            j.set(H_GROUPS, w[H_GROUPS] - 1)

    def _drop_expired(self, rec: int, group: bytes, oldest: int, limit: int) -> bool:
        """Drop up to ``limit`` memberships added before ``oldest``; False if the group went."""
        w = self._w
        for _ in range(limit):
            member = w[rec + G_FIRST]
            if not member or w[member + B_ADDED] >= oldest:
                return True
            last = w[rec + G_MEMBERS] == 1
            self._j.checkpoint()
            self._remove_member(rec, member, group)
            if last:
                return False
        return True

    def add(self, group: bytes, channel: bytes, now: int, channel_list: int = 0) -> None:
        """Add ``channel`` to ``group`` (again), at ``now``. A membership of a process-specific
        channel is also put on its channel's list of memberships, which the word
        ``channel_list`` starts (0 when its channel has no record: channel memory was full)."""
        w, j = self._w, self._j
        h = self._hash.of(group)
        rec = self._groups.find(group, h)
        if not rec:
            rec = self._groups.insert(group, h)
            if not rec:
                raise GroupMemoryFull(
                    f"group memory is full: cannot create group {group.decode()!r}"
                )
            j.set(H_GROUPS, w[H_GROUPS] + 1)
        # Linked last, so never with a time before the last one's, even after the clock stepped
        # back: dropping the expired from the front relies on the order. (Being its group's
        # last, or before it, a membership added again never expires sooner for it either.)
        last = w[rec + G_LAST]
        added = max(now, w[last + B_ADDED]) if last else now
        member, h = self._membership(group, channel, rec)
        linked = OWNED_MARK in channel
        if member:
            self._unlink(rec, member)
            x = self._part(member) if linked else 0
            if x and w[x + L_PREVIOUS]:
                channel_list = 0  # on its channel's list already
        else:
            member = self._members.insert(channel, h, LINK_WORDS if linked else 0)
            x = self._part(member) if member and linked else 0
            if not member:
                raise GroupMemoryFull(
                    f"group memory is full: cannot add {channel.decode()!r} to group "
                    f"{group.decode()!r}"
                )
            w[member + B_GROUP] = rec
            j.set(rec + G_MEMBERS, w[rec + G_MEMBERS] + 1)
            j.set(H_MEMBERSHIPS, w[H_MEMBERSHIPS] + 1)
        if x and channel_list:
            self._link_to_channel(member, x, channel_list)
        self._link_last(rec, member, added)

    def remove(self, member: int) -> None:
        """Remove ``member``, the first membership on its channel's list, from its group (the
        reaping of a channel whose owner is gone)."""
        w = self._w
        rec, x = w[member + B_GROUP], self.link_part(member)
        # Removed, it must leave its channel's list, or reaping would find it again.
        if (
            not x
            or not w[x + L_PREVIOUS]
            or not self.heap.start <= rec < self.heap.end
            or w[rec + G_MEMBERS] < 1
        ):
            raise StoreCorrupted(f"membership {member} is damaged")
        self._remove_member(rec, member, b"")

    def discard(self, group: bytes, channel: bytes) -> None:
        rec = self.find(group)
        if rec:
            member = self._membership(group, channel, rec)[0]
            if member:
                self._remove_member(rec, member, group)

    def members(self, group: bytes, oldest: int) -> list[bytes]:
        """The channels of ``group`` added at or after ``oldest``; older ones are dropped."""
        rec = self.find(group)
        if not rec or not self._drop_expired(rec, group, oldest, 1 << 62):
            return []
        names: list[bytes] = []
        w, member = self._w, self._w[rec + G_FIRST]
        # Counts come from the store too: only its size bounds a walk that a damaged link
        # could turn into a loop.
        limit = min(w[rec + G_MEMBERS], self._most_records)
        while member:
            if len(names) >= limit or w[member + B_GROUP] != rec:
                raise StoreCorrupted(f"the member list of group {group.decode()!r} is damaged")
            names.append(self._members.name_of(member))
            member = w[member + B_LIST_NEXT]
        return names

    def sweep(self, oldest: int) -> None:
        """Drop expired memberships of the groups in the next bucket of the group index."""
        w, index = self._w, self._groups
        hand = w[H_SWEEP_GROUP] & index.mask
        # Walked inline (see ``ChannelQueues.sweep``): every group_send sweeps.
        rec, steps = w[index.base + hand], 0
        while rec:
            following = w[rec + G_NEXT]
            self._drop_expired(rec, index.name_of(rec), oldest, SWEEP_PER_GROUP)
            rec, steps = following, steps + 1
            if steps > MAX_CHAIN:
                raise index.loops()
        w[H_SWEEP_GROUP] = (hand + 1) & index.mask  # a hint: never journaled

    def groups(self) -> Iterator[tuple[bytes, int]]:
        """(name, record) of every group, for stats and verify, under the lock."""
        for _bucket, rec in self._groups.records():
            yield self._groups.name_of(rec), rec

    def size(self, rec: int) -> int:
        return self._w[rec + G_MEMBERS]

    def verify(
        self, top: int = 10, check: bool = True,
        member_lists: Iterable[tuple[bytes, int]] = (),
    ) -> dict:
        """Walk every group and membership; report problems and what they add up to, with
        the ``top`` largest groups as (members, name). ``member_lists`` are the lists of
        memberships that records of process-specific channels start, as (channel, the word
        that starts the list): each membership of such a channel must be on its channel's
        list, unless it is on none (its channel had no record). With ``check`` False the
        memberships are not walked: the sizes are the counts the group records keep, and
        ``problems`` is None."""
        w, problems, groups, total, block_words = self._w, [], 0, 0, 0
        linked = 0
        largest = []
        for name, rec in self.groups():
            groups += 1
            if not check:
                largest.append((w[rec + G_MEMBERS], name.decode("utf-8", "replace")))
                total += w[rec + G_MEMBERS]
                continue
            block_words += w[rec] >> 2
            if self._hash.of(name) != w[rec + G_HASH]:
                problems.append(f"group record {rec} has a wrong hash")
            member, prev, count, added = w[rec + G_FIRST], 0, 0, 0
            while member:
                block_words += w[member] >> 2
                channel = self._members.name_of(member)
                if w[member + B_GROUP] != rec or w[member + B_LIST_PREV] != prev:
                    problems.append(f"membership {member} of group {name!r} is mislinked")
                if w[member + B_ADDED] < added:
                    problems.append(f"memberships of group {name!r} are out of order")
                if self._membership(name, channel, rec)[0] != member:
                    problems.append(f"membership {member} is missing from the member index")
                x = self.link_part(member)
                at = w[x + L_PREVIOUS] if x else 0
                if at:
                    linked += 1
                    if not 0 < at < len(w) or w[at] != member:
                        problems.append(f"membership {member} is mislinked in its channel's "
                                        "list")
                added = w[member + B_ADDED]
                prev, member, count = member, w[member + B_LIST_NEXT], count + 1
                if count > self._most_records:
                    problems.append(f"the member list of group {name!r} loops")
                    break
            if count != w[rec + G_MEMBERS] or prev != w[rec + G_LAST] or not count:
                problems.append(f"group {name!r} counts {w[rec + G_MEMBERS]}, holds {count}")
            largest.append((count, name.decode("utf-8", "replace")))
            total += count
        figures = {"groups": groups, "memberships": total,
                   "largest": sorted(largest, reverse=True)[:top]}
        if not check:
            return {"problems": None, **figures}
        if groups != w[H_GROUPS] or total != w[H_MEMBERSHIPS]:
            problems.append(
                f"{groups} groups and {total} memberships, header says "
                f"{w[H_GROUPS]} and {w[H_MEMBERSHIPS]}"
            )
        on_lists = 0
        for channel, head in member_lists:
            member, at = w[head], head
            while member:
                x = self._part(member)
                if self._members.name_of(member) != channel or w[x + L_PREVIOUS] != at:
                    problems.append(f"the list of memberships of channel {channel!r} is "
                                    "damaged")
                    break
                at, member, on_lists = x + L_NEXT, w[x + L_NEXT], on_lists + 1
                if on_lists > total:
                    break
        if on_lists != linked:
            problems.append(
                f"{linked} memberships are on their channels' lists, the lists hold {on_lists}"
            )
        indexed = self._members.count()
        if indexed != total:
            problems.append(f"member index holds {indexed} memberships, groups hold {total}")
        if block_words != self.heap.used_words():
            problems.append(
                f"group memory: {self.heap.used_words()} words allocated, {block_words} "
                "reachable (leak or double use)"
            )
        return {"problems": problems, **figures}
