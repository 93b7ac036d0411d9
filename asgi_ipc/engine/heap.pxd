# Compiled declarations for heap.py (Cython pure-Python mode: heap.py stays the source).
# Only the attributes and the methods are typed: the locals stay Python integers, so every
# value read from a (possibly corrupt) store is compared and added exactly as in pure Python;
# a huge or negative index then fails the view's bounds check (IndexError, OverflowError).

from .journal cimport Journal

cpdef _bin(size)
cpdef _lowest_bit(mask)

cdef class Heap:
    cdef unsigned long long[::1] _w
    cdef Journal _j
    cdef Py_ssize_t _meta
    cdef Py_ssize_t _bins
    cdef Py_ssize_t _mark
    cdef object _reserve_words
    cdef public Py_ssize_t start
    cdef public Py_ssize_t end

    cpdef _insert(self, block, size, carved=*)
    cpdef _remove(self, block, size)
    cpdef _replace(self, old, old_size, new, new_size, carved)
    cpdef _find(self, size)
    cpdef _find_in_own_bin(self, size)
    cpdef _reserve(self, upto)
    cpdef alloc(self, payload_words)
    cpdef alloc_run(self, payload_words, count)
    cpdef free(self, block)
