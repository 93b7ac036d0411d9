"""The report of a run: one row per figure shown, with each backend's value and count, the ratio
of asgi_ipc's value to the fastest peer's on that row (naming it), and the target with the
figure it judges and its verdict (``targets.py``), as a table on stdout; ``command.py`` puts the
same rows in the ``--json`` document.

A count ``n=`` is what arrived intact and in order; ``!`` marks one short of what was sent, and
then the speed beside it is not worth reading (and that backend is not taken as the fastest
peer).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import BACKENDS, FLOOR, IPC, MEMORY, NATS, REDIS, REDIS_PUBSUB
from .targets import BY_KEY, FASTEST_PEER, fastest_peer

# Short names for the ratio columns: the backend asgi_ipc's figure is divided by.
SHORT = {REDIS: "redis", REDIS_PUBSUB: "pubsub", NATS: "nats", MEMORY: "in-mem",
         FLOOR: "floor"}
COLUMNS = {IPC: "asgi_ipc", REDIS: "channels_redis", REDIS_PUBSUB: "redis pubsub",
           NATS: "channels_nats", MEMORY: "in-memory", FLOOR: "floor"}


def num(value: float | None) -> str:
    """Three significant figures, with k and M for the big ones."""
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            value /= limit
            return f"{value:.3g}{suffix}"
    return f"{value:.3g}"


def summary(result: dict) -> str:
    """One result in a line, for the progress shown on stderr."""
    if "error" in result:
        return "ERROR: " + result["error"].splitlines()[-1]
    verdict = "all counted" if result["ok"] else "MISSING MESSAGES"
    if result.get("members_still_waiting"):
        verdict += f": {result['members_still_waiting']} members never woken"
    return (f"{result['counted']} of {result['expected']} counted ({verdict}), "
            f"{result['seconds']} s")


@dataclass
class Row:
    #: The figure shown: ``results[workload][case][backend][metric]``.
    workload: str
    case: str
    metric: str
    label: str
    unit: str
    values: dict[str, float | None]
    counts: dict[str, str]
    #: asgi_ipc's figure over the fastest peer's on this row, and which peer that is.
    peer_ratio: float | None = None
    fastest_peer: str | None = None
    #: The figure the row's target judges: asgi_ipc's over ``ratio_over``'s (the target's
    #: ``over``, FASTEST_PEER included), or asgi_ipc's own when ``ratio_over`` is None.
    ratio: float | None = None
    ratio_over: str | None = None
    target: str = ""
    met: bool | None = None


# (workload, case, metric, label, unit)
ROW_SPECS = [
    ("pingpong", "2 processes", "p50_us", "ping-pong p50", "us"),
    ("pingpong", "2 processes", "p99_us", "ping-pong p99", "us"),
    ("oneway", "1->1", "msg_per_s", "one-way 1->1", "msg/s"),
    ("oneway", "4->4", "msg_per_s", "one-way 4->4", "msg/s"),
    ("fanout", "10", "deliveries_per_s", "fan-out 10 over 4 processes", "deliv/s"),
    ("fanout", "100", "deliveries_per_s", "fan-out 100 over 4 processes", "deliv/s"),
    ("fanout", "1000", "deliveries_per_s", "fan-out 1000 over 4 processes", "deliv/s"),
    ("fanout-1proc", "100", "deliveries_per_s", "fan-out 100 in 1 process", "deliv/s"),
    ("fanout-1proc", "1000", "deliveries_per_s", "fan-out 1000 in 1 process", "deliv/s"),
    ("fanout-10proc", "1000", "deliveries_per_s", "fan-out 1000 over 10 processes", "deliv/s"),
    ("backlog", "send+receive", "empty_ops_per_s", "send+recv, empty store", "ops/s"),
    ("backlog", "send+receive", "loaded_ops_per_s", "send+recv, backlog elsewhere", "ops/s"),
    ("backlog", "send+receive", "loaded_over_empty", "  backlog / empty", "x"),
    ("sizes", "100 B", "mb_per_s", "size 100 B", "MB/s"),
    ("sizes", "10 KiB", "mb_per_s", "size 10 KiB", "MB/s"),
    ("sizes", "1 MiB", "mb_per_s", "size 1 MiB", "MB/s"),
    ("memory", "overhead", "overhead_per_message", "shm per message beyond payload", "B"),
    ("memory", "overhead", "bytes_per_membership", "shm per group membership", "B"),
    ("memory", "overhead", "memberships_per_mib", "memberships per MiB", "/MiB"),
    ("memory", "overhead", "bytes_per_owned_membership", "  of a new_channel() name", "B"),
    ("memory", "group_send", "channel_bytes", "10 KiB group_send to 1000, memory", "B"),
    ("memory", "group_send", "bytes_per_member", "  per member beyond one payload", "B"),
    ("reap", "half killed", "reap_seconds", "killed members' memberships gone", "s"),
    ("reap", "half killed", "group_send_us", "group_send after, to all members", "us"),
    ("reap", "half killed", "live_group_send_us", "  to the live members alone", "us"),
    ("reap", "half killed", "over_live_alone", "  all / live alone", "x"),
]


def build_rows(results: dict) -> list[Row]:
    rows = []
    for workload, case, metric, label, unit in ROW_SPECS:
        cell = results.get(workload, {}).get(case)
        if not cell:
            continue
        values: dict[str, float | None] = {}
        counts: dict[str, str] = {}
        for backend in BACKENDS:
            result = cell.get(backend)
            if result is None:
                continue
            if "error" in result:
                values[backend], counts[backend] = None, "error"
                continue
            values[backend] = result.get(metric)
            note = f"n={num(result['counted'])}"
            if result["counted"] != result["expected"]:
                note += f"/{num(result['expected'])}!"
            counts[backend] = note
        row = Row(workload, case, metric, label, unit, values, counts)
        row.fastest_peer = fastest_peer(cell, metric)
        mine = values.get(IPC)
        if row.fastest_peer is not None and mine is not None:
            row.peer_ratio = mine / cell[row.fastest_peer][metric]
        target = BY_KEY.get((workload, case, metric))
        if target is not None:
            row.target = target.goal()
            row.ratio, row.met, _ = target.judge(results)
            row.ratio_over = target.over
        rows.append(row)
    return rows


def render_table(rows: list[Row], header: dict) -> str:
    measured = {backend for row in rows for backend in row.values}
    columns = [backend for backend in BACKENDS if backend in measured]
    table = [["workload", "unit", *(COLUMNS[b] for b in columns), "vs fastest peer", "target"]]
    for row in rows:
        line = [row.label, row.unit]
        for backend in columns:
            if backend in row.values:
                line.append(f"{num(row.values[backend])} {row.counts[backend]}")
            else:
                line.append("-")
        line.append(f"{num(row.peer_ratio)} /{SHORT[row.fastest_peer]}"
                    if row.fastest_peer else "-")
        target = row.target
        if target and not header["quick"]:
            over = f" /{SHORT[row.ratio_over]}" if row.ratio_over not in (None, FASTEST_PEER) \
                else ""
            verdict = {True: "met", False: "MISSED", None: "n/a"}[row.met]
            target += f": {num(row.ratio)}{over} {verdict}"
        line.append(target)
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    text = []
    for line in table:
        cells = [f"{line[0]:{widths[0]}}", f"{line[1]:{widths[1]}}"]
        cells += [f"{cell:>{w}}" for cell, w in zip(line[2:-1], widths[2:], strict=True)]
        text.append("  ".join([*cells, line[-1]]).rstrip())
    text.insert(1, "-" * len(text[0]))
    peers = "; ".join(f"{name}: {note}" for name, note in header["peers"].items())
    return "\n".join([
        f"asgi_ipc benchmark: Python {header['python']}, {header['cpus']} CPUs, "
        f"{'quick' if header['quick'] else 'full'} run; {peers}",
        "",
        *text,
        "",
        "n = messages (deliveries, records) counted intact and in order; "
        "'!' marks a count short of what was sent.",
        "vs fastest peer = asgi_ipc's figure over the best of the peers on that row that "
        "counted every message (redis: RedisChannelLayer, pubsub: RedisPubSubChannelLayer, "
        "nats: channels_nats). A target over another figure names it (in-mem: "
        "InMemoryChannelLayer, floor: a bare asyncio ping-pong over Unix datagram sockets "
        "between two processes, the least a round trip between processes costs).",
        *(["A quick run is too short to judge the targets: run without --quick."]
          if header["quick"] else []),
    ])
