"""The multi-host layer's own error, importable without redis-py."""

from __future__ import annotations


class RedisUnavailable(ConnectionError):
    """Redis did not answer within the layer's ``redis_timeout``, or refused: the operation,
    which needs Redis, may or may not have happened."""
