# Compiled declarations for journal.py (Cython pure-Python mode: journal.py stays the source).
# The word view is unsigned, as the store's words are; the index and value of a journaled write
# are unsigned too, so a huge word used as an index fails the bounds check instead of becoming
# a negative one (the rule of heap.pxd).

cimport cython

# From layout.py.
cdef Py_ssize_t H_JOURNAL_COUNT, JOURNAL_ENTRIES

cdef class Journal:
    cdef unsigned long long[::1] _w
    cdef Py_ssize_t _base
    cdef Py_ssize_t _count
    cdef public bint freed
    cdef public object commits
    cdef public object hook
    cdef public object commit_hook

    @cython.locals(entry=Py_ssize_t, n=Py_ssize_t)
    cpdef void set(self, unsigned long long index, unsigned long long value) except *
    # The sum stays a Python integer: a counter wraps round modulo 2**64 by design.
    cpdef void add(self, unsigned long long index, n=*) except *
    @cython.locals(entry=Py_ssize_t, n=Py_ssize_t)
    cpdef void keep(self, unsigned long long index) except *
    cpdef begin(self)
    cpdef void step(self) except *
    cpdef void checkpoint(self) except *
    cpdef void commit(self) except *
