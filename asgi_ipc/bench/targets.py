"""The project's performance targets: the one table that ``asgi-ipc bench`` judges a run by and
that the README shows (``asgi-ipc bench --targets`` prints it as the README's table).

Each target holds one figure of one workload to a bound. Most are ratios measured in the same
run, so that the machine's speed cancels out: asgi_ipc's figure over the same figure of the
fastest peer of the run (``FASTEST_PEER``: whichever of channels_redis's two layers and
channels-nats did best on that row), of ``InMemoryChannelLayer``, or of the floor (two bare
asyncio processes bouncing Unix datagrams). The memory targets are absolute, in bytes, read from
the store's own accounting. A target over the peers is not judged when no peer ran, and no
target is judged on a ``--quick`` run (too short to mean anything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .layers import FLOOR, IPC, MEMORY, NATS, PEERS, REDIS, REDIS_PUBSUB, KiB

# The memory a 10 KiB group_send to 1000 members may take: the payload stored once, a node of
# at most 64 B per member, and 4 KiB for whatever the operation needs besides.
GROUP_SEND_MEMBERS = 1000
GROUP_SEND_SIZE = 10 * KiB
GROUP_SEND_BOUND = GROUP_SEND_SIZE + GROUP_SEND_MEMBERS * 64 + 4 * KiB

#: ``Target.over``: the peer with the best figure on the target's row, in the same run.
FASTEST_PEER = "fastest_peer"

BACKEND_NAMES = {
    IPC: "asgi_ipc",
    REDIS: "channels_redis",
    REDIS_PUBSUB: "RedisPubSubChannelLayer",
    NATS: "channels_nats",
    MEMORY: "InMemoryChannelLayer",
    FLOOR: "floor",
    FASTEST_PEER: "fastest peer",
}

# Latencies; every other figure compared across backends is better higher.
LOWER_IS_BETTER = frozenset({"p50_us", "p99_us"})


def peer_figures(cell: dict, metric: str) -> dict[str, float]:
    """The peers' figures on one row: of those that counted every message, as a figure is
    only worth reading then."""
    figures = {}
    for peer in PEERS:
        result = cell.get(peer, {})
        value = result.get(metric)
        if value is not None and result.get("ok"):
            figures[peer] = value
    return figures


def fastest_peer(cell: dict, metric: str) -> str | None:
    """The peer with the best figure on one row, or None when no peer has one."""
    figures = peer_figures(cell, metric)
    if not figures:
        return None
    best = min if metric in LOWER_IS_BETTER else max
    return best(figures, key=figures.__getitem__)


class Verdict(NamedTuple):
    #: The figure held to the bound: asgi_ipc's over ``over``'s, or asgi_ipc's own.
    value: float | None
    #: None when the run did not measure what the target needs.
    met: bool | None
    #: The backend the figure is over (the peer itself for ``FASTEST_PEER``).
    over: str | None


@dataclass(frozen=True)
class Target:
    workload: str
    case: str
    metric: str
    #: What is held to the bound, as the README says it.
    what: str
    #: The backend whose figure asgi_ipc's is divided by; None: asgi_ipc's figure itself.
    over: str | None
    op: str  # ">=" or "<="
    bound: float
    #: How the bound reads when it is not a plain number.
    bound_text: str = ""
    #: Held only when every delivery was counted, too.
    no_drops: bool = False
    #: Held only when asgi_ipc's figure is also better than every peer's.
    ahead_of_peers: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return self.workload, self.case, self.metric

    def goal(self) -> str:
        of = f"asgi_ipc / {BACKEND_NAMES[self.over]}" if self.over else "asgi_ipc"
        bound = self.bound_text or f"{self.bound:g}"
        return (f"{of} {self.op} {bound}" + (", none dropped" if self.no_drops else "")
                + (", ahead of every peer" if self.ahead_of_peers else ""))

    def judge(self, results: dict) -> Verdict:
        """The figure this target holds (a ratio when ``over`` is set), whether it is met, and
        what it is over; None for the first two when the run did not measure it."""
        cell = results.get(self.workload, {}).get(self.case, {})
        ipc = cell.get(IPC, {})
        value = ipc.get(self.metric)
        over = fastest_peer(cell, self.metric) if self.over == FASTEST_PEER else self.over
        if value is None or (self.over is not None and over is None):
            return Verdict(None, None, over)
        if over is not None:
            base = cell.get(over, {}).get(self.metric)
            if not base:
                return Verdict(None, None, over)
            value = value / base
        met = value >= self.bound if self.op == ">=" else value <= self.bound
        if self.no_drops:
            met = met and ipc.get("drops") == 0
        if self.ahead_of_peers:
            peers = peer_figures(cell, self.metric)
            if not peers:
                return Verdict(value, None, over)
            mine = ipc[self.metric]
            better = (mine < p if self.metric in LOWER_IS_BETTER else mine > p
                      for p in peers.values())
            met = met and all(better)
        return Verdict(value, met, over)


def _fanout(workload: str, members: int, where: str) -> Target:
    return Target(workload, str(members), "deliveries_per_s",
                  f"group_send to {members} members {where}, deliveries per second",
                  FASTEST_PEER, ">=", 1.2, no_drops=True)


TARGETS: tuple[Target, ...] = (
    Target("backlog", "send+receive", "empty_ops_per_s",
           "in-process send+receive pairs per second", MEMORY, ">=", 0.5),
    Target("backlog", "send+receive", "loaded_over_empty",
           "the same with 100 000 messages queued elsewhere, over the same with none",
           None, ">=", 0.8),
    Target("pingpong", "2 processes", "p50_us",
           "ping-pong between two processes, p50 latency", FLOOR, "<=", 1.6,
           ahead_of_peers=True),
    Target("oneway", "1->1", "msg_per_s",
           "one-way messages per second, 1 process to 1", FASTEST_PEER, ">=", 2),
    Target("oneway", "4->4", "msg_per_s",
           "one-way messages per second, 4 processes to 4", FASTEST_PEER, ">=", 2),
    _fanout("fanout", 10, "over 4 processes"),
    _fanout("fanout", 100, "over 4 processes"),
    _fanout("fanout", 1000, "over 4 processes"),
    _fanout("fanout-1proc", 100, "in 1 other process"),
    _fanout("fanout-1proc", 1000, "in 1 other process"),
    _fanout("fanout-10proc", 1000, "over 10 processes"),
    Target("memory", "group_send", "channel_bytes",
           "channel memory taken by one 10 KiB group_send to 1000 members", None, "<=",
           GROUP_SEND_BOUND, bound_text=f"{GROUP_SEND_BOUND} B (10 KiB + 1000 x 64 B + 4 KiB)"),
    Target("memory", "overhead", "overhead_per_message",
           "shared memory per queued message beyond its payload", None, "<=", 64,
           bound_text="64 B"),
    Target("memory", "overhead", "memberships_per_mib",
           "group memberships per MiB of group memory (plain channel names)", None, ">=",
           9000),
    Target("reap", "half killed", "reap_seconds",
           "memberships of a killed process gone, after (unreaped: 86 400 s)", None, "<=", 2,
           bound_text="2 s"),
    Target("reap", "half killed", "over_live_alone",
           "group_send to a group half killed, over one to the live half alone", None, "<=",
           1.1),
)

BY_KEY = {target.key: target for target in TARGETS}


def rst_table() -> str:
    """The targets as the README's reStructuredText table."""
    rows = [("target", "goal")] + [(t.what, t.goal()) for t in TARGETS]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    rule = " ".join("=" * w for w in widths)
    lines = [rule, " ".join(f"{c:{w}}" for c, w in zip(rows[0], widths, strict=True)).rstrip(),
             rule]
    lines += [" ".join(f"{c:{w}}" for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows[1:]]
    lines.append(rule)
    return "\n".join(lines)
