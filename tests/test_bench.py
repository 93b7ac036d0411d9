"""The benchmark run as its users run it: ``python -m asgi_ipc.bench`` in a real subprocess.

Only correctness is asserted: that the JSON document is well formed, that every workload counted
every message it sent (nothing dropped, lost or reordered), and that no shared memory is left
behind. Speed is never asserted: these are --quick runs on a machine doing other things.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

SHM_DIR = "/dev/shm"
# The benchmark names its stores "bench" + random hex; other tests may come and go meanwhile.
BENCH_ENTRY = "asgi_ipc.bench"

CROSS_PROCESS = ("pingpong", "oneway", "fanout")
IN_PROCESS = ("backlog", "sizes")
EXPECTED_CASES = {
    "pingpong": {"2 processes"},
    "oneway": {"1->1", "4->4"},
    "fanout": {"10", "100", "1000"},
    "backlog": {"send+receive"},
    "sizes": {"100 B", "10 KiB", "1 MiB"},
    "memory": {"overhead"},
}


def bench_entries() -> set[str]:
    return {entry for entry in os.listdir(SHM_DIR) if entry.startswith(BENCH_ENTRY)}


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
            assert set(cell) == backends & {"asgi_ipc", "channels_redis"}, workload
    for workload in IN_PROCESS:
        for cell in results[workload].values():
            assert set(cell) == backends | {"in_memory"}, workload
    assert set(results["memory"]["overhead"]) == {"asgi_ipc"}
    for row in document["rows"]:
        assert {"label", "unit", "values", "counts", "ratio", "target", "met"} <= set(row)
    assert "[1/" in proc.stderr, "no progress shown on stderr"

    bad = failures(results)
    assert not bad, "\n".join(bad)
    assert document["all_counted"] is True
    assert proc.returncode == 0, proc.stderr[-3000:]
    return document


def test_quick_run_without_redis_counts_every_message():
    proc = run_bench("--quick", "--json", "--no-redis")
    document = check_document(proc, {"asgi_ipc"})
    assert document["redis_skipped"] is True
    memory = document["results"]["memory"]["overhead"]["asgi_ipc"]
    assert memory["bytes_per_message"] > memory["payload_bytes"]
    assert memory["bytes_per_membership"] > 0


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
    assert "ping-pong" not in proc.stdout
    assert "channels_redis skipped" in proc.stderr


def test_unknown_workload_is_refused():
    proc = run_bench("--only", "nosuch", "--no-redis")
    assert proc.returncode == 2
    assert "unknown workload" in proc.stderr
