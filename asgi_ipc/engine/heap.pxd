# Compiled declarations for heap.py (Cython pure-Python mode: heap.py stays the source).
#
# The rule for every typed local of the engine (heap, index, queues, groups, journal): a word
# read from the store, and any address or size computed from one, is an unsigned long long;
# counts, loop counters and offsets the engine itself computes (a bin, a bucket, a field) are
# Py_ssize_t. setup.py compiles with overflowcheck, so arithmetic on a word that would pass
# 2**64 or go below 0 raises OverflowError instead of wrapping round, and an address below
# 2**64 but past the view fails the view's bounds check (IndexError): a corrupt word raises
# (the store reports it as StoreCorrupted), as it does in pure Python, and never lands on a
# valid-looking word. Where pure Python compares a possibly corrupt word and goes on (returns
# False, or raises StoreCorrupted itself), the comparison is written so that it adds nothing
# to the word (``prev_size > block - start``, ``block >= end - P_DATA``): both engines then
# decide alike. Words are never turned into signed integers, so none reads as negative.
#
# The layout constants are C variables too (declared below; the .py assigns them), which the
# .py also makes module attributes for whoever imports them.

cimport cython

from . cimport bitops
from .journal cimport Journal

cdef unsigned long long USED, PREV_USED
cdef Py_ssize_t MIN_BLOCK, SL_BITS, FIRST_LEVELS, M_FL_BITMAP, M_SL_BITMAP, M_BINS
cdef Py_ssize_t EXACT_BIN_STEPS

@cython.locals(bits=int)
cpdef Py_ssize_t _bin(unsigned long long size) except -1
cpdef int _lowest_bit(unsigned long long mask) except -2

cdef class Heap:
    cdef unsigned long long[::1] _w
    cdef Journal _j
    cdef Py_ssize_t _meta
    cdef Py_ssize_t _bins
    cdef Py_ssize_t _mark
    cdef object _reserve_words
    cdef public Py_ssize_t start
    cdef public Py_ssize_t end

    @cython.locals(idx=Py_ssize_t, bin_word=Py_ssize_t, head=cython.ulonglong,
                   sl_word=Py_ssize_t, sl_map=cython.ulonglong, fl_word=Py_ssize_t)
    cpdef _insert(self, unsigned long long block, unsigned long long size, bint carved=*)
    @cython.locals(nxt=cython.ulonglong, prv=cython.ulonglong, idx=Py_ssize_t,
                   sl_word=Py_ssize_t, sl_map=cython.ulonglong, fl_word=Py_ssize_t)
    cpdef _remove(self, unsigned long long block, unsigned long long size)
    @cython.locals(idx=Py_ssize_t, nxt=cython.ulonglong, prv=cython.ulonglong)
    cpdef _replace(self, unsigned long long old, unsigned long long old_size,
                   unsigned long long new, unsigned long long new_size, bint carved)
    @cython.locals(bits=int, wanted=cython.ulonglong, idx=Py_ssize_t, fl=Py_ssize_t,
                   sl=Py_ssize_t, sl_map=cython.ulonglong, fl_map=cython.ulonglong)
    cpdef unsigned long long _find(self, unsigned long long size) except? 0
    @cython.locals(block=cython.ulonglong)
    cpdef unsigned long long _find_in_own_bin(self, unsigned long long size) except? 0
    @cython.locals(mark=cython.ulonglong)
    cpdef bint _reserve(self, unsigned long long upto) except -1
    @cython.locals(size=cython.ulonglong, block=cython.ulonglong, header=cython.ulonglong,
                   free_size=cython.ulonglong, rest=cython.ulonglong, after=cython.ulonglong)
    cpdef unsigned long long alloc(self, unsigned long long payload_words) except? 0
    @cython.locals(size=cython.ulonglong, block=cython.ulonglong, header=cython.ulonglong,
                   sub=cython.ulonglong, last=cython.ulonglong)
    cpdef list alloc_run(self, unsigned long long payload_words, Py_ssize_t count)
    @cython.locals(header=cython.ulonglong, size=cython.ulonglong, start=cython.ulonglong,
                   total=cython.ulonglong, prev_used=cython.ulonglong, after=cython.ulonglong,
                   after_header=cython.ulonglong, after_size=cython.ulonglong,
                   prev_size=cython.ulonglong, prev=cython.ulonglong)
    cpdef free(self, unsigned long long block)
