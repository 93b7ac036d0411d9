"""The multi-host layer: shared memory within a host, Redis between hosts.

``MultiHostChannelLayer`` (layer.py) is the layer; relay.py moves each host's inbox into its
store; redis_side.py holds the keys, scripts and client. Imports run one way: from here to
the single-host layer (layer.py, receiver.py) and the engine, never back. redis-py is an
optional dependency (``pip install asgi_ipc[redis]``): without it this package imports, and
building the layer says what to install.
"""

from .errors import RedisUnavailable
from .layer import MultiHostChannelLayer

__all__ = ["MultiHostChannelLayer", "RedisUnavailable"]
