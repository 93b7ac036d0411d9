# Compiled declarations for lent.py (Cython pure-Python mode: lent.py stays the source).

from .clock cimport now_ms

cdef Py_ssize_t H_EPOCH, H_FLUSHING
cdef bint GUARD_CALLS

cdef class LentBook:
    cdef object _w
    cdef object _clock
    cdef object _on_unsettled
    cdef object _guard
    cdef object _acquire
    cdef object _release
    cdef public dict channels
    cdef public dict unsettled
    cdef public object epoch

    cpdef take(self, bytes channel)
    cdef _take(self, bytes channel, now)
    cdef _lend_in(self, epoch)
