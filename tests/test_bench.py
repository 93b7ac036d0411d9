"""The benchmark run as its users run it: ``python -m asgi_ipc.bench`` in a real subprocess.

Only correctness is asserted: that the JSON document is well formed, that every workload counted
every message it sent (nothing dropped, lost or reordered), that each target is judged on the
ratio it names, and that no shared memory is left behind. Speed is never asserted: these are
--quick runs on a machine doing other things.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from asgi_ipc.bench.targets import BY_KEY, TARGETS

SHM_DIR = "/dev/shm"
# The benchmark names its stores "bench" + random hex, and its floor's socket directories
# asgi_ipc_bench_floor_*; other tests may come and go meanwhile.
BENCH_ENTRIES = ("asgi_ipc.bench", "asgi_ipc_bench_floor_")

CROSS_PROCESS = ("pingpong", "oneway", "fanout")
IN_PROCESS = ("backlog", "sizes")
EXPECTED_CASES = {
    "pingpong": {"2 processes"},
    "oneway": {"1->1", "4->4"},
    "fanout": {"10", "100", "1000"},
    "backlog": {"send+receive"},
    "sizes": {"100 B", "10 KiB", "1 MiB"},
    "memory": {"overhead", "group_send"},
    "reap": {"half killed"},
}


def bench_entries() -> set[str]:
    return {entry for entry in os.listdir(SHM_DIR) if entry.startswith(BENCH_ENTRIES)}


def run_bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    before = bench_entries()
    proc = subprocess.run(
        [sys.executable, "-m", "asgi_ipc.bench", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    left = bench_entries() - before
    assert not left, f"the benchmark left shared memory behind: {sorted(left)}"
    return proc


def failures(results: dict) -> list[str]:
    """Every result that errored or did not count exactly what it should have."""
    bad = []
    for workload, cases in results.items():
        for case, cell in cases.items():
            for backend, result in cell.items():
                where = f"{workload} {case} {backend}"
                if "error" in result:
                    bad.append(f"{where}: {result['error']}")
                    continue
                if not result["expected"] or result["counted"] != result["expected"]:
                    bad.append(
                        f"{where}: counted {result['counted']} of {result['expected']} "
                        f"({json.dumps(result, default=str)[:400]})"
                    )
                if result.get("drops"):
                    bad.append(f"{where}: {result['drops']} dropped")
                if result.get("stalled"):
                    bad.append(f"{where}: a receiver was never woken")
                if result.get("problems"):
                    bad.append(f"{where}: store problems {result['problems']}")
    return bad


def check_document(proc: subprocess.CompletedProcess, backends: set[str]) -> dict:
    assert proc.stdout.strip(), f"no output; stderr:\n{proc.stderr[-3000:]}"
    document = json.loads(proc.stdout)
    results = document["results"]
    assert set(results) == set(EXPECTED_CASES)
    for workload, cases in EXPECTED_CASES.items():
        assert set(results[workload]) == cases, workload
    for workload in CROSS_PROCESS:
        for cell in results[workload].values():
            # The ping-pong is measured over the floor too: two bare asyncio processes.
            floor = {"floor"} if workload == "pingpong" else set()
            assert set(cell) == backends & {"asgi_ipc", "channels_redis"} | floor, workload
    for workload in IN_PROCESS:
        for cell in results[workload].values():
            assert set(cell) == backends | {"in_memory"}, workload
    for workload in ("memory", "reap"):
        for cell in results[workload].values():
            assert set(cell) == {"asgi_ipc"}, workload
    for row in document["rows"]:
        assert {"label", "unit", "values", "counts", "ratio", "ratio_over", "target", "met"} <= (
            set(row)
        )
    check_targets(document["rows"], redis="channels_redis" in backends)
    assert "[1/" in proc.stderr, "no progress shown on stderr"

    bad = failures(results)
    assert not bad, "\n".join(bad)
    assert document["all_counted"] is True
    assert proc.returncode == 0, proc.stderr[-3000:]
    return document


def check_targets(rows: list[dict], redis: bool) -> None:
    """Every target has its row, judged on the ratio it names, measured in this run."""
    by_label = {row["label"]: row for row in rows}
    judged = {row["target"]: row for row in rows if row["target"]}
    assert set(judged) == {target.goal() for target in TARGETS}
    for target in TARGETS:
        row = judged[target.goal()]
        if target.over is None:
            assert row["ratio"] is None and row["ratio_over"] is None, row
            continue
        assert row["ratio_over"] == target.over, row
        if target.over == "channels_redis" and not redis:
            assert row["ratio"] is None and row["met"] is None, row
            continue
        value, base = row["values"]["asgi_ipc"], row["values"][target.over]
        assert row["ratio"] == value / base, row
        assert row["met"] is (row["ratio"] <= target.bound if target.op == "<=" else
                              row["ratio"] >= target.bound) or target.no_drops, row
    floor = by_label["ping-pong p50"]["values"]["floor"]
    assert floor is not None and floor > 0


def test_quick_run_without_redis_counts_every_message():
    proc = run_bench("--quick", "--json", "--no-redis")
    document = check_document(proc, {"asgi_ipc"})
    assert document["redis_skipped"] is True
    memory = document["results"]["memory"]["overhead"]["asgi_ipc"]
    assert memory["bytes_per_message"] > memory["payload_bytes"]
    assert memory["bytes_per_membership"] > 0
    # One 10 KiB group_send to 1000 members, every delivery received intact, its memory read
    # from the store's own accounting: at least the payload once.
    group_send = document["results"]["memory"]["group_send"]["asgi_ipc"]
    assert group_send["counted"] == group_send["members"] == 1000
    assert group_send["payload_bytes"] == 10 * 1024
    assert group_send["channel_bytes"] >= group_send["payload_bytes"]
    floor = document["results"]["pingpong"]["2 processes"]["floor"]
    assert floor["counted"] == floor["expected"] == floor["echoed"] > 0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_quick_run_with_redis_counts_every_message():
    proc = run_bench("--quick", "--json")
    document = check_document(proc, {"asgi_ipc", "channels_redis"})
    assert document["redis_skipped"] is False
    pingpong = document["results"]["pingpong"]["2 processes"]
    assert pingpong["channels_redis"]["rounds"] > 0


def test_table_output_and_only():
    proc = run_bench("--quick", "--no-redis", "--only", "memory")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shm per message beyond payload" in proc.stdout
    assert "every message counted" in proc.stdout
    assert "ping-pong p50" not in proc.stdout
    assert "channels_redis skipped" in proc.stderr
    # A quick run prints the targets but judges none of them.
    assert "asgi_ipc <= 64 B" in proc.stdout
    assert " met" not in proc.stdout and "MISSED" not in proc.stdout


def test_targets_table_is_the_one_the_report_judges_by():
    proc = run_bench("--targets")
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.strip().splitlines()
    # A reStructuredText simple table: a rule, the heading, a rule, a row per target, a rule.
    rule = table[0]
    assert set(rule) == {"=", " "} and table[2] == table[-1] == rule
    assert len(table) == len(TARGETS) + 4
    for line, target in zip(table[3:-1], TARGETS, strict=True):
        assert line.startswith(target.what) and line.rstrip().endswith(target.goal())
    # The README shows the same table, so that what it promises is what the report judges.
    with open(os.path.join(os.path.dirname(__file__), "..", "README.rst"), encoding="utf-8") as f:
        assert proc.stdout.strip() in f.read()


def test_targets_judge_the_ratio_they_name():
    results = {
        "pingpong": {"2 processes": {"asgi_ipc": {"p50_us": 300.0}, "floor": {"p50_us": 100.0}}},
        "fanout": {"1000": {"asgi_ipc": {"deliveries_per_s": 70.0, "drops": 1},
                            "channels_redis": {"deliveries_per_s": 10.0}}},
    }
    pingpong = BY_KEY["pingpong", "2 processes", "p50_us"]
    assert pingpong.judge(results) == (3.0, False)
    results["pingpong"]["2 processes"]["floor"]["p50_us"] = 200.0
    assert pingpong.judge(results) == (1.5, True)
    fanout = BY_KEY["fanout", "1000", "deliveries_per_s"]
    assert fanout.judge(results) == (7.0, False)  # fast enough, but a delivery was dropped
    results["fanout"]["1000"]["asgi_ipc"]["drops"] = 0
    assert fanout.judge(results) == (7.0, True)
    del results["fanout"]["1000"]["channels_redis"]
    assert fanout.judge(results) == (None, None)  # not measured: not judged
    memory = BY_KEY["memory", "group_send", "channel_bytes"]
    assert memory.bound == 10 * 1024 + 1000 * 64 + 4 * 1024
    assert memory.judge({"memory": {"group_send": {"asgi_ipc": {"channel_bytes": 10e6}}}}) == (
        10e6, False
    )


def test_unknown_workload_is_refused():
    proc = run_bench("--only", "nosuch", "--no-redis")
    assert proc.returncode == 2
    assert "unknown workload" in proc.stderr
