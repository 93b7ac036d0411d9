"""The engine: a prefix's store as one process sees it, with no asyncio and no sockets.

``Engine`` (store.py) is the store as one process uses it, one synchronous method per lock
hold. Its parts, a module each: the segment and its creation (segment.py, layout.py), the
global lock and the byte locks (lock.py), the undo journal (journal.py), the allocator
(heap.py), the chained hash index (index.py), the channel queues (queues.py), the groups
(groups.py), the process slots (slots.py) and the messages lent to this process (lent.py).
compiled.py picks whether the compiled modules or the pure-Python ones are loaded, so it is
imported first. Imports run one way: from here down.
"""

from .compiled import ENGINE  # first: it picks where the engine's parts load from
from .lent import LentBook, Shared
from .store import (
    BACK,
    BEFORE_PARCELS,
    NO_ROOM,
    OUT_OF_MEMORY,
    OVER_CAPACITY,
    QUEUED,
    SWEEP_BUCKETS_PER_SEND,
    Engine,
    Seat,
    Taken,
    now_ms,
    open_engine,
)

__all__ = [
    "BACK", "BEFORE_PARCELS", "ENGINE", "NO_ROOM", "OUT_OF_MEMORY", "OVER_CAPACITY", "QUEUED",
    "SWEEP_BUCKETS_PER_SEND", "Engine", "LentBook", "Seat", "Shared", "Taken", "now_ms",
    "open_engine",
]
