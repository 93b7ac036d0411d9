# Compiled declarations for queues.py (Cython pure-Python mode: queues.py stays the source).
# As in heap.pxd, only attributes and methods are typed; the locals stay Python integers.

from .heap cimport Heap
from .journal cimport Journal

cdef class ChannelQueues:
    # Instances take attributes of their own, as in pure Python (tests replace a method).
    cdef dict __dict__
    cdef unsigned long long[::1] _w
    cdef object _b
    cdef Journal _j
    cdef public Heap heap
    cdef object _slots
    # Untyped: its bound methods are kept as attributes (find, name_of) and called from Python.
    cdef public object index
    cdef public object find
    cdef public object name_of
    cdef public object hash

    cpdef _create(self, name, h)
    cpdef _delete(self, rec)
    cpdef _delete_if_idle(self, rec)
    cpdef owner_part(self, rec)
    cpdef _part(self, rec)
    cpdef _list_head(self, x)
    cpdef _unlink_owned(self, rec, x)
    cpdef own(self, name, slot, token, fresh)
    cpdef _adopt(self, rec, x, slot, token, fresh)
    cpdef members_at(self, name)
    cpdef orphan(self, slot)
    cpdef first_member(self, rec)
    cpdef reap_message(self, rec)
    cpdef disown(self, rec)
    cpdef _unlink(self, rec, prev=*)
    cpdef _drop_expired(self, rec, now)
    cpdef _drop(self, rec, prev=*)
    cpdef _reclaim(self, rec, now, limit)
    cpdef _read(self, node)
    cpdef _note_expiry(self, expires, ahead)
    cpdef append(self, name, data, crc, capacity, expires, now, rings)
    cpdef pop(self, name, now, rec=*)
    cpdef lend(self, rec, now, slot, token, limit, budget)
    cpdef settle(self, name, handed)
    cpdef put_back(self, name, data, crc, expires, rings)
    cpdef _write_message(self, node, rec, data, crc, expires)
    cpdef expire(self, now, limit)
    cpdef _collect_doorbells(self, rec, name, rings)
    cpdef sweep(self, now, buckets, limit)
