"""The store's clock: milliseconds since the epoch, the unit of every expiry the store keeps.

Every lock hold reads it (``one_hold`` in store.py), and so does every receive of a message lent
to this process (lent.py). Compiled (compiled.py), a read is one C call from those modules:
0.05 us, against 0.12 us for the same function in Python.
"""

from __future__ import annotations

import time

_time_ns = time.time_ns


def now_ms() -> int:
    """The default clock of an engine (``Engine(clock=...)`` replaces it)."""
    return _time_ns() // 1_000_000
