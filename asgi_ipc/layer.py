"""IPCChannelLayer: the Django Channels layer whose store is shared memory on this machine."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import msgpack
from channels.exceptions import ChannelFull, MessageTooLarge
from channels.layers import BaseChannelLayer

from .layout import validate_prefix
from .store import OUT_OF_MEMORY, OVER_CAPACITY, Store

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_MESSAGE_BYTES = MiB
MIN_MEMORY = 64 * 1024


def _positive(name: str, value: Any, minimum: float = 0) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        raise ValueError(f"{name} must be a number above {minimum}, not {value!r}")
    return value


class IPCChannelLayer(BaseChannelLayer):
    """A channel layer shared by every process of this machine that uses the same ``prefix``."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        prefix: str = "asgi",
        channel_memory: int = 100 * MiB,
        group_memory: int = 20 * MiB,
        expiry: float = 60,
        group_expiry: float = 86400,
        capacity: int = 100,
        channel_capacity: dict | None = None,
    ) -> None:
        super().__init__(expiry=_positive("expiry", expiry), capacity=capacity)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a whole number of at least 1, not {capacity!r}")
        self.prefix = validate_prefix(prefix)
        for name, value in (("channel_memory", channel_memory), ("group_memory", group_memory)):
            if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MEMORY:
                raise ValueError(f"{name} must be a whole number of bytes >= {MIN_MEMORY}")
        self.channel_memory = channel_memory
        self.group_memory = group_memory
        self.group_expiry = _positive("group_expiry", group_expiry)
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self._store: Store | None = None
        self._opening = threading.Lock()

    def _open(self) -> Store:
        store = self._store
        if store is None:
            with self._opening:
                store = self._store
                if store is None:
                    store = self._store = Store(
                        self.prefix, self.channel_memory, self.group_memory
                    )
        return store

    def _serialize(self, message: Any, destination: str) -> bytes:
        if not isinstance(message, dict):
            raise TypeError(
                f"message for {destination} must be a dict, not {type(message).__name__}"
            )
        try:
            data = msgpack.packb(message, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(
                f"message for {destination} cannot be serialised with msgpack: {exc}"
            ) from exc
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(
                f"message for {destination} is {len(data)} bytes serialised; the limit is "
                f"{MAX_MESSAGE_BYTES}"
            )
        return data

    @staticmethod
    def _deserialize(data: bytes) -> dict:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    def _capacity_of(self, channel: bytes) -> int:
        if not self.channel_capacity:
            return self.capacity
        return self.get_capacity(channel.decode("ascii"))

    # --- the channel layer contract --------------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        """Queue ``message`` on ``channel``; raises ChannelFull if it is at capacity."""
        self.require_valid_channel_name(channel)
        data = self._serialize(message, f"channel {channel!r}")
        name = channel.encode("ascii")
        result = self._open().send(name, data, self._capacity_of(name), int(self.expiry * 1000))
        if result == OVER_CAPACITY:
            raise ChannelFull(f"channel {channel!r} is at capacity ({self._capacity_of(name)})")
        if result == OUT_OF_MEMORY:
            raise ChannelFull(
                f"no room for a {len(data)}-byte message in the channel memory of prefix "
                f"{self.prefix!r} ({self.channel_memory} bytes)"
            )

    async def receive(self, channel: str) -> dict:
        """Wait for the next message on ``channel``. Cancelling the wait loses no message."""
        self.require_valid_channel_name(channel)
        data = await self._open().receive(channel.encode("ascii"))
        return self._deserialize(data)

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A channel name no other process on this machine will ever return."""
        name = f"{prefix}ipc!{uuid.uuid4().hex}"
        self.require_valid_channel_name(name)
        return name

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        self._open().group_add(group.encode("ascii"), channel.encode("ascii"))

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        self._open().group_discard(group.encode("ascii"), channel.encode("ascii"))

    async def group_send(self, group: str, message: dict) -> None:
        """Queue ``message`` on every member of ``group``; full members are skipped."""
        self.require_valid_group_name(group)
        data = self._serialize(message, f"group {group!r}")
        members, skipped = self._open().group_send(
            group.encode("ascii"),
            data,
            self._capacity_of,
            int(self.expiry * 1000),
            int(self.group_expiry * 1000),
        )
        if skipped:
            logger.info("%s of %s channels over capacity in group %s", skipped, members, group)

    async def flush(self) -> None:
        """Empty every channel and group of the prefix, for every process."""
        self._open().flush()

    async def close(self) -> None:
        """Release this process's handles on the store; its contents stay. Every receive of
        this layer still waiting, in any event loop or thread, raises ``StoreClosed``; the
        layer's next call opens the store again."""
        with self._opening:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def __str__(self) -> str:
        return f"{type(self).__name__}(prefix={self.prefix!r})"
