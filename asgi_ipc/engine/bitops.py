"""``bit_length``, which the allocator's bins are computed with. Compiled, the engine's modules
cimport it from bitops.pxd instead, where it is one instruction on a C integer (this module
stays pure Python: only the declaration in the .pxd is compiled, into each module using it)."""

from __future__ import annotations


def bit_length(x: int) -> int:
    """The number of bits of the non-negative ``x``: ``x.bit_length()``."""
    return x.bit_length()
