# Compiled declarations for queues.py (Cython pure-Python mode: queues.py stays the source).
# Locals are typed by the rule of heap.pxd: words from the store, and the addresses computed
# from them, unsigned long long with overflow checked; counts Py_ssize_t. The inspection's own
# locals (verify and its walks) stay untyped: it reads a damaged store as pure Python does, and
# the helpers it shares with the hot paths (owner_part, _part) take words, as every word read
# from the store is one.

cimport cython

from .heap cimport USED, Heap
from .index cimport MAX_CHAIN, KeyedHash, words_for
from .journal cimport Journal

ctypedef unsigned long long word

cdef Py_ssize_t C_NEXT, C_HASH, C_HEAD, C_TAIL, C_COUNT, C_WAITERS, C_NAME_LENGTH, C_NAME
cdef Py_ssize_t M_NEXT, M_SENT_NEXT, M_SENT_PREV, M_CHANNEL, M_EXPIRES, M_LENGTH, M_DATA
cdef Py_ssize_t P_REFS, P_LENGTH, P_DATA, NODE_WORDS, W_NEXT, W_SLOT, W_TOKEN, RUN_CHANNELS
cdef unsigned long long SHARED
cdef Py_ssize_t PC_NEXT, PC_PAYLOAD, PC_EXPIRES, PC_COUNT, PC_MEMBERS
cdef Py_ssize_t X_OWNER, X_TOKEN, X_NEXT, X_PREV, X_MEMBERS, X_LENT, OWNER_WORDS
cdef unsigned long long FRESH, SLOT_MASK
# From layout.py.
cdef Py_ssize_t WORD, H_CHANNELS, H_DELIVERED, H_DISORDER_UNTIL, H_EXPIRED, H_EXPIRY_HEAD
cdef Py_ssize_t H_EXPIRY_TAIL, H_GROUP_FULL, H_LATEST_EXPIRY, H_RECEIVED, H_RETURNED
cdef Py_ssize_t H_REAPED_MESSAGES, H_SWEEP_CHANNEL, H_PARCELS, H_PARCELS_TO_FREE

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
    cdef public KeyedHash hash

    cpdef _create(self, name, h)
    cpdef _delete(self, rec)
    cpdef _delete_if_idle(self, rec)
    @cython.locals(n=Py_ssize_t, start=word)
    cpdef word owner_part(self, word rec) except? 0
    cpdef word _part(self, word rec) except? 0
    cpdef _list_head(self, x)
    cpdef _unlink_owned(self, rec, x)
    cpdef own(self, name, slot, token, fresh)
    cpdef _adopt(self, rec, x, slot, token, fresh)
    cpdef members_at(self, name)
    cpdef orphan(self, slot)
    cpdef first_member(self, rec)
    cpdef reap_message(self, rec)
    cpdef disown(self, rec)
    @cython.locals(node=word, following=word, before=word, after=word)
    cpdef word _unlink(self, word rec, word prev=*) except? 0
    @cython.locals(head=word)
    cpdef _drop_expired(self, word rec, word now)
    @cython.locals(node=word)
    cpdef _drop(self, word rec, word prev=*)
    @cython.locals(prev=word, node=word, dropped=Py_ssize_t, left=word, following=word)
    cpdef Py_ssize_t _reclaim(self, word rec, word now, Py_ssize_t limit) except -1
    @cython.locals(packed=word, start=word, payload=word, length=word, crc=word)
    cpdef bytes _read(self, word node)
    @cython.locals(header=word, size=word)
    cpdef bint _is_payload(self, word block) except -1
    @cython.locals(payload=word, refs=word)
    cpdef _unref(self, word node)
    @cython.locals(latest=word)
    cpdef _note_expiry(self, word expires, bint ahead)
    @cython.locals(rec=word, payload_words=Py_ssize_t, node=word, count=word, last=word,
                   tail=word)
    cpdef append(self, name, data, word crc, capacity, word expires, word now, list rings)
    @cython.locals(rec=word, full=Py_ssize_t)
    cpdef tuple _accept_run(self, list names, capacity_of, word now)
    @cython.locals(last=word, previous=word, k=Py_ssize_t, rec=word, node=word, count=word,
                   tail=word)
    cpdef _link_run(self, list accepted, list nodes, word payload, word expires, list rings)
    @cython.locals(rec=word, x=word, owner=word, n=Py_ssize_t, block=word, k=Py_ssize_t,
                   token=object)
    cpdef tuple _make_parcels(self, list accepted, word payload, word expires)
    @cython.locals(rec=word, x=word, delivered=Py_ssize_t, head=word, last=word, block=word)
    cpdef _link_parcels(self, list parcels, word payload, list rings)
    @cython.locals(head=word, block=word, following=word, payload=word, expires=word, n=word,
                   k=word, rec=word, x=word)
    cpdef drain_parcel(self, slot, word now, list out)
    @cython.locals(x=word)
    cpdef bytes _lent_name(self, word rec, slot)
    @cython.locals(block=word)
    cpdef bint free_parcel(self) except -1
    @cython.locals(packed=word, length=word, crc=word, start=word)
    cpdef bytes _read_payload(self, word payload)
    @cython.locals(refs=word)
    cpdef _drop_payload(self, word payload)
    @cython.locals(node=word, expires=word)
    cpdef pop(self, name, word now, word rec=*)
    @cython.locals(x=word, node=word, expires=word)
    cpdef list lend(self, word rec, word now, slot, token, Py_ssize_t limit, Py_ssize_t budget)
    cpdef settle(self, name, handed)
    cpdef put_back(self, name, data, crc, expires, rings)
    @cython.locals(start=word)
    cpdef _write_message(self, word node, word rec, data, word crc, word expires)
    @cython.locals(done=Py_ssize_t, node=word, rec=word)
    cpdef Py_ssize_t expire(self, word now, Py_ssize_t limit) except -1
    @cython.locals(node=word)
    cpdef _collect_doorbells(self, word rec, name, list rings)
    @cython.locals(base=Py_ssize_t, mask=word, hand=word, passed=Py_ssize_t,
                   dropped=Py_ssize_t, walk=bint, rec=word, steps=Py_ssize_t, following=word)
    cpdef sweep(self, word now, Py_ssize_t buckets, Py_ssize_t limit)
