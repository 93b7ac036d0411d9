"""asgi_ipc: a Django Channels layer over POSIX shared memory, for processes of one machine."""

from .exceptions import (
    ForeignObject,
    GroupMemoryFull,
    SharedMemoryTooSmall,
    StoreClosed,
    StoreCorrupted,
    StoreError,
)
from .layer import IPCChannelLayer
from .segment import unlink

__version__ = "2.1.0"

__all__ = [
    "ForeignObject",
    "GroupMemoryFull",
    "IPCChannelLayer",
    "SharedMemoryTooSmall",
    "StoreClosed",
    "StoreCorrupted",
    "StoreError",
    "unlink",
]
