"""The report of a run: one row per figure shown, with each backend's value and count, the ratio
of asgi_ipc's value to the backend its target names (channels_redis for a row with no target;
none for a target on asgi_ipc's figure itself), and the target with its verdict
(``targets.py``), as a table on stdout; ``command.py`` puts the same rows in the ``--json``
document.

A count ``n=`` is what arrived intact and in order; ``!`` marks one short of what was sent, and
then the speed beside it is not worth reading.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import BACKENDS, FLOOR, IPC, MEMORY, REDIS
from .targets import BY_KEY

# Short names for the ratio column: the backend asgi_ipc's figure is divided by.
SHORT = {REDIS: "redis", MEMORY: "in-mem", FLOOR: "floor"}


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
    label: str
    unit: str
    values: dict[str, float | None]
    counts: dict[str, str]
    ratio: float | None = None
    #: The backend the ratio is over (None when the row has no ratio).
    ratio_over: str | None = None
    target: str = ""
    met: bool | None = None


# (workload, case, metric, label, unit, extra shown with the count)
ROW_SPECS = [
    ("pingpong", "2 processes", "p50_us", "ping-pong p50", "us", ""),
    ("pingpong", "2 processes", "p99_us", "ping-pong p99", "us", ""),
    ("oneway", "1->1", "msg_per_s", "one-way 1->1", "msg/s", ""),
    ("oneway", "4->4", "msg_per_s", "one-way 4->4", "msg/s", ""),
    ("fanout", "10", "deliveries_per_s", "fan-out 10 members", "deliv/s", "drops"),
    ("fanout", "100", "deliveries_per_s", "fan-out 100 members", "deliv/s", "drops"),
    ("fanout", "1000", "deliveries_per_s", "fan-out 1000 members", "deliv/s", "drops"),
    ("backlog", "send+receive", "empty_ops_per_s", "send+recv, empty store", "ops/s", ""),
    ("backlog", "send+receive", "loaded_ops_per_s", "send+recv, backlog elsewhere",
     "ops/s", ""),
    ("backlog", "send+receive", "loaded_over_empty", "  backlog / empty", "x", ""),
    ("sizes", "100 B", "mb_per_s", "size 100 B", "MB/s", ""),
    ("sizes", "10 KiB", "mb_per_s", "size 10 KiB", "MB/s", ""),
    ("sizes", "1 MiB", "mb_per_s", "size 1 MiB", "MB/s", ""),
    ("memory", "overhead", "overhead_per_message", "shm per message beyond payload", "B", ""),
    ("memory", "overhead", "bytes_per_membership", "shm per group membership", "B", ""),
    ("memory", "overhead", "memberships_per_mib", "memberships per MiB", "/MiB", ""),
    ("memory", "overhead", "bytes_per_owned_membership", "  of a new_channel() name", "B", ""),
    ("memory", "group_send", "channel_bytes", "10 KiB group_send to 1000, memory", "B", ""),
    ("memory", "group_send", "bytes_per_member", "  per member beyond one payload", "B", ""),
    ("reap", "half killed", "reap_seconds", "killed members' memberships gone", "s", ""),
    ("reap", "half killed", "group_send_us", "group_send after, to all members", "us", ""),
    ("reap", "half killed", "live_group_send_us", "  to the live members alone", "us", ""),
    ("reap", "half killed", "over_live_alone", "  all / live alone", "x", ""),
]


def build_rows(results: dict) -> list[Row]:
    rows = []
    for workload, case, metric, label, unit, extra in ROW_SPECS:
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
            if extra:
                note += f" {extra}={result.get(extra)}"
            counts[backend] = note
        target = BY_KEY.get((workload, case, metric))
        row = Row(label, unit, values, counts)
        if target is not None:
            row.target = target.goal()
            value, row.met = target.judge(results)
            if target.over is not None:
                row.ratio, row.ratio_over = value, target.over
        elif REDIS in values:
            a, b = values.get(IPC), values.get(REDIS)
            row.ratio = a / b if a is not None and b else None
            row.ratio_over = REDIS
        rows.append(row)
    return rows


def render_table(rows: list[Row], header: dict) -> str:
    columns = [("asgi_ipc", IPC), ("channels_redis", REDIS), ("in-memory", MEMORY),
               ("floor", FLOOR)]
    lines = [
        f"asgi_ipc benchmark: Python {header['python']}, {header['cpus']} CPUs, "
        f"{'quick' if header['quick'] else 'full'} run; channels_redis: {header['redis']}",
        "",
    ]
    head = f"{'workload':34} {'unit':7}" + "".join(f" {name:>22}" for name, _ in columns)
    head += f" {'ratio':>13}  target"
    lines += [head, "-" * len(head)]
    for row in rows:
        line = f"{row.label:34} {row.unit:7}"
        for _, backend in columns:
            if backend in row.values:
                cell = f"{num(row.values[backend])} {row.counts[backend]}"
            else:
                cell = "-"
            line += f" {cell:>22}"
        ratio = f"{num(row.ratio)} /{SHORT[row.ratio_over]}" if row.ratio_over else "-"
        line += f" {ratio:>13}"
        if row.target:
            line += f"  {row.target}"
            if not header["quick"]:
                line += " " + {True: "met", False: "MISSED", None: "n/a"}[row.met]
        lines.append(line)
    lines += [
        "",
        "n = messages (deliveries, records) counted intact and in order; "
        "'!' marks a count short of what was sent.",
        "ratio = asgi_ipc's figure over the one named (redis: channels_redis, in-mem: "
        "InMemoryChannelLayer, floor: a bare asyncio ping-pong over Unix datagram sockets "
        "between two processes, the least a round trip between processes costs).",
    ]
    if header["quick"]:
        lines.append("A quick run is too short to judge the targets: run without --quick.")
    return "\n".join(lines)
