# Compiled declarations for clock.py (Cython pure-Python mode: clock.py stays the source).

cdef object _time_ns

cpdef object now_ms()
