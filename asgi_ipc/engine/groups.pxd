# Compiled declarations for groups.py (Cython pure-Python mode: groups.py stays the source).
# Locals are typed by the rule of heap.pxd: words from the store, and the addresses computed
# from them, unsigned long long with overflow checked; counts Py_ssize_t. Times given by the
# caller (now, oldest) stay Python integers, as does the inspection (verify).

cimport cython

from .heap cimport MIN_BLOCK, Heap
from .index cimport MAX_CHAIN, ChainedIndex, KeyedHash, words_for
from .journal cimport Journal

ctypedef unsigned long long word

cdef Py_ssize_t G_NEXT, G_HASH, G_FIRST, G_LAST, G_MEMBERS, G_NAME_LENGTH, G_NAME
cdef Py_ssize_t B_NEXT, B_HASH, B_GROUP, B_LIST_NEXT, B_LIST_PREV, B_ADDED, B_NAME_LENGTH
cdef Py_ssize_t B_NAME, L_NEXT, L_PREVIOUS, LINK_WORDS, SWEEP_PER_GROUP
# From layout.py.
cdef Py_ssize_t H_GROUPS, H_MEMBERSHIPS, H_SWEEP_GROUP, WORD

cdef class GroupStore:
    cdef unsigned long long[::1] _w
    cdef object _b
    cdef Journal _j
    cdef public Heap heap
    cdef ChainedIndex _groups
    cdef ChainedIndex _members
    cdef KeyedHash _hash
    cdef object _most_records

    cpdef word find(self, bytes group) except? 0
    cpdef _membership(self, bytes group, bytes channel, word rec)
    @cython.locals(last=word)
    cpdef _link_last(self, word rec, word member, word added)
    @cython.locals(before=word, after=word)
    cpdef _unlink(self, word rec, word member)
    @cython.locals(n=word, start=word)
    cpdef word link_part(self, word member) except? 0
    cpdef word _part(self, word member) except? 0
    @cython.locals(first=word)
    cpdef _link_to_channel(self, word member, word x, word head)
    @cython.locals(at=word, after=word)
    cpdef _unlink_from_channel(self, word member, word x)
    @cython.locals(x=word)
    cpdef _remove_member(self, word rec, word member, group)
    @cython.locals(member=word, last=bint)
    cpdef bint _drop_expired(self, word rec, group, oldest, Py_ssize_t limit) except -1
    @cython.locals(rec=word, last=word, member=word, linked=bint, x=word)
    cpdef add(self, bytes group, bytes channel, now, word channel_list=*)
    @cython.locals(rec=word, x=word)
    cpdef remove(self, word member)
    @cython.locals(rec=word, member=word)
    cpdef discard(self, bytes group, bytes channel)
    @cython.locals(rec=word, member=word, limit=Py_ssize_t)
    cpdef members(self, bytes group, oldest)
    @cython.locals(hand=word, rec=word, steps=Py_ssize_t, following=word)
    cpdef sweep(self, oldest)
