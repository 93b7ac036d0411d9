"""asgi_ipc: a Django Channels layer over POSIX shared memory, for processes of one machine."""

from .engine import ENGINE
from .engine.segment import unlink
from .exceptions import (
    ForeignObject,
    GroupMemoryFull,
    SharedMemoryTooSmall,
    StoreClosed,
    StoreCorrupted,
    StoreError,
    StoreInUse,
)
from .layer import IPCChannelLayer

__version__ = "2.2.0"

__all__ = [
    "ENGINE",
    "ForeignObject",
    "GroupMemoryFull",
    "IPCChannelLayer",
    "SharedMemoryTooSmall",
    "StoreClosed",
    "StoreCorrupted",
    "StoreError",
    "StoreInUse",
    "unlink",
]
