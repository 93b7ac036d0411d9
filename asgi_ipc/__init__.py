"""asgi_ipc: a Django Channels layer over POSIX shared memory, for processes of one machine."""

from .exceptions import (
    ForeignObject,
    GroupMemoryFull,
    SharedMemoryTooSmall,
    StoreClosed,
    StoreCorrupted,
    StoreError,
    StoreInUse,
    UnsupportedPlatform,
)
from .host import refusal

try:
    from .engine import ENGINE
    from .engine.segment import unlink
    from .layer import IPCChannelLayer
except ModuleNotFoundError as missing:
    # Windows has no fcntl: say what the layer needs rather than which module is missing.
    why = refusal()
    if why is None:
        raise
    raise UnsupportedPlatform(why) from missing

__version__ = "2.2.0"


def __getattr__(name: str) -> object:
    # Imported on first use: the multi-host layer is the one part that needs redis-py.
    if name == "MultiHostChannelLayer":
        from .multihost import MultiHostChannelLayer

        return MultiHostChannelLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENGINE",
    "ForeignObject",
    "GroupMemoryFull",
    "IPCChannelLayer",
    "MultiHostChannelLayer",
    "SharedMemoryTooSmall",
    "StoreClosed",
    "StoreCorrupted",
    "StoreError",
    "StoreInUse",
    "UnsupportedPlatform",
    "unlink",
]
