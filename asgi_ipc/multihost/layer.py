"""MultiHostChannelLayer: the layer of a site of several hosts, each with its own store, joined
by Redis.

A *host* is a store: every process of a machine that uses the same ``prefix`` (and /dev/shm)
shares it, and it is known to the other hosts by the random id kept in it
(``Engine.host_id``), never by a hostname. Routing, by channel name:

* a process-specific channel (``new_channel()``: ``<prefix>ipc!<host id>.<uuid>``) belongs to
  the host whose id it carries. A send to one of this host's goes through shared memory, as
  with IPCChannelLayer, and issues no Redis command; a send to another host's is one script
  (``INBOX_ADD``) adding it to that host's inbox, whose relay moves it into that host's store
  (relay.py). A ``!`` channel with no host id in it (one an IPCChannelLayer made, say) is
  this host's;
* a normal channel (no ``!``) means the same on every host: it is a list in Redis that any
  process of any host may take from, each message once. Names matching ``local_channels``
  are per host instead, kept in the store;
* a group: its members of this host are in the store; Redis knows which hosts have members
  (and the normal channels that are members). ``group_send`` queues the message on the local
  members through shared memory, then one script (``GROUP_SEND``) adds it once to the inbox of
  each other host with members, whose relay queues it on its members, and to each normal member.
  A group_add or group_discard of another host's channel is an entry of that host's inbox:
  group_sends of other hosts come after it in the inbox, and one of that host itself sees it
  once the relay has applied it.

What makes each operation visible, and what a failure leaves: a local operation is one lock
hold of the store (engine/); an operation through Redis is one script, never retried (see
redis_side.py): it raises ``RedisUnavailable`` within ``redis_timeout`` when Redis is down, and
may then have happened or not. An inbox entry, once added, is applied exactly once by the
host's relay (engine/inbox.py). With Redis down, everything within this host keeps working;
a group_send then reaches this host's members only (logged), and a group_add of a local channel
is registered in Redis by this layer's next operation that reaches Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import uuid
import weakref
from collections.abc import Iterable
from fnmatch import translate
from typing import Any

from channels.exceptions import ChannelFull

from ..engine.inbox import DISCARD, FLUSH, SEND
from ..engine.layout import H_HOST_ID, H_REMOTE_FULL, H_REMOTE_GROUP_COPIES, H_REMOTE_SENT
from ..engine.lock import process_id
from ..layer import NAME_CACHE, IPCChannelLayer
from ..receiver import Receiver
from .errors import RedisUnavailable

try:
    from .redis_side import (
        Keys,
        Side,
        bounded,
        connection_options,
        host_hex,
        now_ms,
        stamp,
    )
    from .relay import Relay
except ImportError as missing:  # redis-py is an optional dependency
    _MISSING: ImportError | None = missing
else:
    _MISSING = None

logger = logging.getLogger(__name__)

# Put-backs of cancelled receives under way: a task nobody references may be collected.
_PUTTING_BACK: set[asyncio.Future] = set()

_HOST_NAME = re.compile(r"([0-9a-f]{16})\.")

# channels_redis options that mean nothing here, accepted so that its CONFIG can be pasted in.
_IGNORED = {"random_prefix_length", "on_disconnect", "on_reconnect"}


def _glob_escaped(text: str) -> str:
    """``text`` matched literally in a Redis glob (SCAN MATCH): a site named ``a*`` must not
    match another site's keys."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _whole(option: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"invalid asgi_ipc option {option}={value!r}: use a whole number "
                         f"from {low}")
    return value


def _seconds(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise ValueError(f"invalid asgi_ipc option {option}={value!r}: use a number of seconds "
                         "above 0")
    return float(value)


class MultiHostChannelLayer(IPCChannelLayer):
    """A channel layer for processes of several hosts: shared memory within a host, Redis
    between hosts (see the module docstring).

    Options: those of IPCChannelLayer, and ``hosts`` as channels_redis takes it (one Redis:
    a URL, ``(host, port)``, ``{"address": ..., **connection options}`` or
    ``{"sentinels": [...], "master_name": ..., "sentinel_kwargs": ...}``);
    ``inbox_capacity``, the entries a host's inbox holds before sends to it raise ChannelFull;
    ``inbox_ttl``, seconds after its relay last beat that a dead host's inbox goes away;
    ``local_channels``, normal channel names (globs or compiled regexes) that are per host;
    ``redis_timeout``, the bound in seconds of every operation that needs Redis; ``relay``,
    False for a process that must never relay (it still sends and receives); ``site``, the
    name under which the hosts meet in Redis (the prefix by default: set it when hosts use
    different prefixes).

    For tests and tools, beside IPCChannelLayer's: ``relay()``, this process's relay
    candidacy, and ``redis_side()``, the Redis client of the running event loop."""

    extensions = ["groups", "flush"]
    # The options IPCChannelLayer does not have, which the Django system check (checks.py)
    # leaves to this class.
    OWN_OPTIONS = (
        "hosts", "inbox_capacity", "inbox_ttl", "local_channels", "redis_timeout", "relay",
        "site", "symmetric_encryption_keys", "serializer_format", *sorted(_IGNORED),
    )

    def __init__(
        self,
        prefix: str = "asgi",
        hosts: Iterable[Any] | None = None,
        inbox_capacity: int = 10_000,
        inbox_ttl: float = 86400,
        local_channels: Iterable[Any] = (),
        redis_timeout: float = 5.0,
        relay: bool = True,
        site: str | None = None,
        symmetric_encryption_keys: Any = None,
        serializer_format: str = "msgpack",
        **options: Any,
    ) -> None:
        if _MISSING is not None:
            raise ImportError(
                "MultiHostChannelLayer needs redis-py: pip install asgi_ipc[redis]"
            ) from _MISSING
        if symmetric_encryption_keys:
            raise TypeError(
                "asgi_ipc has no option 'symmetric_encryption_keys': messages between hosts "
                "travel through Redis; reach it over TLS (a rediss:// URL in `hosts`)"
            )
        if serializer_format != "msgpack":
            raise TypeError("asgi_ipc always stores messages as msgpack: remove "
                            "`serializer_format`")
        for name in _IGNORED & options.keys():
            options.pop(name)
        super().__init__(prefix=prefix, **options)
        if isinstance(hosts, (str, bytes)):
            raise ValueError(
                f"invalid asgi_ipc option hosts={hosts!r}: hosts is a list, as in "
                f"channels_redis: hosts=[{hosts!r}]"
            )
        hosts = list(hosts) if hosts else [("localhost", 6379)]
        if len(hosts) != 1:
            raise ValueError(
                f"invalid asgi_ipc option hosts={hosts!r}: MultiHostChannelLayer uses one "
                "Redis (or one Sentinel-watched master); it does not shard across several"
            )
        self.redis_timeout = _seconds("redis_timeout", redis_timeout)
        self.inbox_capacity = _whole("inbox_capacity", inbox_capacity, 1)
        self.inbox_ttl = _seconds("inbox_ttl", inbox_ttl)
        self.hosts = hosts
        self._where = connection_options(hosts[0], self.redis_timeout)
        if site is not None and (not isinstance(site, str) or not site or "}" in site):
            raise ValueError(f"invalid asgi_ipc option site={site!r}: use a non-empty name "
                             "without '}'")
        self.site = site if site is not None else prefix
        self._keys = Keys(self.site)
        self._local = [
            re.compile(translate(p)) if isinstance(p, str) else p for p in local_channels
        ]
        self._wants_relay = relay
        self._relay: Relay | None = None
        self._relay_guard = threading.Lock()
        self._host = 0
        self._routes: dict[str, tuple[str, int]] = {}  # by channel name: see _route
        self._sides: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Side] = (
            weakref.WeakKeyDictionary()
        )
        self._unregistered: dict[str, int] = {}  # group -> expiry, to tell Redis again

    # --- the store, its host id and its relay ----------------------------------------------

    def _open(self) -> Receiver:
        store = super()._open()
        relay = self._relay
        if self._wants_relay and (relay is None or relay.pid != process_id()):
            with self._relay_guard:
                relay = self._relay
                if relay is None or relay.pid != process_id():
                    self._relay = Relay(
                        store, self.host_id(store), self._where, self._keys,
                        int(self.inbox_ttl * 1000), self._capacity_of, int(self.expiry * 1000),
                        int(self.group_expiry * 1000), self.redis_timeout, self.inbox_capacity,
                    )
                    self._relay.start()
        return store

    def host_id(self, store: Receiver | None = None) -> int:
        """This host's id: its store's."""
        host = self._host
        if not host:
            engine = (store or self._open()).engine
            host = self._host = engine.words[H_HOST_ID] or engine.host_id()
        return host

    def relay(self) -> Relay | None:
        """This process's relay candidacy (relay.py), if it runs one."""
        return self._relay

    def redis_side(self) -> Side:
        """This event loop's Redis side (redis_side.py: its ``client``, and the
        ``connections`` its commands go through), made on first use in each loop, since a
        redis-py client belongs to one loop."""
        loop = asyncio.get_running_loop()
        side = self._sides.get(loop)
        if side is None:
            side = self._sides[loop] = Side(self._where)
            self._close_with(loop, side)
        return side

    def _close_with(self, loop: asyncio.AbstractEventLoop, side: Side) -> None:
        """Close ``side``'s connections when ``loop`` closes, as channels_redis does: a loop
        per call (``async_to_sync`` in a thread) would otherwise leave a connection open per
        call until the collector finds it."""
        original = loop.close

        def close() -> None:
            if self._sides.get(loop) is side:
                del self._sides[loop]
            if not loop.is_closed() and not loop.is_running():
                with contextlib.suppress(Exception):
                    loop.run_until_complete(side.close())
            original()

        loop.close = close  # type: ignore[method-assign]

    def _route(self, channel: str) -> tuple[str, int]:
        """("local", 0), ("remote", host) or ("normal", 0): see the module docstring. Kept
        per name, as the checked names are (``IPCChannelLayer._channel_name``): measured, a
        same-host ping-pong took 1.07 times IPCChannelLayer's without, 1.01 times with."""
        route = self._routes.get(channel)
        if route is None:
            route = self._find_route(channel)
            if len(self._routes) >= NAME_CACHE:
                self._routes.clear()
            self._routes[channel] = route
        return route

    def _find_route(self, channel: str) -> tuple[str, int]:
        bang = channel.find("!")
        if bang >= 0:
            named = _HOST_NAME.match(channel, bang + 1)
            if named is not None:
                host = int(named.group(1), 16)
                if host != self.host_id():
                    return "remote", host
            return "local", 0
        if any(pattern.match(channel) for pattern in self._local):
            return "local", 0
        return "normal", 0

    async def _redis(self, what: str, call: Any) -> Any:
        return await bounded(self.redis_timeout, what, call)

    async def _inbox_add(self, host: int, op: bytes, group: str, channel: str,
                         data: bytes, what: str) -> None:
        side = self.redis_side()
        added = await self._redis(what, side.inbox_add(
            keys=[self._keys.inbox(host)],
            args=[self.inbox_capacity, int(self.inbox_ttl * 1000), op, group, channel, data],
        ))
        if not added:
            self._count(H_REMOTE_FULL)
            raise ChannelFull(
                f"the inbox of host {host_hex(host)} is full ({self.inbox_capacity} entries): "
                f"{what} refused"
            )
        self._count(H_REMOTE_SENT)

    def _count(self, counter: int, n: int = 1) -> None:
        """Add ``n`` to a cross-host counter of the store (layout.py), in a lock hold of its
        own: a few microseconds beside the Redis round trip it counts."""
        engine = self._open().engine
        engine.locked(engine.journal.add, counter, n)

    async def _register(self, group: str, expires: int) -> None:
        """Tell Redis this host has members in ``group`` (and any group whose telling failed
        before): one round trip."""
        pending = {**self._unregistered, group: expires} if group else dict(self._unregistered)
        if not pending:
            return
        side = self.redis_side()
        pipe = side.client.pipeline(transaction=False)
        me = host_hex(self.host_id())
        for name, until in pending.items():
            pipe.zadd(self._keys.group(name), {me: until}, gt=True)  # never sooner
            pipe.pexpire(self._keys.group(name), int(self.group_expiry * 1000))
        try:
            await self._redis(f"group_add to {group!r}", pipe.execute())
        except RedisUnavailable as exc:
            self._unregistered.update(pending)
            logger.warning("%s; this host's members of %s get only this host's group_sends "
                           "until Redis is reached again", exc, sorted(pending))
            return
        for name in pending:
            if self._unregistered.get(name) == pending[name]:
                del self._unregistered[name]

    # --- the channel layer contract --------------------------------------------------------

    async def send(self, channel: str, message: dict) -> None:
        self._channel_name(channel)  # checked, once per name
        kind, host = self._route(channel)
        if kind == "local":
            return await super().send(channel, message)
        data = self._serialize(message, f"channel {channel!r}")
        if kind == "remote":
            return await self._inbox_add(host, SEND, "", channel, data,
                                         f"a send to {channel!r}")
        now = now_ms()
        capacity = self.get_capacity(channel)
        queued = await self._redis(f"a send to {channel!r}", self.redis_side().normal_send(
            keys=[self._keys.channel(channel)],
            args=[capacity, int(self.expiry * 1000), stamp(now + int(self.expiry * 1000)),
                  data, now],
        ))
        if not queued:
            raise ChannelFull(f"channel {channel!r} is at capacity ({capacity})")

    async def receive(self, channel: str) -> dict:
        self._channel_name(channel)  # checked, once per name
        kind, host = self._route(channel)
        if kind == "local":
            return await super().receive(channel)
        if kind == "remote":
            raise ValueError(
                f"channel {channel!r} belongs to host {host_hex(host)}: only processes of that "
                "host can receive from it"
            )
        return self._deserialize(await self._take(channel))

    async def _put_back_popped(self, side: Side, key: str, channel: str,
                               pop: asyncio.Future) -> None:
        """For a receive cancelled while its pop was in flight: once the pop answers, put what
        it took back first in its channel."""
        try:
            got = await pop
        except Exception:
            return  # nothing was taken, or Redis failed: nothing to give back
        if got:
            try:
                await self._redis(f"a receive from {channel!r}", side.client.rpush(key, got[1]))
            except RedisUnavailable:
                logger.error("a message of %r taken by a cancelled receive could not be put "
                             "back: Redis is unavailable", channel)

    async def _take(self, channel: str) -> bytes:
        """The next unexpired message of the site-wide ``channel``. A cancelled receive lets
        its pop in flight finish, and puts what it took back first in the channel."""
        side, key = self.redis_side(), self._keys.channel(channel)
        what = f"a receive from {channel!r}"
        # Each pop blocks for a second at most, and is bounded by that plus redis_timeout:
        # an empty channel never looks like an unreachable Redis.
        block = 1
        while True:
            pop = asyncio.ensure_future(bounded(block + self.redis_timeout, what,
                                                side.client.brpop([key], timeout=block)))
            got: Any
            try:
                got = await asyncio.shield(pop)
            except asyncio.CancelledError:
                # The pop is never cancelled (what Redis popped would be lost with it): it
                # finishes in a task of its own, which puts back what it took.
                task = asyncio.ensure_future(self._put_back_popped(side, key, channel, pop))
                _PUTTING_BACK.add(task)
                task.add_done_callback(_PUTTING_BACK.discard)
                raise
            if got is None:
                continue
            item: bytes = got[1]  # the client answers bytes: decode_responses is off
            if int(item[:13]) > now_ms():
                return item[13:]

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A channel name that carries this host's id, owned by this process (see
        IPCChannelLayer.new_channel)."""
        name = f"{prefix}ipc!{host_hex(self.host_id())}.{uuid.uuid4().hex}"
        self.require_valid_channel_name(name)
        self._open().own(name.encode())
        return name

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        kind, host = self._route(channel)
        group_expiry_ms = int(self.group_expiry * 1000)
        expires = now_ms() + group_expiry_ms
        if kind == "local":
            await super().group_add(group, channel)
            await self._register(group, expires)
            return
        side = self.redis_side()
        if kind == "remote":
            added = await self._redis(f"group_add of {channel!r}", side.remote_group_add(
                keys=[self._keys.inbox(host), self._keys.group(group)],
                args=[self.inbox_capacity, int(self.inbox_ttl * 1000), group, channel,
                      host_hex(host), expires, group_expiry_ms],
            ))
            if not added:
                self._count(H_REMOTE_FULL)
                raise ChannelFull(f"the inbox of host {host_hex(host)} is full: group_add of "
                                  f"{channel!r} refused")
            self._count(H_REMOTE_SENT)
            return
        pipe = side.client.pipeline(transaction=False)
        pipe.zadd(self._keys.group_channels(group), {channel: expires})
        pipe.pexpire(self._keys.group_channels(group), group_expiry_ms)
        pipe.hset(self._keys.caps, channel, self.get_capacity(channel))
        await self._redis(f"group_add of {channel!r}", pipe.execute())

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        kind, host = self._route(channel)
        if kind == "local":
            # The host stays in the group's hosts until its entry expires: another process of
            # the host may have added a member meanwhile, and a group_send that finds no
            # member here costs one inbox entry.
            return await super().group_discard(group, channel)
        if kind == "remote":
            return await self._inbox_add(host, DISCARD, group, channel, b"",
                                         f"group_discard of {channel!r}")
        await self._redis(f"group_discard of {channel!r}", self.redis_side().client.zrem(
            self._keys.group_channels(group), channel))

    async def group_send(self, group: str, message: dict) -> None:
        """Queue ``message`` on every member of ``group``, on every host; full members are
        skipped and logged. With Redis unavailable only this host's members get it (logged)."""
        self.require_valid_group_name(group)
        data = self._serialize(message, f"group {group!r}")
        members, skipped = self._open().group_send(
            group.encode(), data, self._capacity_of, int(self.expiry * 1000),
            int(self.group_expiry * 1000),
        )
        now = now_ms()
        try:
            if self._unregistered:
                await self._register("", 0)
            copies, full, normal, normal_skipped = await self._redis(
                f"group_send to {group!r}", self.redis_side().group_send(
                    keys=[self._keys.group(group), self._keys.group_channels(group)],
                    args=[host_hex(self.host_id()), now, self.inbox_capacity,
                          int(self.inbox_ttl * 1000), data, group,
                          stamp(now + int(self.expiry * 1000)), self._keys.base,
                          self.capacity, int(self.expiry * 1000)],
                ))
        except RedisUnavailable as exc:
            logger.warning("%s: group_send to %s reached this host's members only", exc, group)
            copies = full = normal = normal_skipped = 0
        if copies:
            self._count(H_REMOTE_GROUP_COPIES, copies)
        members += normal
        skipped += normal_skipped
        if skipped:
            logger.info("%s of %s channels over capacity in group %s", skipped, members, group)
        if full:
            logger.warning("group_send to %s skipped %s hosts whose inbox is full", group, full)

    async def flush(self) -> None:
        """Empty every channel and group of the prefix, on every host: this host's store at
        once, the site-wide channels and groups in Redis, and every other host's store when
        its relay applies the flush this adds to its inbox."""
        self._open().flush()
        client, base = self.redis_side().client, self._keys.base

        async def everything() -> None:
            doomed = []
            for pattern in ("chan:*", "group:*", "gchan:*"):
                doomed += [key async for key in client.scan_iter(
                    match=_glob_escaped(base) + pattern, count=1000)]
            found: Any = await client.zrange(self._keys.hosts, 0, -1)
            hosts = [int(h, 16) for h in found]
            pipe = client.pipeline(transaction=False)
            for key in [*doomed, self._keys.caps]:
                pipe.unlink(key)
            for host in hosts:
                pipe.xtrim(self._keys.inbox(host), maxlen=0)
                if host != self.host_id():
                    pipe.xadd(self._keys.inbox(host), {"o": FLUSH, "g": "", "c": "", "d": ""})
            await pipe.execute()

        await self._redis("flush", everything())
        self._unregistered.clear()

    async def close(self) -> None:
        """Stop this process's relay, close its Redis connections (of this event loop; those of
        others are dropped), and release the store (see IPCChannelLayer.close)."""
        with self._relay_guard:
            relay, self._relay = self._relay, None
        if relay is not None:
            await asyncio.get_running_loop().run_in_executor(None, relay.stop)
        sides = list(self._sides.items())
        self._sides = weakref.WeakKeyDictionary()
        loop = asyncio.get_running_loop()
        for side_loop, side in sides:
            if side_loop is loop:
                await side.close()
        self._host = 0
        self._routes = {}  # a store made again has another host id
        await super().close()
