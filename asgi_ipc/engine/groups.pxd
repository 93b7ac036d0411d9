# Compiled declarations for groups.py (Cython pure-Python mode: groups.py stays the source).
# As in heap.pxd, only attributes and methods are typed; the locals stay Python integers.

from .heap cimport Heap
from .index cimport ChainedIndex
from .journal cimport Journal

cdef class GroupStore:
    cdef unsigned long long[::1] _w
    cdef object _b
    cdef Journal _j
    cdef public Heap heap
    cdef ChainedIndex _groups
    cdef ChainedIndex _members
    cdef object _hash
    cdef object _most_records

    cpdef find(self, group)
    cpdef _membership(self, group, channel, rec)
    cpdef _link_last(self, rec, member, added)
    cpdef _unlink(self, rec, member)
    cpdef link_part(self, member)
    cpdef _part(self, member)
    cpdef _link_to_channel(self, member, x, head)
    cpdef _unlink_from_channel(self, member, x)
    cpdef _remove_member(self, rec, member, group)
    cpdef _drop_expired(self, rec, group, oldest, limit)
    cpdef add(self, group, channel, now, channel_list=*)
    cpdef remove(self, member)
    cpdef discard(self, group, channel)
    cpdef members(self, group, oldest)
    cpdef sweep(self, oldest)
