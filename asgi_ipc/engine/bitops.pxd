# The compiled counterpart of bitops.py, cimported as a module (``from . cimport bitops``) by
# the modules that ``from . import bitops``: ``bitops.bit_length(x)`` then compiles to this C
# function of an unsigned 64-bit word rather than a call into Python.

cdef extern from *:
    """
    static inline int asgi_ipc_bit_length(unsigned long long x) {
        return x ? 64 - __builtin_clzll(x) : 0;
    }
    """
    int bit_length "asgi_ipc_bit_length" (unsigned long long x) noexcept nogil
