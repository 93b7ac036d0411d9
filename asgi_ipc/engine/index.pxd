# Compiled declarations for index.py (Cython pure-Python mode: index.py stays the source).
# As in heap.pxd, only attributes and methods are typed; the locals stay Python integers.

from .heap cimport Heap
from .journal cimport Journal

cdef class ChainedIndex:
    cdef unsigned long long[::1] _w
    cdef object _b
    cdef Journal _j
    cdef Heap _heap
    cdef public Py_ssize_t base
    cdef public object mask
    cdef Py_ssize_t _length
    cdef object _what

    cpdef loops(self)
    cpdef find(self, name, h)
    cpdef find_owned(self, name, h, owner_field, owner)
    cpdef insert(self, name, h, extra=*)
    cpdef unchain(self, rec)
    cpdef name_of(self, rec)
