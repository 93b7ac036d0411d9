"""asgi_ipc: a Django Channels layer over POSIX shared memory, for processes of one machine."""

from .exceptions import GroupMemoryFull, StoreCorrupted, StoreError
from .layer import IPCChannelLayer
from .segment import unlink

__version__ = "2.0.0"

__all__ = ["GroupMemoryFull", "IPCChannelLayer", "StoreCorrupted", "StoreError", "unlink"]
