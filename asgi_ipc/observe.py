"""Watching a running store: its figures as Python objects (``figures``), as Prometheus metrics
(``StoreCollector``, ``metrics_view``, ``asgi-ipc metrics``) and as a live terminal view
(``asgi-ipc top``).

Every figure comes from one ``Engine.inspect`` of an existing store, opened without creating it
and closed again: one lock hold, so the figures are one consistent snapshot. That hold pauses
every other process's operations for the length of its walk. By default it walks the channel
and group records and reads the counts they keep; with ``check=True`` it makes the walk of
``asgi-ipc verify`` instead, over every message and membership, and also reports what it finds
inconsistent (``Figures.problems``) and the memory held by expired messages. Measured with
10 000 channels holding 100 000 messages and 100 groups of 100, on one core: about 0.06 s
without the check, 0.2 s with it; so ``top`` looks once a second without it, and the check is
for a scrape every minute or so, or for ``asgi-ipc verify``.

The counters (``layout.COUNTERS``) are kept by the store itself, so they add up the work of every
process that uses the prefix, whoever started first and whichever died since. Each is changed
through the undo journal in the lock hold of the change it counts: an operation rolled back, by
an exception or after its process was killed, is never counted, and a committed one always is.
They survive a flush and only grow (modulo 2**64), which is what Prometheus counters need.
What that costs: one journal entry per count, about 0.3 us; send+receive pairs in one process
went from about 37 800/s to 36 900/s (2%). Counting outside the journal would be no cheaper and
not exact: written before the commit, a rolled-back operation would stay counted; after it, a
kill in between would lose the count.

How old a queued message is, is not stored: a message keeps only the time it expires, which is
its send time plus the expiry of the layer that sent it, and layers of one prefix may be
configured with different expiries. So the figures give what is stored, honestly named: how
long until a channel's first message expires (``Channel.expires_in``), negative when it has
expired already and waits to be reclaimed. With one expiry for the whole prefix, a message's age
is that expiry minus ``expires_in``.

``rich`` (for the live view of ``top``) and ``prometheus_client`` (for the metrics) are optional:
the extras ``top`` and ``metrics``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .commandline import address, bounded, columns, size
from .engine import open_engine
from .engine.inbox import relay_state
from .exceptions import StoreError

if TYPE_CHECKING:  # optional dependencies, imported where they are used
    from django.http import HttpRequest, HttpResponse
    from prometheus_client import CollectorRegistry
    from rich.text import Text

logger = logging.getLogger(__name__)

__all__ = [
    "COUNTER_HELP",
    "Channel",
    "Figures",
    "Memory",
    "StoreCollector",
    "figures",
    "metrics_text",
    "metrics_view",
]

# The counters only a multi-host store moves (asgi_ipc/multihost/), which top leaves out for the
# store of a single host.
MULTI_HOST_COUNTERS = frozenset(
    {"relayed", "relay_fenced", "remote_sent", "remote_group_copies", "remote_full"}
)

# What each counter counts: the help text of its metric.
COUNTER_HELP = {
    "sent": "Messages queued by send()",
    "received": "Messages handed to receive()",
    "returned": "Messages put back first in their channel by a cancelled receive()",
    "group_sends": "Calls of group_send()",
    "delivered": "Copies queued on group members by group_send()",
    "expired": "Messages dropped unread because they had expired",
    "channel_full": "Sends refused with ChannelFull because the channel was at capacity",
    "group_full": "Group members skipped by group_send() because their channel was at capacity",
    "no_memory": "Sends refused, and group members skipped, for want of channel memory",
    "reaped_channels": "Process-specific channels removed because their process exited or died",
    "reaped_memberships": "Group memberships removed with those channels",
    "reaped_messages": "Messages dropped unread from those channels",
    "parcels": "Parcels made by group_send(): one message lent to a process for its members",
    "relayed": "Entries of this host's inbox (multi-host layer) applied to the store",
    "relay_fenced": "Inbox entries skipped because the store had applied them already",
    "remote_sent": "Sends, group_adds and group_discards added to other hosts' inboxes",
    "remote_group_copies": "group_send() copies added to other hosts' inboxes (one per host)",
    "remote_full": "Sends refused with ChannelFull because the other host's inbox was full",
}


@dataclass(frozen=True)
class Channel:
    """One channel: ``depth`` messages queued, ``waiting`` registrations of processes to wake
    when it gets one (a dead process's lingers until the store prunes it), and ``expires_in``
    seconds until its first message expires (None when it is empty; negative when that message
    has expired and waits to be reclaimed)."""

    name: str
    depth: int
    waiting: int
    expires_in: float | None


@dataclass(frozen=True)
class Memory:
    """One memory area (channel or group memory), in bytes: its ``size``, what is ``used`` by
    records and messages, what is ``free``, and the ``largest_free`` block (about the largest
    message that fits right now)."""

    size: int
    used: int
    free: int
    largest_free: int


@dataclass(frozen=True)
class Figures:
    """A snapshot of a prefix's store, taken in one lock hold at ``taken_at`` (time.time())."""

    prefix: str
    taken_at: float
    #: The counters, by name (see ``COUNTER_HELP``): totals since the store was created.
    counters: dict[str, int]
    #: Channels with messages or waiting processes, and the messages queued on them.
    channels: int
    messages: int
    #: The deepest channels, deepest first, and the channels whose first message expires
    #: soonest, soonest first (at most ``top`` of each).
    deepest: list[Channel]
    expiring: list[Channel]
    #: Seconds until the oldest message of the store (the first sent of those queued) expires;
    #: None when nothing is queued.
    oldest_expires_in: float | None
    #: Memory still held by messages that have expired but are not reclaimed yet (None when
    #: not checked).
    expired_bytes: int | None
    groups: int
    memberships: int
    #: Process-specific channels owned by a process (see ``IPCChannelLayer.new_channel``), and
    #: those whose process has exited or died and that are still being reaped.
    owned_channels: int
    channels_to_reap: int
    #: The largest groups, as (name, members), largest first.
    largest_groups: list[tuple[str, int]]
    #: Pids of the live processes waiting in receive(), each as it knows itself (a process in
    #: another PID namespace has another pid here, or none).
    waiting_processes: list[int]
    channel_memory: Memory
    group_memory: Memory
    #: Flushes since the store was created.
    flushes: int
    #: What the check found inconsistent, empty when the store is sound; None when not checked.
    problems: list[str] | None = None
    #: The relay of a multi-host store (engine/inbox.py ``relay_state``): host id, whether a
    #: process leads it and its pid, whether Redis answers it, the lag of the last entry it
    #: applied (ms), the inbox's depth; None for a store of a single host.
    relay: dict | None = None


def _channel(row: tuple[int, str, int, int], now_ms: int) -> Channel:
    depth, name, waiting, first_expires = row
    return Channel(name, depth, waiting, (first_expires - now_ms) / 1000 if depth else None)


def figures(prefix: str, top: int = 10, check: bool = False) -> Figures:
    """The figures of the existing store of ``prefix`` (StoreError if there is none; the store
    is never created), with the ``top`` deepest channels, soonest to expire, largest groups.
    ``check``: also check the whole store, as ``asgi-ipc verify`` does (slower: see above)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a whole number of channels from 0, not {top!r}")
    store = open_engine(prefix)
    try:
        report = store.inspect(top, check)
        relay = relay_state(store.words, store.segment.fd, store.clock())
    finally:
        store.close()
    now = report["now"]
    oldest = report["oldest_expires"]
    return Figures(
        prefix=prefix,
        taken_at=now / 1000,
        counters=report["counters"],
        channels=report["channels"],
        messages=report["messages"],
        deepest=[_channel(row, now) for row in report["by_depth"]],
        expiring=[_channel(row, now) for row in report["by_expiry"]],
        oldest_expires_in=(oldest - now) / 1000 if oldest else None,
        expired_bytes=report["expired_bytes"],
        groups=report["groups"],
        memberships=report["memberships"],
        owned_channels=report["owned_channels"],
        channels_to_reap=report["channels_to_reap"],
        largest_groups=[(name, size) for size, name in report["largest"]],
        waiting_processes=report["waiting_processes"],
        channel_memory=Memory(**report["channel_memory"]),
        group_memory=Memory(**report["group_memory"]),
        flushes=report["epoch"],
        problems=report["problems"],
        relay=relay,
    )


# --- Prometheus -------------------------------------------------------------------------------

METRICS_HINT = "the metrics need prometheus_client: pip install 'prometheus_client>=0.20'"


def _require(module: str, hint: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ImportError(hint) from None


def _missing(exc: ImportError) -> int:
    """The command line's one line for a missing optional dependency."""
    print(f"asgi-ipc: {exc}", file=sys.stderr)
    return 2


class StoreCollector:
    """A prometheus_client collector of the stores of ``prefixes``: register it in a
    ``CollectorRegistry`` and every scrape takes a fresh ``figures`` of each (one lock hold).

    ``asgi_ipc_up`` is 1 for a store read, 0 for one that is missing or unreadable (its other
    metrics are then left out, and the reason logged); with ``strict`` the error is raised
    instead. Per-channel depth
    is given for the ``top`` deepest channels only, so that the number of series stays
    bounded however many channels come and go. With ``check``, each scrape also checks the
    stores (``asgi_ipc_problems``, ``asgi_ipc_expired_bytes``): see ``figures``."""

    def __init__(self, prefixes: list[str], top: int = 10, strict: bool = False,
                 check: bool = False) -> None:
        _require("prometheus_client", METRICS_HINT)
        self.prefixes = list(prefixes)
        self.top = top
        self.strict = strict
        self.check = check

    def describe(self) -> list:
        return []  # figures are read at scrape time only; no read at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"asgi_ipc_{name}", doc, labels=["prefix", *labels])

        up = gauge("up", "1 if the store of the prefix could be read, else 0")
        counters = {
            name: CounterMetricFamily(f"asgi_ipc_{name}", doc, labels=["prefix"])
            for name, doc in COUNTER_HELP.items()
        }
        flushes = CounterMetricFamily("asgi_ipc_flushes", "Flushes of the store",
                                      labels=["prefix"])
        gauges = {
            "channels": gauge("channels", "Channels with messages or waiting processes"),
            "messages": gauge("messages", "Messages queued"),
            "groups": gauge("groups", "Groups"),
            "memberships": gauge("memberships", "Group memberships"),
            "owned": gauge("owned_channels", "Process-specific channels owned by a process"),
            "to_reap": gauge("channels_to_reap",
                             "Channels of processes that exited or died, still being reaped"),
            "waiting": gauge("waiting_processes", "Live processes waiting in receive()"),
            "expired_bytes": gauge("expired_bytes",
                                   "Channel memory held by expired messages not reclaimed yet"),
            "oldest": gauge("oldest_message_expires_in_seconds",
                            "Seconds until the oldest queued message expires"),
            "problems": gauge("problems", "Inconsistencies found in the store (0 when sound)"),
        }
        relay_gauges = {
            "leading": gauge("relay_up", "1 if a process relays this host's inbox (multi-host)"),
            "redis_reachable": gauge("relay_redis_reachable",
                                     "1 if the relay heard from Redis in the last 5 s"),
            "lag_ms": gauge("relay_lag_ms", "Milliseconds between the last entry relayed "
                            "entering the inbox and its application"),
            "inbox_depth": gauge("relay_inbox_depth", "Entries in this host's inbox"),
        }
        memory = gauge("memory_bytes", "Bytes of each memory area, by state",
                       ("area", "state"))
        depth = gauge("channel_depth", "Messages queued on each of the deepest channels",
                      ("channel",))
        for prefix in self.prefixes:
            try:
                f = figures(prefix, self.top, self.check)
            except StoreError as exc:
                if self.strict:
                    raise
                logger.warning("no asgi_ipc metrics for prefix %r: %s", prefix, exc)
                up.add_metric([prefix], 0)
                continue
            up.add_metric([prefix], 1)
            for name, count in f.counters.items():
                counters[name].add_metric([prefix], count)
            flushes.add_metric([prefix], f.flushes)
            for key, value in (
                ("channels", f.channels), ("messages", f.messages), ("groups", f.groups),
                ("memberships", f.memberships), ("owned", f.owned_channels),
                ("to_reap", f.channels_to_reap), ("waiting", len(f.waiting_processes)),
                ("expired_bytes", f.expired_bytes),
                ("problems", None if f.problems is None else len(f.problems)),
            ):
                if value is not None:
                    gauges[key].add_metric([prefix], value)
            if f.oldest_expires_in is not None:
                gauges["oldest"].add_metric([prefix], f.oldest_expires_in)
            for area, figures_of in (("channel", f.channel_memory), ("group", f.group_memory)):
                for state in ("size", "used", "free", "largest_free"):
                    memory.add_metric([prefix, area, state], getattr(figures_of, state))
            for channel in f.deepest:
                if channel.depth:
                    depth.add_metric([prefix, channel.name], channel.depth)
            if f.relay is not None:
                for key, family in relay_gauges.items():
                    family.add_metric([prefix], int(f.relay[key]))
        yield up
        yield from counters.values()
        yield flushes
        yield from gauges.values()
        yield from relay_gauges.values()
        yield memory
        yield depth


def _registry(prefixes: list[str], top: int, strict: bool, check: bool) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(prefixes, top, strict, check))
    return registry


def metrics_text(prefixes: list[str], top: int = 10, strict: bool = False,
                 check: bool = False) -> str:
    """The metrics of the stores of ``prefixes`` in the Prometheus text format (see
    ``StoreCollector``): a store that is missing or unreadable gives ``asgi_ipc_up 0``, or
    with ``strict`` raises its error."""
    _require("prometheus_client", METRICS_HINT)
    from prometheus_client import generate_latest

    return generate_latest(_registry(prefixes, top, strict, check)).decode()


def metrics_view(request: HttpRequest, alias: str | None = None, top: int = 10,
                 check: bool = False) -> HttpResponse:
    """A Django view serving the metrics of the store of the channel layer ``alias`` (default
    ``channels.DEFAULT_CHANNEL_LAYER``), whose prefix it takes from the layer; ``top`` and
    ``check`` as for ``StoreCollector``. Route it in urls.py, behind whatever protects your
    other internal views::

        path("metrics", asgi_ipc.observe.metrics_view)
    """
    from channels import DEFAULT_CHANNEL_LAYER
    from channels.layers import get_channel_layer
    from django.http import HttpResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from .layer import IPCChannelLayer

    layer = get_channel_layer(alias or DEFAULT_CHANNEL_LAYER)
    if not isinstance(layer, IPCChannelLayer):
        raise TypeError(f"channel layer {alias or DEFAULT_CHANNEL_LAYER!r} is not asgi_ipc's")
    body = generate_latest(_registry([layer.prefix], top, strict=False, check=check))
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


def cmd_metrics(args: argparse.Namespace) -> int:
    """Print the metrics once, or serve them over HTTP until interrupted."""
    try:
        _require("prometheus_client", METRICS_HINT)
    except ImportError as exc:
        return _missing(exc)
    if args.serve is None:
        # Printed once, a missing store is an error like any other command's.
        print(metrics_text([args.prefix], args.top, strict=True, check=args.check), end="")
        return 0
    from prometheus_client import start_http_server

    server, thread = start_http_server(args.serve, addr=args.bind,
                                       registry=_registry([args.prefix], args.top, strict=False,
                                                          check=args.check))
    print(f"serving the metrics of prefix {args.prefix!r} on "
          f"http://{args.bind}:{server.server_port}/metrics", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


# --- top --------------------------------------------------------------------------------------

# The ranges of top's and metrics' options: a view is a lock hold over the whole store (see the
# module docstring), so views come at most twice a second.
INTERVALS = (0.5, 3600.0)
MOST_LISTED = 1000
TOP_HINT = ("the live view of asgi-ipc top needs rich: pip install 'rich>=13' (piped, or with "
            "--once, top prints plain text without it)")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _counter_rows(now: Figures, before: Figures | None) -> list[tuple[str, str, str]]:
    """(counter, total, per second) of each counter; the rate is the growth since ``before``
    ("-" for the first view)."""
    elapsed = now.taken_at - before.taken_at if before is not None else 0.0
    rows = []
    for name, value in now.counters.items():
        if now.relay is None and name in MULTI_HOST_COUNTERS:
            continue  # a single host's store: always 0, and the room is the channels'
        rate = "-"
        if before is not None and elapsed > 0:
            grown = value - before.counters[name]
            # A counter that went down belongs to a store created again since: count from 0.
            rate = f"{(grown if grown >= 0 else value) / elapsed:.1f}"
        rows.append((name, str(value), rate))
    return rows


def relay_line(relay: dict) -> str:
    """One line of the relay of a multi-host store (see ``relay_state``)."""
    if not relay["leading"]:
        return f"host {relay['host']}: no relay (no process of the host has the layer open)"
    redis = "Redis reachable" if relay["redis_reachable"] else "Redis UNREACHABLE"
    return (f"host {relay['host']}: pid {relay['pid']}, {redis}, lag {relay['lag_ms']} ms, "
            f"inbox depth {relay['inbox_depth']}")


def _figure_rows(now: Figures) -> list[tuple[str, str]]:
    rows = [
        ("channels", str(now.channels)),
        ("messages", str(now.messages)),
        ("oldest expires in", _seconds(now.oldest_expires_in)),
        ("groups", str(now.groups)),
        ("memberships", str(now.memberships)),
        ("owned channels", str(now.owned_channels)),
        ("channels to reap", str(now.channels_to_reap)),
        ("waiting processes", " ".join(map(str, now.waiting_processes)) or "-"),
        ("flushes", str(now.flushes)),
    ]
    for area, memory in (("channel", now.channel_memory), ("group", now.group_memory)):
        rows.append((f"{area} memory", f"{size(memory.used)} used of {size(memory.size)}, "
                     f"largest free {size(memory.largest_free)}"))
    if now.relay is not None:
        rows.append(("relay", relay_line(now.relay)))
    if now.problems is not None:  # checked
        if now.expired_bytes is not None:  # set with problems; the check is for the types
            rows.append(("expired, unreclaimed", size(now.expired_bytes)))
        rows.append(("problems", str(len(now.problems) or "none")))
    return rows


def _channel_rows(channels: list[Channel]) -> list[tuple[str, ...]]:
    return [(str(c.depth), str(c.waiting), _seconds(c.expires_in), c.name) for c in channels]


CHANNEL_HEADER = ("depth", "waiting", "first expires in")


def _sections(now: Figures) -> list[tuple[str, int | None, tuple[str, ...],
                                          list[tuple[str, ...]]]]:
    """The lists of the view, in order of importance: (title, how many there are in all if
    known, header, rows), with the name last in each row."""
    deepest = [c for c in now.deepest if c.depth]
    return [
        ("deepest channels", now.channels, (*CHANNEL_HEADER, "channel"), _channel_rows(deepest)),
        ("first message expires soonest", None, (*CHANNEL_HEADER, "channel"),
         _channel_rows(now.expiring)),
        ("largest groups", now.groups, ("members", "group"),
         [(str(members), name) for name, members in now.largest_groups]),
    ]


def _title(title: str, shown: int, total: int | None) -> str:
    count = f"all {shown}" if shown == total else (
        f"{shown} listed" if total is None else f"{shown} of {total}")
    return f"{title} ({count})"


def plain(now: Figures, before: Figures | None) -> str:
    """The view of ``now`` as plain text, for scripts and files: tables of columns two spaces
    apart, every name whole, the name last on its line; rates are the counters' growth since
    ``before`` (none for the first view)."""
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now.taken_at))
    blocks = [
        [f"asgi_ipc prefix {now.prefix!r} at {taken}"],
        columns([("counter", "total", "per s"), *_counter_rows(now, before)]),
        columns([("figure", "value"), *_figure_rows(now)]),
    ]
    for title, total, header, rows in _sections(now):
        if rows:
            blocks.append([_title(title, len(rows), total), *columns([header, *rows], left=0)])
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def _packed(items: list[str], width: int, gap: str = "   ") -> list[str]:
    """``items`` laid out in as few lines of ``width`` as they fit in, in order."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(gap) + len(item) <= width:
            lines[-1] += gap + item
        else:
            lines.append(item)
    return lines


def _shortened(line: str, name: str, width: int) -> str:
    """``line``, which ends in ``name``, cut to ``width`` in the middle of the name: channel
    names often share their beginning (``specific.ipc!``) and differ at their end."""
    if len(line) <= width:
        return line
    room = width - (len(line) - len(name)) - 1  # the ellipsis
    if room < 2:
        return line
    return line[:len(line) - len(name)] + name[:room - room // 2] + "…" + name[-(room // 2):]


def render(now: Figures, before: Figures | None, width: int, height: int) -> Text:
    """The live view of ``now`` for a terminal of ``width`` x ``height``: the figures and the
    counters with their rates first, then as many of the deepest channels as the height leaves
    room for, then, if room is left, the channels that expire soonest and the largest groups.
    Names too long for the width lose their middle; other lines, their end."""
    from rich.text import Text

    taken = time.strftime("%H:%M:%S", time.localtime(now.taken_at))
    lines = [(f"asgi_ipc top · prefix {now.prefix!r} · {taken} · Ctrl-C ends", "bold")]
    lines += [(line, "") for line in
              _packed([f"{label} {value}" for label, value in _figure_rows(now)], width)]
    counters = _counter_rows(now, before)
    # As many counters across as the width takes, up to three.
    cell = max(len(name) + len(total) + max(len(rate), len("per s")) + 4
               for name, total, rate in counters)
    across = max(1, min(3, (width + 2) // (cell + 2)))
    grid = [("counter", "total", "per s") * across]
    grid += [sum(counters[at:at + across], ()) for at in range(0, len(counters), across)]
    grid[-1] += ("",) * (len(grid[0]) - len(grid[-1]))
    lines.append(("", ""))
    lines += [(row, "bold" if n == 0 else "") for n, row in enumerate(columns(grid))]
    # Rich's Live leaves the terminal's last line to the cursor, and one more is left for the
    # line the shell prints once top ends, so that the last view stays whole on the screen.
    room = height - 2 - len(lines)
    for title, total, header, rows in _sections(now):
        shown = rows[:max(room - 2, 0)]  # under a blank line and the header
        if not shown:
            break
        table = columns([(*header[:-1], _title(title, len(shown), total)), *shown], left=0)
        lines.append(("", ""))
        lines.append((table[0], "bold"))
        lines += [(_shortened(line, row[-1], width), "") for line, row in zip(table[1:], shown,
                                                                               strict=True)]
        room -= 2 + len(shown)
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append("\n".join(line for line, _ in lines))
    at = 0
    for line, style in lines:
        if style:
            text.stylize(style, at, at + len(line))
        at += len(line) + 1
    return text


def run_top(prefix: str, interval: float, iterations: int | None, top: int,
            check: bool = False, live: bool = True) -> int:
    """Show the store of ``prefix`` every ``interval`` seconds, ``iterations`` times (for
    ever when None), checking it each time if ``check``. With ``live``, on a terminal, the view
    is redrawn in place to fit it; otherwise each view is printed after the last, in plain
    text (``plain``), so a program can read it."""
    display = None
    if live and sys.stdout.isatty():
        _require("rich", TOP_HINT)
        from rich.live import Live

        display = Live(auto_refresh=False)
    before = None
    count = 0
    try:
        if display is not None:
            display.start()
        while True:
            now = figures(prefix, top, check)
            if display is not None:
                width, height = display.console.size
                display.update(render(now, before, width, height), refresh=True)
            else:
                print(("\n" if before is not None else "") + plain(now, before), end="",
                      flush=True)
            before, count = now, count + 1
            if iterations is not None and count >= iterations:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if display is not None:
            display.stop()


def cmd_top(args: argparse.Namespace) -> int:
    try:
        return run_top(args.prefix, args.interval, 1 if args.once else args.iterations,
                       args.top, args.check, live=not args.once)
    except ImportError as exc:
        return _missing(exc)


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    with_prefix: Callable[[str, str, str], argparse.ArgumentParser]
) -> None:
    """Add ``top`` and ``metrics`` to the ``asgi-ipc`` command line."""
    top = with_prefix(
        "top", "a live view of a store: rates, deepest channels, processes, memory",
        "Show a store's figures, refreshed every --interval seconds: the rate of sends, "
        "receives and deliveries, the deepest channels and those whose first message expires "
        "soonest, the processes waiting, and memory. In a terminal the view is redrawn in "
        "place, fitted to the terminal, deepest channels first; with --once, or when the "
        "output is not a terminal, each view is printed as plain text with every name whole. "
        "Ctrl-C ends it.",
    )
    low, high = INTERVALS
    top.add_argument("--interval", type=bounded(float, low, high, "a number of seconds"),
                     default=1.0, help=f"seconds between views, {low:g} to {high:g} (default 1)")
    how_long = top.add_mutually_exclusive_group()
    how_long.add_argument("--iterations", type=bounded(int, 1, 10**6), default=None,
                          help="stop after this many views, 1 to 1000000 (default: run until "
                          "interrupted)")
    how_long.add_argument("--once", action="store_true",
                          help="print one view as plain text and stop")
    top.add_argument("--top", type=bounded(int, 1, MOST_LISTED), default=10,
                     help=f"channels and groups listed, 1 to {MOST_LISTED} (default 10; the "
                     "live view lists as many as the terminal has room for)")
    top.add_argument("--check", action="store_true",
                     help="check the whole store at each view (slower: pauses the store longer)")
    top.set_defaults(run=cmd_top)

    metrics = with_prefix(
        "metrics", "a store's figures in the Prometheus text format",
        "Print a store's figures in the Prometheus text format, or serve them over HTTP with "
        "--serve for a Prometheus server to scrape.",
    )
    metrics.add_argument("--serve", type=bounded(int, 0, 65535, "a TCP port"), metavar="PORT",
                         default=None,
                         help="serve them at http://BIND:PORT/metrics instead of printing them "
                         "(0: any free port, printed)")
    metrics.add_argument("--bind", type=address, default="127.0.0.1",
                         help="the address to serve on (default 127.0.0.1, this machine only)")
    metrics.add_argument("--top", type=bounded(int, 1, MOST_LISTED), default=10,
                         help=f"deepest channels given a depth series each, 1 to {MOST_LISTED} "
                         "(default 10)")
    metrics.add_argument("--check", action="store_true",
                         help="check the whole store at each scrape (slower; adds "
                         "asgi_ipc_problems and asgi_ipc_expired_bytes)")
    metrics.set_defaults(run=cmd_metrics)
