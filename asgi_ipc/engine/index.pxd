# Compiled declarations for index.py (Cython pure-Python mode: index.py stays the source).
# Locals are typed by the rule of heap.pxd: words from the store unsigned long long, with
# overflow checked, counts Py_ssize_t.

cimport cython

from .heap cimport Heap
from .journal cimport Journal

cdef Py_ssize_t NEXT, HASH, MAX_CHAIN, WORD

cpdef Py_ssize_t words_for(Py_ssize_t nbytes) except? -1

cdef class KeyedHash:
    cdef bytes _key
    cdef dict _cache
    cdef Py_ssize_t _cache_size

    cpdef object of(self, bytes name)

cdef class ChainedIndex:
    cdef unsigned long long[::1] _w
    cdef object _b
    cdef Journal _j
    cdef Heap _heap
    cdef public Py_ssize_t base
    cdef public unsigned long long mask
    cdef Py_ssize_t _length
    cdef object _what

    cpdef loops(self)
    @cython.locals(length=Py_ssize_t, rec=cython.ulonglong, steps=Py_ssize_t, n=Py_ssize_t,
                   start=cython.ulonglong)
    cpdef unsigned long long find(self, bytes name, unsigned long long h) except? 0
    @cython.locals(length=Py_ssize_t, rec=cython.ulonglong, steps=Py_ssize_t, n=Py_ssize_t)
    cpdef unsigned long long find_owned(self, bytes name, unsigned long long h,
                                        Py_ssize_t owner_field,
                                        unsigned long long owner) except? 0
    @cython.locals(length=Py_ssize_t, named=Py_ssize_t, rec=cython.ulonglong,
                   bucket=Py_ssize_t, k=Py_ssize_t, start=cython.ulonglong)
    cpdef unsigned long long insert(self, bytes name, unsigned long long h,
                                    Py_ssize_t extra=*) except? 0
    @cython.locals(at=cython.ulonglong, steps=Py_ssize_t)
    cpdef unchain(self, unsigned long long rec)
    cpdef name_of(self, unsigned long long rec)
