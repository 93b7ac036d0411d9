"""IPCChannelLayer: the Django Channels layer whose store is shared memory on this machine.

Input rules, enforced here so that nothing wrong reaches the store:

- Options are checked when the layer is built (``config_problems``, which the Django system check
  in ``checks.py`` runs too): a bad value raises ValueError naming the option, the value and what
  is accepted; an option the layer does not know raises TypeError, with what to do instead for
  those only channels_redis knows. So a configuration mistake never surfaces later, on a send,
  disguised as ``StoreCorrupted``. The bounds are in ``MIN_MEMORY``... ``MAX_CAPACITY``.
- Names: every name Channels' own validation accepts works. Its patterns use ``\\d`` and ``\\w``,
  so names may hold non-ASCII digits and letters, and ``$`` lets a trailing newline through; the
  store keeps names as UTF-8 bytes of any length, and the 99-character limit is Channels' (in
  characters). A name with a newline is still woken: the wake-up datagram joins names with
  newlines, and the empty piece such a name splits into means "look at every channel".
- Messages: what ``send`` and ``group_send`` accept, ``receive`` returns. msgpack packs some
  messages its unpacker then refuses (a tuple as a dict key arrives as a list, which cannot be a
  key; nesting one level deeper than the unpacker's stack); such a message would be taken out of
  the store and lost at ``receive``. So each message is decoded once at send, by the very function
  ``receive`` uses (or skimmed, when that is equivalent and cheaper: see ``SKIM_FROM``), and
  refused with a TypeError naming the offending value if that fails. Tuples arrive as lists,
  subclasses of dict, str, int, bytes as their base type, as with channels_redis.
"""

from __future__ import annotations

import difflib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import msgpack
from channels.exceptions import ChannelFull, MessageTooLarge
from channels.layers import BaseChannelLayer

from .engine import OUT_OF_MEMORY, OVER_CAPACITY, Engine, Shared, now_ms
from .engine.layout import PREFIX_RULE, validate_prefix
from .host import require_supported
from .receiver import CHECK_INTERVAL, Receiver

logger = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
MAX_MESSAGE_BYTES = MiB
# Each memory area: at least 64 KiB (the layer's minimum since 2.0; a 1 MiB message needs a
# little more than 1 MiB of channel memory), at most 1 TiB: more than any machine's /dev/shm, and
# well inside what the allocator's size classes reach (blocks of up to 2**42 words).
MIN_MEMORY = 64 * KiB
MAX_MEMORY = 1 << 40
# Expiries in seconds. At least a millisecond, since the store counts whole milliseconds and a
# shorter one would expire every message as it is sent. At most 10**12 s (31 700 years): its
# 10**15 ms is a whole number a float still counts exactly (below 2**53), and the time of expiry,
# now plus that, fits the store's 64-bit words with four orders of magnitude to spare.
MIN_EXPIRY = 0.001
MAX_EXPIRY = 10**12
# Channel names checked and encoded already, remembered by each layer up to this many: a
# consumer receives on the same few names again and again, and the check is a regular
# expression.
NAME_CACHE = 1 << 16
# Values that a copy of a decoded dict may share with it: nothing can change them in place.
_IMMUTABLE = frozenset((str, bytes, int, float, bool, type(None)))
# A channel's message count is a 64-bit word.
MAX_CAPACITY = (1 << 63) - 1
_CAPACITY_RULE = "a whole number of messages from 1 to 2**63 - 1"

# Options of channels_redis that mean nothing here, and what to do instead.
REDIS_ONLY_OPTIONS = {
    "hosts": "asgi_ipc needs no server: every process of this machine that uses the same "
    "`prefix` shares the layer. Remove `hosts` (to reach other machines, use channels_redis)",
    "symmetric_encryption_keys": "messages never leave this machine and the store is readable "
    "by its owner only (mode 0600). Remove `symmetric_encryption_keys`",
    "serializer_format": "asgi_ipc always stores messages as msgpack. Remove `serializer_format`",
    "random_prefix_length": "new_channel() names already end in a random UUID. Remove "
    "`random_prefix_length`",
    "on_disconnect": "there is no connection to lose. Remove `on_disconnect`",
    "on_reconnect": "there is no connection to lose. Remove `on_reconnect`",
    "channel_layer": "that is an option of channels_redis' pub/sub layer. Remove `channel_layer`",
}


class ConfigProblem(NamedTuple):
    """One thing wrong with a layer's options: ``kind`` is "value" (a ValueError), "unknown" or
    "channels_redis" (a TypeError); ``message`` names the option and the value, ``hint`` says
    what is accepted or what to do instead."""

    option: str
    kind: str
    message: str
    hint: str

    def error(self) -> Exception:
        kind = ValueError if self.kind == "value" else TypeError
        return kind(f"{self.message}: {self.hint}")


def _bad_value(option: str, value: Any, accepted: str) -> ConfigProblem:
    return ConfigProblem(option, "value", f"invalid asgi_ipc option {option}={value!r}", accepted)


def _whole(option: str, value: Any, low: int, high: int, what: str) -> list[ConfigProblem]:
    """``what`` says what is accepted, bounds included."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return [_bad_value(option, value, f"{option} must be {what}")]
    return []


def _check_prefix(value: Any) -> list[ConfigProblem]:
    try:
        validate_prefix(value)
    except ValueError:
        return [_bad_value("prefix", value, f"prefix must be {PREFIX_RULE}")]
    return []


def _check_memory(option: str) -> Callable[[Any], list[ConfigProblem]]:
    def check(value: Any) -> list[ConfigProblem]:
        return _whole(
            option, value, MIN_MEMORY, MAX_MEMORY,
            "a whole number of bytes from 65536 (64 KiB) to 2**40 (1 TiB)",
        )

    return check


def _check_seconds(option: str) -> Callable[[Any], list[ConfigProblem]]:
    def check(value: Any) -> list[ConfigProblem]:
        # Comparisons are False for NaN, and infinity is above the bound, so both are refused.
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not MIN_EXPIRY <= value <= MAX_EXPIRY
        ):
            return [_bad_value(
                option, value,
                f"{option} must be a number of seconds from {MIN_EXPIRY} to 10**12",
            )]
        return []

    return check


def _check_capacity(value: Any) -> list[ConfigProblem]:
    return _whole("capacity", value, 1, MAX_CAPACITY, _CAPACITY_RULE)


def _check_channel_capacity(value: Any) -> list[ConfigProblem]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [_bad_value(
            "channel_capacity", value,
            "channel_capacity must be a dict of channel name patterns to capacities",
        )]
    problems = []
    for pattern, capacity in value.items():
        if not isinstance(pattern, str) and not hasattr(pattern, "match"):
            problems.append(_bad_value(
                f"channel_capacity[{pattern!r}]", capacity,
                "a pattern must be a glob (str) or a compiled regex",
            ))
        else:
            problems += _whole(
                f"channel_capacity[{pattern!r}]", capacity, 1, MAX_CAPACITY, _CAPACITY_RULE
            )
    return problems


_CHECKS = {
    "prefix": _check_prefix,
    "channel_memory": _check_memory("channel_memory"),
    "group_memory": _check_memory("group_memory"),
    "expiry": _check_seconds("expiry"),
    "group_expiry": _check_seconds("group_expiry"),
    "capacity": _check_capacity,
    "channel_capacity": _check_channel_capacity,
}
OPTIONS = tuple(_CHECKS)


def config_problems(config: Mapping[str, Any]) -> list[ConfigProblem]:
    """Everything wrong with ``config``, the options of an IPCChannelLayer (a CONFIG of
    CHANNEL_LAYERS); empty when the layer would accept them. The layer raises the first."""
    problems: list[ConfigProblem] = []
    for option, value in config.items():
        check = _CHECKS.get(option)
        if check is not None:
            problems += check(value)
        elif option in REDIS_ONLY_OPTIONS:
            problems.append(ConfigProblem(
                option, "channels_redis",
                f"asgi_ipc has no option {option!r} (it is channels_redis')",
                REDIS_ONLY_OPTIONS[option],
            ))
        else:
            close = difflib.get_close_matches(str(option), OPTIONS, n=1)
            advice = f"did you mean {close[0]!r}? " if close else ""
            problems.append(ConfigProblem(
                str(option), "unknown", f"asgi_ipc has no option {option!r}",
                f"{advice}The options are: {', '.join(OPTIONS)}",
            ))
    return problems


def _undecodable_part(message: dict) -> str | None:
    """What in ``message`` msgpack cannot bring back, found by a walk (for an error only)."""
    deepest, deepest_key = 0, None
    stack: list[tuple[Any, int, Any]] = [(message, 1, None)]
    while stack:
        value, depth, top = stack.pop()
        if isinstance(value, dict):
            items: Iterable[tuple[Any, Any]] = value.items()
        elif isinstance(value, (list, tuple)):
            items = ((None, item) for item in value)
        else:
            continue
        if depth > deepest:
            deepest, deepest_key = depth, top
        for key, item in items:
            if isinstance(key, (list, tuple, dict)):
                return (
                    f"the dict key {key!r} would arrive as a list, which cannot be a dict key; "
                    "use str keys"
                )
            stack.append((item, depth + 1, key if top is None and depth == 1 else top))
    if deepest > 1:
        return f"it nests {deepest} containers deep (under the key {deepest_key!r})"
    return None


# Packing with strict_types refuses tuples and subclasses of dict, list, str, int...: a message
# it packs holds no tuple, so none of its dict keys can come back as a list, and the one way its
# unpacking can fail is nesting too deep, which skimming it (Unpacker.skip, which builds no
# objects) finds. Messages only the lenient packer takes are decoded in full. Measured on one
# core, what the check adds to packing: a small message 0.4 us (decoded: below SKIM_FROM bytes
# that is cheaper than skimming); 1 MB of bytes or of text 25 us; 1 MB made of 55 000 small
# dicts well under 1 ms, where decoding it would take 20 ms.
SKIM_FROM = 4096


def _decode(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _skim(data: bytes) -> None:
    unpacker = msgpack.Unpacker(max_buffer_size=len(data))
    unpacker.feed(data)
    unpacker.skip()


class IPCChannelLayer(BaseChannelLayer):
    """A channel layer shared by every process of this machine that uses the same ``prefix``.

    Built on a machine that lacks what it needs (anything but Linux), it raises
    ``UnsupportedPlatform`` saying what to use instead (host.py).

    For tests and tools: ``engine()`` is the store's engine (engine/store.py), opened on
    first use, through which the store can be read or changed one lock hold at a time;
    ``receiver()`` is the asyncio side around it (receiver.py: its ``doorbell``, say); and
    ``clock`` (milliseconds since the epoch, which expiries count from) and ``check_interval``
    (seconds between the checks that make up for lost rings, see receiver.py) are read when
    the store is opened: set them before the layer's first call, or after ``close()``."""

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
        **other: Any,
    ) -> None:
        require_supported()
        given = {
            "prefix": prefix,
            "channel_memory": channel_memory,
            "group_memory": group_memory,
            "expiry": expiry,
            "group_expiry": group_expiry,
            "capacity": capacity,
            "channel_capacity": channel_capacity,
            **other,
        }
        problems = config_problems(given)
        if problems:
            raise problems[0].error()
        super().__init__(expiry=expiry, capacity=capacity)
        self.prefix = prefix
        self.channel_memory = channel_memory
        self.group_memory = group_memory
        self.group_expiry = group_expiry
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.clock = now_ms
        self.check_interval = CHECK_INTERVAL
        self._store: Receiver | None = None
        self._opening = threading.Lock()
        self._names: dict[str, bytes] = {}

    def receiver(self) -> Receiver:
        """The receiver of this layer's store, opening the store if need be."""
        return self._open()

    def _open(self) -> Receiver:
        store = self._store
        if store is None:
            with self._opening:
                store = self._store
                if store is None:
                    store = self._store = Receiver(
                        self.prefix, self.channel_memory, self.group_memory,
                        clock=self.clock, check_interval=self.check_interval,
                    )
        return store

    def engine(self) -> Engine:
        """The engine of this layer's store, opening the store if need be."""
        return self._open().engine

    def _serialize(self, message: Any, destination: str) -> bytes:
        """``message`` packed, once it is sure that ``receive`` can unpack it (see the module
        docstring); TypeError naming the value if not, MessageTooLarge past the limit."""
        if not isinstance(message, dict):
            raise TypeError(
                f"message for {destination} must be a dict, not {type(message).__name__}"
            )
        try:
            data = msgpack.packb(message, use_bin_type=True, strict_types=True)
            plain = True
        except (TypeError, ValueError, OverflowError):
            # A tuple, a subclass, or something msgpack cannot pack at all.
            try:
                data = msgpack.packb(message, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                raise TypeError(
                    f"message for {destination} cannot be serialised with msgpack: {exc}"
                ) from exc
            plain = False
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(
                f"message for {destination} is {len(data)} bytes serialised; the limit is "
                f"{MAX_MESSAGE_BYTES}"
            )
        try:
            if plain and len(data) >= SKIM_FROM:
                _skim(data)
            else:
                _decode(data)
        except (TypeError, ValueError) as exc:
            why = _undecodable_part(message) or f"msgpack cannot decode it ({exc!r})"
            raise TypeError(
                f"message for {destination} could not be received as sent: {why}"
            ) from exc
        return data

    @staticmethod
    def _deserialize(data: bytes) -> dict:
        """``data`` decoded. The message of a group_send that lent it to this process in a
        parcel comes once per member here, as one object (``Shared``): decoded the first time,
        and copied for the others when every value in it is immutable (a copy is then what
        decoding gives: a dict of their own), else decoded for each."""
        if type(data) is not Shared:
            return _decode(data)
        model = data.model
        if isinstance(model, dict):
            return model.copy()
        message = _decode(data)
        if model is None:
            flat = all(type(value) in _IMMUTABLE for value in message.values())
            data.model = message.copy() if flat and message else False
        return message

    def _channel_name(self, channel: str) -> bytes:
        """``channel``, checked as Channels checks it, encoded as the store keeps it."""
        name = self._names.get(channel) if type(channel) is str else None
        if name is None:
            self.require_valid_channel_name(channel)
            name = channel.encode()
            if type(channel) is str:
                if len(self._names) >= NAME_CACHE:
                    self._names.clear()
                self._names[channel] = name
        return name

    def _capacity_of(self, channel: bytes) -> int:
        if not self.channel_capacity:
            return self.capacity
        return self.get_capacity(channel.decode())

    # --- the channel layer contract --------------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        """Queue ``message`` on ``channel``; raises ChannelFull if it is at capacity."""
        name = self._channel_name(channel)
        data = self._serialize(message, f"channel {channel!r}")
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
        name = self._channel_name(channel)
        store = self._open()
        data = store.ready(name)
        if data is None:
            data = await store.receive(name)
        return self._deserialize(data)

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A channel name no other process on this machine will ever return, owned by this
        process: when it exits (``close()``) or dies, the channel's messages and memberships
        are removed (see receiver.py)."""
        name = f"{prefix}ipc!{uuid.uuid4().hex}"
        self.require_valid_channel_name(name)
        self._open().own(name.encode())
        return name

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self._open().group_add(group.encode(), self._channel_name(channel))

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self._open().group_discard(group.encode(), self._channel_name(channel))

    async def group_send(self, group: str, message: dict) -> None:
        """Queue ``message`` on every member of ``group``; full members are skipped."""
        self.require_valid_group_name(group)
        data = self._serialize(message, f"group {group!r}")
        members, skipped = self._open().group_send(
            group.encode(),
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
