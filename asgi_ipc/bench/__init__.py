"""``asgi-ipc bench``: asgi_ipc measured against channels_redis and InMemoryChannelLayer."""

from .workloads import main

__all__ = ["main"]
