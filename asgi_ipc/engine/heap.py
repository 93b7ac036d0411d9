"""The allocator of an area: blocks of words handed out and taken back in O(1).

A two-level segregated fit (TLSF): free blocks sit in one of 8 bins per power of two of their
size, two bitmaps say which bins are non-empty, and a free block is merged with free neighbours at
once, so a store filled with small messages and drained can hold one large message again.

A block is a header word, ``size << 2 | PREV_USED | USED``, followed by its payload. A free block
also keeps its free-list links in words 1 and 2 and its size in its last word (the footer), which
is how a block finds out where its free predecessor starts. The last word of the area is a used
block of size 0 that stops merges.

Every change to these words goes through the journal. When a block is handed out, the words its
new owner will overwrite without journaling (the free-list links and the footer) are recorded with
``Journal.keep`` so that a rollback can turn it back into the free block it was.

Metadata, in the area's page of allocator metadata: the first-level bitmap, one second-level
bitmap per power of two, then the bin heads.

Memory is reserved before it is touched. The store is a sparse file on tmpfs, and touching a page
of it when the tmpfs is full raises SIGBUS in whichever process touches it (reading a hole
through a shared mapping allocates the page too). So each heap keeps a high-water mark of the
words reserved with ``posix_fallocate`` (a header word of its own); the first and last pages,
which ``format`` writes, are reserved when the store is created. Before ``alloc`` hands out a
block, or carves the header of its remainder, past the mark, it reserves the next chunk (at
least ``RESERVE_WORDS``, page-aligned, never past the end), and when the tmpfs has no room left
it returns 0 as if the heap were full. Why that covers every access, by induction over what is
written: ``alloc`` writes the block it hands out (whose owner writes only inside it) and the
remainder's header and links, all below the mark; ``alloc_run`` writes inside one such block;
``free`` and the merges write the headers, links and footers of blocks that exist already (each
written on reserved memory when it was made) and the footer of the freed block, which lies inside
it. The footer of the one free block that reaches the end lies in the last page. Readers
(``verify``, ``used_words``, the bins, the records and messages of the callers) read only such
words, so nothing ever reads a hole either.

The mark is written without the journal: it only grows (until a flush gives the pages back and
sets it down again, see ``segment.format_areas``) and states a physical fact, the pages reserved,
which a rollback does not undo. A process killed between the reservation and the store of the
mark leaves pages reserved above the mark, which the next reservation takes again at no cost.
"""

from __future__ import annotations

from collections.abc import Callable

from ..exceptions import StoreCorrupted
from . import bitops
from .journal import Journal
from .layout import PAGE_WORDS

USED = 1
PREV_USED = 2
MIN_BLOCK = 4
SL_BITS = 3
FIRST_LEVELS = 40

M_FL_BITMAP = 0
M_SL_BITMAP = 1
M_BINS = M_SL_BITMAP + FIRST_LEVELS

# Words reserved at a time when a heap grows past its mark: 1 MiB, so that a reservation (a
# syscall) is paid once per thousands of small messages, not once per page.
RESERVE_WORDS = 1 << 17
# Free blocks of the exact size class looked at when the good fit finds nothing (see _find).
EXACT_BIN_STEPS = 8
# Compiled, heap.pxd makes the constants above C variables, which are not attributes of the
# module: they are made attributes as well, for the modules and tests that import them.
globals().update(
    USED=USED, PREV_USED=PREV_USED, MIN_BLOCK=MIN_BLOCK, SL_BITS=SL_BITS,
    FIRST_LEVELS=FIRST_LEVELS, M_FL_BITMAP=M_FL_BITMAP, M_SL_BITMAP=M_SL_BITMAP, M_BINS=M_BINS,
    EXACT_BIN_STEPS=EXACT_BIN_STEPS,
)


def _bin(size: int) -> int:
    """The bin a free block of ``size`` words is filed under."""
    bits = bitops.bit_length(size)
    if bits <= SL_BITS:
        return size
    return ((bits - SL_BITS) << SL_BITS) | ((size >> (bits - SL_BITS - 1)) & 7)


def _lowest_bit(mask: int) -> int:
    return bitops.bit_length(mask & -mask) - 1


def _page_up(word: int) -> int:
    return -(-word // PAGE_WORDS) * PAGE_WORDS


class Heap:
    def __init__(
        self,
        words: memoryview,
        journal: Journal,
        meta: int,
        start: int,
        end: int,
        mark: int,
        reserve: Callable[[int, int], bool],
    ):
        """The heap of words [start, end), page-aligned, whose metadata page is at ``meta``
        and whose reserved high-water mark is kept in the word ``mark``. ``reserve(a, b)``
        reserves the memory of words [a, b), False when there is none left."""
        self._w = words
        self._j = journal
        self._meta = meta
        self._bins = meta + M_BINS
        self._mark = mark
        self._reserve_words = reserve
        self.start = start
        self.end = end

    def detach(self) -> None:
        """Let go of the store's words, so that the segment can unmap them: compiled, this
        object holds a buffer export of the view, which would keep the mapping open."""
        self._w = None  # type: ignore[assignment]

    def format(self) -> None:
        """Make the area one free block (the metadata page must read as zeros, and the first
        and last pages must be reserved). The pages in between are unreserved from then on."""
        w = self._w
        w[self._mark] = min(self.start + PAGE_WORDS, self.end)
        size = self.end - 1 - self.start
        w[self.start] = size << 2 | PREV_USED
        w[self.end - 1] = USED
        idx = _bin(size)
        w[self.start + 1] = 0
        w[self.start + 2] = 0
        w[self.start + size - 1] = size
        w[self._bins + idx] = self.start
        w[self._meta + M_SL_BITMAP + (idx >> SL_BITS)] = 1 << (idx & 7)
        w[self._meta + M_FL_BITMAP] = 1 << (idx >> SL_BITS)

    def used_words(self) -> int:
        """Words in used blocks, headers included (walks the heap: for stats only)."""
        w, block, used = self._w, self.start, 0
        while block < self.end - 1:
            header = w[block]
            if header >> 2 < MIN_BLOCK:
                raise StoreCorrupted(f"heap at word {self.start}: block {block} has a bad size")
            if header & USED:
                used += header >> 2
            block += header >> 2
        return used

    @property
    def size_words(self) -> int:
        return self.end - 1 - self.start

    def _insert(self, block: int, size: int, carved: bool = False) -> None:
        """File a free block. ``carved``: it was cut from the body of a free block, whose
        rollback never needs those words back, so its header and links need no journal."""
        w, j = self._w, self._j
        idx = _bin(size)
        bin_word = self._bins + idx
        head = w[bin_word]
        if carved:
            w[block] = size << 2 | PREV_USED
            w[block + 1] = head
            w[block + 2] = 0
        else:
            j.set(block + 1, head)
            j.set(block + 2, 0)
        j.set(block + size - 1, size)
        if head:
            j.set(head + 2, block)
        else:
            sl_word = self._meta + M_SL_BITMAP + (idx >> SL_BITS)
            sl_map = w[sl_word]
            if not sl_map:
                fl_word = self._meta + M_FL_BITMAP
                j.set(fl_word, w[fl_word] | 1 << (idx >> SL_BITS))
            j.set(sl_word, sl_map | 1 << (idx & 7))
        j.set(bin_word, block)

    def _remove(self, block: int, size: int) -> None:
        w, j = self._w, self._j
        nxt = w[block + 1]
        prv = w[block + 2]
        if prv:
            j.set(prv + 1, nxt)
        else:
            idx = _bin(size)
            if w[self._bins + idx] != block:
                raise StoreCorrupted(f"free block {block} is not the head of its bin")
            j.set(self._bins + idx, nxt)
            if not nxt:
                sl_word = self._meta + M_SL_BITMAP + (idx >> SL_BITS)
                sl_map = w[sl_word] & ~(1 << (idx & 7))
                j.set(sl_word, sl_map)
                if not sl_map:
                    fl_word = self._meta + M_FL_BITMAP
                    j.set(fl_word, w[fl_word] & ~(1 << (idx >> SL_BITS)))
        if nxt:
            j.set(nxt + 2, prv)

    def _replace(self, old: int, old_size: int, new: int, new_size: int, carved: bool) -> None:
        """Refile free block ``old`` as ``new`` (split off or merged): when both fall in the
        same bin, ``new`` takes ``old``'s place in its list and the bitmaps stay as they are."""
        idx = _bin(new_size)
        if idx != _bin(old_size):
            self._remove(old, old_size)
            self._insert(new, new_size, carved)
            return
        w, j = self._w, self._j
        if new != old:
            nxt, prv = w[old + 1], w[old + 2]
            if carved:
                w[new] = new_size << 2 | PREV_USED
                w[new + 1] = nxt
                w[new + 2] = prv
            else:
                j.set(new + 1, nxt)
                j.set(new + 2, prv)
            if prv:
                j.set(prv + 1, new)
            elif w[self._bins + idx] == old:
                j.set(self._bins + idx, new)
            else:
                raise StoreCorrupted(f"free block {old} is not the head of its bin")
            if nxt:
                j.set(nxt + 2, new)
        j.set(new + new_size - 1, new_size)

    def _find(self, size: int) -> int:
        """A free block of at least ``size`` words, or 0."""
        bits = bitops.bit_length(size)
        wanted = size
        if bits > SL_BITS:
            # Round up to the next bin boundary, so that every block of the bin found fits.
            size += (1 << (bits - SL_BITS - 1)) - 1
        idx = _bin(size)
        w = self._w
        fl, sl = idx >> SL_BITS, idx & 7
        if fl >= FIRST_LEVELS:
            return 0
        # The bins of this first level from ``sl`` up, else the first levels above ``fl``: the
        # bits below shifted out, not masked off with -1 << sl (compiled, a negative C integer).
        sl_map = w[self._meta + M_SL_BITMAP + fl] >> sl << sl
        if not sl_map:
            fl_map = w[self._meta + M_FL_BITMAP] >> (fl + 1) << (fl + 1)
            if not fl_map:
                return self._find_in_own_bin(wanted)
            fl = _lowest_bit(fl_map)
            sl_map = w[self._meta + M_SL_BITMAP + fl]
        return w[self._bins + (fl << SL_BITS) + _lowest_bit(sl_map)]

    def _find_in_own_bin(self, size: int) -> int:
        """A block of at least ``size`` words among the first few of ``size``'s own bin, which
        the rounding of the good fit skips: without this look, a full heap refuses a message of
        exactly the size a receive just freed. Bounded, so that alloc stays O(1)."""
        w = self._w
        block = w[self._bins + _bin(size)]
        for _ in range(EXACT_BIN_STEPS):
            if not block or w[block] >> 2 >= size:
                return block
            block = w[block + 1]
        return 0

    def _reserve(self, upto: int) -> bool:
        """Make sure words below ``upto`` are reserved (see the module docstring)."""
        w = self._w
        mark = w[self._mark]
        if upto <= mark:
            return True
        needed = min(_page_up(upto), self.end)
        for target in (min(max(needed, mark + RESERVE_WORDS), self.end), needed):
            if self._reserve_words(mark, target):
                w[self._mark] = target
                return True
        return False

    def alloc(self, payload_words: int) -> int:
        """A used block with room for ``payload_words`` after its header, or 0 if none is free."""
        size = max(payload_words + 1, MIN_BLOCK)
        block = self._find(size)
        if not block:
            return 0
        w, j = self._w, self._j
        header = w[block]
        free_size = header >> 2
        if header & USED or free_size < size or block + free_size >= self.end:
            raise StoreCorrupted(f"free list of the heap at {self.start} holds a bad block")
        rest = free_size - size
        # The block handed out, and the header and links of the remainder carved after it.
        if not self._reserve(block + (size + 3 if rest >= MIN_BLOCK else free_size)):
            return 0
        if j.freed:
            # The caller must take a step first (journal.py): an undo of this operation would
            # need the freed block's whole old contents back.
            raise RuntimeError("a block freed by this operation is about to be reused before "
                               "the operation took a step (Journal.step)")
        j.keep(block + 1)
        j.keep(block + 2)
        if rest >= MIN_BLOCK:
            # The remainder's footer is the old block's footer, which _replace journals.
            self._replace(block, free_size, block + size, rest, carved=True)
        else:
            self._remove(block, free_size)
            size = free_size
            j.keep(block + size - 1)
            after = block + size
            j.set(after, w[after] | PREV_USED)
        j.set(block, size << 2 | USED | (header & PREV_USED))
        return block

    def alloc_run(self, payload_words: int, count: int) -> list[int]:
        """``count`` used blocks with room for ``payload_words`` each, cut from one allocation
        so that they cost one allocation's journaling; [] if no free block is large enough.
        Each is an ordinary block from then on, freed on its own."""
        size = max(payload_words + 1, MIN_BLOCK)
        block = self.alloc(size * count - 1)
        if not block or count == 1:
            return [block] if block else []
        w = self._w
        header = w[block]
        blocks = list(range(block, block + size * count, size))
        # Written without the journal: these words lie inside the block just handed out, and
        # undoing the allocation restores its first header, all the free block needs back.
        w[block] = size << 2 | (header & (USED | PREV_USED))
        for sub in blocks[1:]:
            w[sub] = size << 2 | USED | PREV_USED
        last = blocks[-1]
        w[last] = ((header >> 2) - (last - block)) << 2 | USED | PREV_USED
        return blocks

    def free(self, block: int) -> None:
        w, j = self._w, self._j
        header = w[block] if self.start <= block < self.end else 0
        size = header >> 2
        if not header & USED or size < MIN_BLOCK or block + size >= self.end:
            raise StoreCorrupted(f"freeing {block}, which is not a used block of its heap")
        self._j.freed = True
        start, total, prev_used = block, size, header & PREV_USED
        after = block + size
        after_header = w[after]
        after_size = 0 if after_header & USED else after_header >> 2
        if not prev_used:
            prev_size = w[block - 1]
            # Compared before it is subtracted: a huge size must not wrap round (heap.pxd).
            if prev_size > block - self.start:
                raise StoreCorrupted(f"block {block} of the heap has a bad free predecessor")
            prev = block - prev_size
            if w[prev] >> 2 != prev_size or w[prev] & USED:
                raise StoreCorrupted(f"block {block} of the heap has a bad free predecessor")
            if after_size:
                self._remove(after, after_size)
            start, total, prev_used = prev, prev_size + size + after_size, w[prev] & PREV_USED
            self._replace(prev, prev_size, prev, total, carved=False)
        elif after_size:
            total += after_size
            self._replace(after, after_size, block, total, carved=False)
        else:
            self._insert(block, size)
        j.set(start, total << 2 | prev_used)
        after = start + total
        j.set(after, w[after] & ~PREV_USED)

    def largest_free_words(self) -> int:
        """Size of the largest free block, found from the highest non-empty bin."""
        w = self._w
        fl_map = w[self._meta + M_FL_BITMAP]
        if not fl_map:
            return 0
        fl = fl_map.bit_length() - 1
        sl = w[self._meta + M_SL_BITMAP + fl].bit_length() - 1
        block, best, steps = w[self._bins + (fl << SL_BITS) + sl], 0, 0
        while block and steps < 64:
            best = max(best, w[block] >> 2)
            block, steps = w[block + 1], steps + 1
        return best

    def verify(self) -> list[str]:
        """Walk every block and every bin; return what is inconsistent."""
        w, problems = self._w, []
        where = f"heap at word {self.start}"
        if not min(self.start + PAGE_WORDS, self.end) <= w[self._mark] <= self.end:
            problems.append(f"{where}: reserved mark {w[self._mark]} lies outside the heap")
        block, prev_free, used, free_blocks = self.start, False, 0, set()
        while block < self.end - 1:
            header = w[block]
            size = header >> 2
            if size < MIN_BLOCK or block + size > self.end - 1:
                return problems + [f"{where}: block {block} has bad size {size}"]
            if bool(header & PREV_USED) == prev_free:
                problems.append(f"{where}: block {block} has a wrong PREV_USED bit")
            if header & USED:
                used += size
                prev_free = False
            else:
                if prev_free:
                    problems.append(f"{where}: free blocks not merged at {block}")
                if w[block + size - 1] != size:
                    problems.append(f"{where}: free block {block} has a wrong footer")
                free_blocks.add(block)
                prev_free = True
            block += size
        if w[self.end - 1] & USED == 0 or w[self.end - 1] >> 2:
            problems.append(f"{where}: end sentinel overwritten")
        listed = set()
        for idx in range(FIRST_LEVELS << SL_BITS):
            block, prev = w[self._bins + idx], 0
            nonempty = bool(block)
            bit = w[self._meta + M_SL_BITMAP + (idx >> SL_BITS)] >> (idx & 7) & 1
            if bit != nonempty:
                problems.append(f"{where}: bitmap bit of bin {idx} is {bit}")
            while block:
                if block not in free_blocks or block in listed:
                    return problems + [f"{where}: bin {idx} lists {block}, not a free block"]
                if _bin(w[block] >> 2) != idx or w[block + 2] != prev:
                    problems.append(f"{where}: free block {block} misfiled or mislinked")
                listed.add(block)
                prev, block = block, w[block + 1]
        for fl in range(FIRST_LEVELS):
            has_bins = bool(w[self._meta + M_SL_BITMAP + fl])
            if has_bins != bool(w[self._meta + M_FL_BITMAP] >> fl & 1):
                problems.append(f"{where}: first-level bitmap bit {fl} is wrong")
        if listed != free_blocks:
            problems.append(f"{where}: {len(free_blocks - listed)} free blocks in no bin (leak)")
        return problems
