"""The project's performance targets: the one table that ``asgi-ipc bench`` judges a run by and
that the README shows (``asgi-ipc bench --targets`` prints it as the README's table).

Each target holds one figure of one workload to a bound. Most are ratios measured in the same
run, so that the machine's speed cancels out: asgi_ipc's figure over the same figure of another
backend (``over``), channels_redis, ``InMemoryChannelLayer``, or the floor (two bare asyncio
processes bouncing Unix datagrams). The memory targets are absolute, in bytes, read from the
store's own accounting. A target over channels_redis is not judged when channels_redis is left
out of the run, and no target is judged on a ``--quick`` run (too short to mean anything).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import FLOOR, IPC, MEMORY, REDIS, KiB

# The memory a 10 KiB group_send to 1000 members may take: the payload stored once, a node of
# at most 64 B per member, and 4 KiB for whatever the operation needs besides.
GROUP_SEND_MEMBERS = 1000
GROUP_SEND_SIZE = 10 * KiB
GROUP_SEND_BOUND = GROUP_SEND_SIZE + GROUP_SEND_MEMBERS * 64 + 4 * KiB

BACKEND_NAMES = {
    IPC: "asgi_ipc",
    REDIS: "channels_redis",
    MEMORY: "InMemoryChannelLayer",
    FLOOR: "floor",
}


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

    @property
    def key(self) -> tuple[str, str, str]:
        return self.workload, self.case, self.metric

    def goal(self) -> str:
        of = f"asgi_ipc / {BACKEND_NAMES[self.over]}" if self.over else "asgi_ipc"
        bound = self.bound_text or f"{self.bound:g}"
        return f"{of} {self.op} {bound}" + (", none dropped" if self.no_drops else "")

    def judge(self, results: dict) -> tuple[float | None, bool | None]:
        """The figure this target holds (a ratio when ``over`` is set) and whether it is met;
        None for either when the run did not measure it."""
        cell = results.get(self.workload, {}).get(self.case, {})
        ipc = cell.get(IPC, {})
        value = ipc.get(self.metric)
        if value is not None and self.over is not None:
            base = cell.get(self.over, {}).get(self.metric)
            value = value / base if base else None
        if value is None:
            return None, None
        met = value >= self.bound if self.op == ">=" else value <= self.bound
        if self.no_drops:
            met = met and ipc.get("drops") == 0
        return value, met


TARGETS: tuple[Target, ...] = (
    Target("backlog", "send+receive", "empty_ops_per_s",
           "in-process send+receive pairs per second", MEMORY, ">=", 0.5),
    Target("backlog", "send+receive", "loaded_over_empty",
           "the same with 100 000 messages queued elsewhere, over the same with none",
           None, ">=", 0.8),
    Target("pingpong", "2 processes", "p50_us",
           "ping-pong between two processes, p50 latency", FLOOR, "<=", 2),
    Target("oneway", "1->1", "msg_per_s",
           "one-way messages per second, 1 process to 1", REDIS, ">=", 60),
    Target("oneway", "4->4", "msg_per_s",
           "one-way messages per second, 4 processes to 4", REDIS, ">=", 60),
    Target("fanout", "1000", "deliveries_per_s",
           "group_send to 1000 members, deliveries per second", REDIS, ">=", 6, no_drops=True),
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
