"""The Redis side of the multi-host layer: keys, scripts, a loop's client, the relay's link.

Every key of a site carries the hash tag ``{prefix}``, so that the scripts, which touch keys of
one site only, stay legal where keys are spread by hash slot. The keys:

* ``{p}:inbox:<host>``: the host's inbox, a stream its relay reads (relay.py). Entries are
  ``o`` (engine/inbox.py's op), ``g`` (group), ``c`` (channel), ``d`` (message). A sender adds
  one with ``INBOX_ADD`` in one round trip, refused when the inbox holds ``inbox_capacity``
  entries. The stream is given a time to live when it is made and the relay refreshes it, so
  the inbox of a host that died goes away ``inbox_ttl`` after its relay last beat.
* ``{p}:epoch:<host>``: ``"<epoch> <start id>"``, the inbox's epoch (``BEAT``): set anew when it
  is missing (Redis restarted empty, or the keys expired), or when the stream's last id went
  back behind the position the relay applied (a failover to a replica that missed writes);
  the start id is where the new epoch begins.
* ``{p}:hosts``: the hosts whose relay beat, by time of the last beat (for flush), those silent
  for ``inbox_ttl`` dropped at each beat.
* ``{p}:group:<group>``: the hosts with members in the group, scored by when their latest
  membership expires; ``{p}:gchan:<group>``: the site-wide (normal) channels in the group,
  scored the same way; ``{p}:caps``: the capacity of those channels.
* ``{p}:chan:<channel>``: a site-wide channel, a list of items, each the 13-digit time its
  message expires (ms since the epoch, the sender's clock) followed by the message.

What makes each operation visible: the one script or command that carries it; none of them
is retried once sent (a retry after a reply was lost could deliver twice), so an operation that
raises ``RedisUnavailable`` may or may not have happened, and one that returned did.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..engine.inbox import Entry
from .errors import RedisUnavailable

__all__ = ["RedisUnavailable"]  # re-exported: where the scripts that raise it are

# Options of a host entry that are the layer's business, not the connection's.
_NOT_CONNECTION = {"address", "sentinels", "master_name", "sentinel_kwargs"}

T = TypeVar("T")

# asyncio.timeout (3.11 and later) bounds a call without making it a task of its own.
_timeout: Any = getattr(asyncio, "timeout", None)


def stamp(expires_ms: int) -> bytes:
    """The 13 digits before a site-wide channel's message: when it expires."""
    return b"%013d" % expires_ms


# --- scripts (run with EVALSHA, loaded again when Redis lost them: see ``Script``) ----------

_TRIM_EXPIRED = """
local function trim_expired(key, now)
  for _ = 1, 100 do
    local oldest = redis.call('LINDEX', key, -1)
    if not oldest or tonumber(string.sub(oldest, 1, 13)) > now then return end
    redis.call('RPOP', key)
  end
end
"""

# KEYS: inbox. ARGV: bound, ttl ms, op, group, channel, data. 1 if added, 0 if full.
INBOX_ADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'o', ARGV[3], 'g', ARGV[4], 'c', ARGV[5], 'd', ARGV[6])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: inbox, group. ARGV: bound, ttl ms, group, channel, host, expires, group ttl ms.
# A group_add of another host's channel: the host joins the group, its relay adds the member.
REMOTE_GROUP_ADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'o', 'a', 'g', ARGV[3], 'c', ARGV[4], 'd', '')
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
redis.call('ZADD', KEYS[2], 'GT', ARGV[6], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return 1
"""

# KEYS: channel. ARGV: capacity, ttl ms, expires (13 digits), message, now. 1 if queued.
NORMAL_SEND = _TRIM_EXPIRED + """
trim_expired(KEYS[1], tonumber(ARGV[5]))
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[3] .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: group hosts, group channels. ARGV: this host, now, inbox bound, inbox ttl, message,
# group, expires (13 digits), key base "{p}:", default capacity, channel ttl.
# {hosts sent to, hosts whose inbox was full, site-wide members, of them skipped}.
GROUP_SEND = _TRIM_EXPIRED + """
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local base, sent, full = ARGV[8], 0, 0
for _, host in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if host ~= ARGV[1] then
    local inbox = base .. 'inbox:' .. host
    if redis.call('XLEN', inbox) >= tonumber(ARGV[3]) then
      full = full + 1
    else
      redis.call('XADD', inbox, '*', 'o', 'g', 'g', ARGV[6], 'c', '', 'd', ARGV[5])
      if redis.call('PTTL', inbox) < 0 then redis.call('PEXPIRE', inbox, ARGV[4]) end
      sent = sent + 1
    end
  end
end
local members, skipped = 0, 0
for _, channel in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  members = members + 1
  local key = base .. 'chan:' .. channel
  trim_expired(key, now)
  local capacity = tonumber(redis.call('HGET', base .. 'caps', channel) or ARGV[9])
  if redis.call('LLEN', key) >= capacity then
    skipped = skipped + 1
  else
    redis.call('LPUSH', key, ARGV[7] .. ARGV[5])
    redis.call('PEXPIRE', key, ARGV[10])
  end
end
return {sent, full, members, skipped}
"""

# KEYS: inbox, epoch, hosts. ARGV: a fresh epoch, the stored epoch, ms, seq, whether to trim,
# this host, now, ttl ms. The relay's beat, before each read: {"<epoch> <start>", inbox depth}.
BEAT = """
local epoch = redis.call('GET', KEYS[2])
local exists = redis.call('EXISTS', KEYS[1]) == 1
local function fresh(start)
  epoch = ARGV[1] .. ' ' .. start
  redis.call('SET', KEYS[2], epoch)
end
if not epoch then
  fresh('0-0')
elseif string.match(epoch, '^(%S+)') == ARGV[2] then
  local p_ms, p_seq = tonumber(ARGV[3]), tonumber(ARGV[4])
  if not exists then
    if p_ms > 0 or p_seq > 0 then fresh('0-0') end
  else
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    local last = '0-0'
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then last = info[i + 1] end
    end
    local l_ms, l_seq = string.match(last, '^(%d+)-(%d+)$')
    l_ms, l_seq = tonumber(l_ms), tonumber(l_seq)
    if l_ms < p_ms or (l_ms == p_ms and l_seq < p_seq) then
      fresh(last)
    elseif ARGV[5] == '1' then
      redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3] .. '-' .. string.format('%d', p_seq + 1))
    end
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[8])
if exists then redis.call('PEXPIRE', KEYS[1], ARGV[8]) end
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6])
-- Hosts whose relay has not beat for an inbox's time to live are gone (and so is their inbox).
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[7]) - tonumber(ARGV[8]))
return {epoch, redis.call('XLEN', KEYS[1])}
"""


# KEYS: inbox, epoch. ARGV: the epoch key's value, the least id to keep. Trims the inbox of what
# the store applied, unless the epoch changed since (its ids would then mean something else).
TRIM = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2])
end
"""


def host_hex(host: int) -> str:
    return f"{host:016x}"


class Keys:
    """The names of a site's keys (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.base = f"{{{prefix}}}:"
        self.hosts = self.base + "hosts"
        self.caps = self.base + "caps"

    def inbox(self, host: int) -> str:
        return f"{self.base}inbox:{host_hex(host)}"

    def epoch(self, host: int) -> str:
        return f"{self.base}epoch:{host_hex(host)}"

    def group(self, group: str) -> str:
        return f"{self.base}group:{group}"

    def group_channels(self, group: str) -> str:
        return f"{self.base}gchan:{group}"

    def channel(self, channel: str) -> str:
        return f"{self.base}chan:{channel}"


def connection_options(host: Any, timeout: float) -> tuple[str, Any, dict]:
    """How to reach Redis, from one entry of channels_redis's ``hosts``: ("url", url, options),
    ("sentinel", (sentinels, master_name, sentinel_kwargs), options) or ("address",
    (host, port), options). Options never retry a command (see the module docstring) and
    bound a connect by ``timeout``. A command is bounded as a whole by its caller
    (``bounded``), not by a socket timeout, unless ``host`` sets one: redis-py (whose default
    is 5 s from version 8) bounds each write by a socket timeout in a task of its own, and each
    read in a timeout of its own, which cost a send to another host about a fifth of its rate
    (measured: 7 500 sends a second with, 9 000 without)."""
    options: dict[str, Any] = {}
    if isinstance(host, dict):
        options = {k: v for k, v in host.items() if k not in _NOT_CONNECTION}
    options.setdefault("socket_connect_timeout", timeout)
    options.setdefault("socket_timeout", None)  # redis-py 8 would set 5 s
    options.setdefault("health_check_interval", 0)
    if isinstance(host, str):
        return "url", host, options
    if isinstance(host, dict) and "sentinels" in host:
        where = (host["sentinels"], host["master_name"], host.get("sentinel_kwargs") or {})
        return "sentinel", where, options
    if isinstance(host, dict) and "address" in host:
        address = host["address"]
        if isinstance(address, str):
            return "url", address, options
        return "address", tuple(address), options
    if isinstance(host, dict) and ("host" in host or "port" in host):
        # channels_redis passes such a dict to redis-py's ConnectionPool as it is.
        options = {k: v for k, v in options.items() if k not in ("host", "port")}
        return "address", (host.get("host", "localhost"), host.get("port", 6379)), options
    if isinstance(host, (tuple, list)) and len(host) == 2:
        return "address", tuple(host), options
    raise ValueError(
        f"invalid asgi_ipc option hosts entry {host!r}: use a redis:// or rediss:// URL, a "
        "(host, port) pair, {'address': ...} or {'sentinels': [...], 'master_name': ...}, "
        "as channels_redis does"
    )


def make_client(where: tuple[str, Any, dict]) -> aioredis.Redis:
    """An asyncio client, for an event loop of the layer's."""
    return _client(where, aioredis.Redis, redis.asyncio.retry.Retry,
                   redis.asyncio.sentinel.Sentinel)


def make_blocking_client(where: tuple[str, Any, dict]) -> redis.Redis:
    """A blocking client, for the relay's thread (relay.py says why)."""
    return _client(where, redis.Redis, redis.retry.Retry, redis.sentinel.Sentinel)


def _client(where: tuple[str, Any, dict], kind_of: Any, retry: Any, sentinel: Any) -> Any:
    kind, target, options = where
    options = {**options, "retry": retry(NoBackoff(), 0)}
    if kind == "url":
        return kind_of.from_url(target, **options)
    if kind == "address":
        return kind_of(host=target[0], port=target[1], **options)
    sentinels, master, sentinel_kwargs = target
    return sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **options).master_for(
        master, **options
    )


async def bounded(timeout: float, what: str, call: Awaitable[T]) -> T:
    """``await call``, turning every failure to reach Redis, and every wait past ``timeout``,
    into ``RedisUnavailable``. Cancelling a command in flight makes redis-py drop its
    connection rather than reuse one with a reply still to come, so the timeout (or a
    caller's cancellation) corrupts nothing."""
    try:
        if _timeout is not None:
            async with _timeout(timeout):
                return await call
        return await asyncio.wait_for(call, timeout)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        raise RedisUnavailable(f"Redis is unavailable for {what}: {exc!r}") from exc


def parse_entries(reply: Any) -> list[Entry]:
    """The entries of an XREAD reply as Redis sends it (no redis-py conversion: each entry an
    id and a flat list of fields and values), for engine/inbox.py."""
    entries = []
    # RESP3 (redis-py 8's default protocol) answers a map of streams, RESP2 a list of pairs.
    streams = reply.items() if isinstance(reply, dict) else reply or ()
    for _stream, items in streams:
        for ident, flat in items:
            ms, _, seq = ident.partition(b"-")
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            entries.append(Entry(
                int(ms), int(seq), fields.get(b"o", b""), fields.get(b"g", b""),
                fields.get(b"c", b""), fields.get(b"d", b""),
            ))
    return entries


def pack(*parts: bytes | str | int) -> bytes:
    """One command in RESP, the protocol redis-py speaks, for the connections below: a few
    microseconds, where redis-py's own packer (without hiredis) takes tens."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif isinstance(part, int):
            part = b"%d" % part
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


# Seconds a connection is kept unused before the loop runs twice ahead of its next command.
IDLE_LOOK = 0.01
# Connections a loop keeps for its commands: as many as its commands in flight at once, up to
# this; more go back to the pool after their command.
KEPT = 8


def _can_read(connection: Any) -> Any:
    # redis-py 8 renamed can_read_destructive (5 to 7) to can_read, and warns at the old name.
    return getattr(connection, "can_read", None) or connection.can_read_destructive


async def _drop(pool: Any, connection: Any) -> None:
    """Disconnect ``connection`` and give it back to ``pool``: one whose command went wrong or
    was cancelled may still have a reply to come, which the next command would read. Given
    back even when this is cancelled in turn."""
    try:
        with contextlib.suppress(Exception):
            await connection.disconnect()
    finally:
        await pool.release(connection)


class Connections:
    """A loop's connections for one command at a time (a send, a group_send), taken from the
    client's pool and kept between commands, up to ``KEPT`` of them (the rest go back to the
    pool, which counts them against its ``max_connections``): redis-py's ``execute_command``
    (its pool's bookkeeping, its retry wrapper, its packer) cost a send to another host about
    half of its CPU, measured. A connection the server closed while it was kept is connected
    again before use, as the pool would; one that fails or is cancelled in a command, or in
    that look, is dropped."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.pool = client.connection_pool
        self.idle: list[tuple[Any, float]] = []  # (connection, when it was last used)

    async def call(self, packed: bytes) -> Any:
        """The reply to one packed command; an error reply raised (the connection is kept:
        it stays in step)."""
        kept = bool(self.idle)
        connection, since = self.idle.pop() if kept else (await self.pool.get_connection(), 0.0)
        try:
            if kept:  # the pool looked at the others
                await self._look(connection, since)
            await connection.send_packed_command(packed, check_health=False)
            reply = await connection.read_response()
        except ResponseError:
            await self._keep(connection)
            raise
        except BaseException:
            await _drop(self.pool, connection)
            raise
        await self._keep(connection)
        return reply

    @staticmethod
    async def _look(connection: Any, since: float) -> None:
        """Connect a kept ``connection`` again if the server closed it, or it holds data
        nobody asked for."""
        if time.monotonic() - since > IDLE_LOOK:
            # What came while it was kept (the server closing it) is read by the loop, in the
            # pass after this one: the I/O a pass finds runs after the callbacks already due,
            # this task's among them. Let two passes go, for the look below to see it.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        try:
            stale = await _can_read(connection)()
        except (RedisError, OSError):
            stale = True
        if stale:
            await connection.disconnect()
            await connection.connect()

    async def _keep(self, connection: Any) -> None:
        if len(self.idle) < KEPT:
            self.idle.append((connection, time.monotonic()))
        else:
            await self.pool.release(connection)

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for connection, _since in idle:
            await self.pool.release(connection)


class Link:
    """The relay's connection (relay.py): a blocking connection of its own, on which a batch of
    commands is written at once and their replies read in order, with none of a pipeline's
    machinery. ``interrupt`` (from another thread) ends a read blocked on it, and any later use,
    at once."""

    def __init__(self, where: tuple[str, Any, dict]) -> None:
        self.client = make_blocking_client(where)
        self.connection: Any = None
        self._guard = threading.Lock()  # between a send and an interrupt
        self._interrupted = False

    def send(self, commands: list[list[Any]]) -> None:
        """Write ``commands`` at once; ``replies`` reads what they answer. Anything that goes
        wrong, in either, drops the connection, whose replies would otherwise be read by the
        next commands."""
        if self.connection is None:
            # Connected outside the guard, which an interrupt must never wait for: it ends
            # within the socket timeout, and the link then finds itself interrupted.
            connection = self.client.connection_pool.get_connection()
            with self._guard:
                self.connection = connection
        with self._guard:
            if self._interrupted:
                # Never used again once interrupted: a read after it would block.
                self._drop()
                raise redis.ConnectionError("the relay's link was interrupted")
            try:
                self.connection.send_packed_command(
                    [b"".join([pack(*command) for command in commands])], check_health=False)
            except BaseException:
                self._drop()
                raise

    def replies(self, count: int) -> list[Any]:
        """The replies of the ``count`` commands sent last; the first error reply raised once
        all are read (the connection stays in step)."""
        connection = self.connection
        replies, error = [], None
        try:
            for _ in range(count):
                try:
                    replies.append(connection.read_response())
                except ResponseError as exc:
                    error = error or exc
                    replies.append(None)
        except BaseException:
            with self._guard:
                self._drop()
            raise
        if error is not None:
            raise error
        return replies

    def interrupt(self) -> None:
        """From another thread: the read blocked on the link ends with an error, and so does
        any later use. Disconnecting shuts the socket down, which wakes the blocked read."""
        with self._guard:
            self._interrupted = True
            self._drop()

    def _drop(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.disconnect()
            self.client.connection_pool.release(connection)

    def close(self) -> None:
        with self._guard:
            self._drop()
        self.client.close()


def parse_epoch(value: bytes | str) -> tuple[int, tuple[int, int]]:
    """(epoch, start) of an epoch key's value."""
    if isinstance(value, bytes):
        value = value.decode()
    epoch, start = value.split()
    ms, _, seq = start.partition("-")
    return int(epoch, 16), (int(ms), int(seq))


def fresh_epoch() -> str:
    return f"{secrets.randbits(63) or 1:x}"


def now_ms() -> int:
    return int(time.time() * 1000)


def script_sha(script: str) -> str:
    """What EVALSHA names ``script`` by."""
    return hashlib.sha1(script.encode()).hexdigest()


class Script:
    """A script run with EVALSHA, loaded again when Redis does not know it (it restarted, or
    failed over), as redis-py's ``Script`` does, on the lean ``Connections``."""

    def __init__(self, connections: Connections, script: str) -> None:
        self.connections = connections
        self.script = script
        self.sha = script_sha(script)

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        command = pack("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await self.connections.call(command)
        except NoScriptError:
            # Not run: EVALSHA of an unknown script does nothing, so running it now is once.
            await self.connections.call(pack("SCRIPT", "LOAD", self.script))
            return await self.connections.call(command)


class Side:
    """One event loop's client, its kept connections and scripts."""

    def __init__(self, where: tuple[str, Any, dict]) -> None:
        self.client = make_client(where)
        self.connections = Connections(self.client)
        self.inbox_add = Script(self.connections, INBOX_ADD)
        self.remote_group_add = Script(self.connections, REMOTE_GROUP_ADD)
        self.normal_send = Script(self.connections, NORMAL_SEND)
        self.group_send = Script(self.connections, GROUP_SEND)

    async def close(self) -> None:
        # Also when the closing task is cancelled (a relay being stopped): the connections
        # are dropped either way.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self.connections.close()
            await self.client.aclose()
