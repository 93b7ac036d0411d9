"""Exceptions of asgi_ipc beyond the ones Channels defines.

``channels.exceptions.ChannelFull`` and ``MessageTooLarge`` are raised as they are, so that code
written for any channel layer catches them unchanged; the ones here describe the store itself.
"""


class StoreError(Exception):
    """Base class of the errors about a prefix's shared-memory store."""


class StoreCorrupted(StoreError):
    """The shared-memory object is not a usable asgi_ipc store: foreign, truncated, of another
    layout version, or with inconsistent contents."""


class ForeignObject(StoreError):
    """A path the layer would use (its store, or its wake-up directory or sockets) exists but is
    not a private object of this user of the expected type: a symlink, another user's, or open
    to other users. Nothing was read from it or written into it."""


class SharedMemoryTooSmall(StoreError):
    """The tmpfs of /dev/shm has no room for the store this process would create: it names the
    sizes and how to give /dev/shm more room or configure a smaller store, or, when no inode is
    left for the store's file, the inodes in use and how to find what takes them. Nothing is
    left behind."""


class StoreInUse(StoreError):
    """``unlink(prefix, unless_in_use=True)`` found the store open in other processes, in
    whatever PID namespace; nothing was removed. ``attached``: how many processes have it open;
    ``waiting``: how many process slots are held, one per layer that waits in receive()."""

    def __init__(self, message: str, attached: int, waiting: int) -> None:
        super().__init__(message)
        self.attached = attached
        self.waiting = waiting


class StoreClosed(StoreError):
    """The layer's store was closed (``IPCChannelLayer.close()``) while a receive waited on it,
    or before it was called. The layer itself opens its store again on its next call."""


class UnsupportedPlatform(RuntimeError):
    """The layer cannot run on this machine: not Linux, or a Linux without what it needs. The
    message names what the layer needs, what is missing, and what to use instead."""


class GroupMemoryFull(StoreError):
    """``group_add`` found no room left in the group memory area."""
