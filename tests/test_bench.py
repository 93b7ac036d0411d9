"""The benchmark run as its users run it: ``python -m asgi_ipc.bench`` in a real subprocess.

Only correctness is asserted: that the JSON document is well formed, that every workload counted
every message it sent (nothing dropped, lost or reordered), that each target is judged on the
ratio it names, and that no shared memory is left behind. Speed is never asserted: these are
--quick runs on a machine doing other things.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from asgi_ipc.bench.layers import IPC, NATS, PEERS, REDIS, REDIS_PUBSUB
from asgi_ipc.bench.targets import BY_KEY, FASTEST_PEER, LOWER_IS_BETTER, TARGETS

SHM_DIR = "/dev/shm"
# The benchmark names its stores "bench" + random hex, and its floor's socket directories
# asgi_ipc_bench_floor_*; other tests may come and go meanwhile.
BENCH_ENTRIES = ("asgi_ipc.bench", "asgi_ipc_bench_floor_")

CROSS_PROCESS = ("pingpong", "oneway", "fanout", "fanout-1proc", "fanout-10proc")
IN_PROCESS = ("backlog", "sizes")
EXPECTED_CASES = {
    "pingpong": {"2 processes"},
    "oneway": {"1->1", "4->4"},
    "fanout": {"10", "100", "1000"},
    "fanout-1proc": {"100", "1000"},
    "fanout-10proc": {"1000"},
    "backlog": {"send+receive"},
    "sizes": {"100 B", "10 KiB", "1 MiB"},
    "memory": {"overhead", "group_send"},
    "reap": {"half killed"},
}
REDIS_LAYERS = {REDIS, REDIS_PUBSUB}


def runnable(package: str, binary: str) -> bool:
    return importlib.util.find_spec(package) is not None and shutil.which(binary) is not None


# The peers this machine can run: each is measured when it can be, and left out with a note
# when it cannot (the bench starts their servers itself).
REDIS_RUNS = runnable("channels_redis", "redis-server")
NATS_RUNS = runnable("channels_nats", "nats-server")


def bench_entries() -> set[str]:
    return {entry for entry in os.listdir(SHM_DIR) if entry.startswith(BENCH_ENTRIES)}


def run_bench(*args: str, timeout: float = 120, env: dict | None = None,
              ) -> subprocess.CompletedProcess:
    before = bench_entries()
    proc = subprocess.run(
        [sys.executable, "-m", "asgi_ipc.bench", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
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


def check_document(proc: subprocess.CompletedProcess, backends: set[str],
                   workloads: dict[str, set[str]] = EXPECTED_CASES) -> dict:
    """``backends``: asgi_ipc and the peers that ran."""
    assert proc.stdout.strip(), f"no output; stderr:\n{proc.stderr[-3000:]}"
    document = json.loads(proc.stdout)
    results = document["results"]
    bad = failures(results)
    assert not bad, "\n".join(bad)
    assert document["all_counted"] is True
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(results) == set(workloads)
    for workload, cases in workloads.items():
        assert set(results[workload]) == cases, workload
    for workload in CROSS_PROCESS:
        for cell in results.get(workload, {}).values():
            # The ping-pong is measured over the floor too: two bare asyncio processes.
            floor = {"floor"} if workload == "pingpong" else set()
            assert set(cell) == backends | floor, workload
    for workload in IN_PROCESS:
        for cell in results.get(workload, {}).values():
            # Of the peers, only RedisChannelLayer keeps a queue to measure in one process.
            assert set(cell) == backends - {REDIS_PUBSUB, NATS} | {"in_memory"}, workload
    for workload in ("memory", "reap"):
        for cell in results.get(workload, {}).values():
            assert set(cell) == {"asgi_ipc"}, workload
    for row in document["rows"]:
        assert {"workload", "case", "metric", "label", "unit", "values", "counts", "peer_ratio",
                "fastest_peer", "ratio", "ratio_over", "target", "met"} <= set(row)
        check_fastest_peer(row, backends & set(PEERS))
    check_targets(document["rows"], peers=backends & set(PEERS),
                  judged={(w, c) for w, cases in workloads.items() for c in cases})
    assert "[1/" in proc.stderr, "no progress shown on stderr"
    return document


def better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def check_fastest_peer(row: dict, peers: set[str]) -> None:
    """The row's ratio is over the best of the peers that ran on it, named."""
    mine = row["values"].get(IPC)
    figures = {p: v for p, v in row["values"].items() if p in peers and v is not None}
    if not figures or mine is None:
        assert row["fastest_peer"] is None and row["peer_ratio"] is None, row
        return
    best = (min if row["metric"] in LOWER_IS_BETTER else max)(figures.values())
    assert row["fastest_peer"] in figures and figures[row["fastest_peer"]] == best, row
    assert row["peer_ratio"] == mine / best, row


def check_targets(rows: list[dict], peers: set[str], judged: set[tuple[str, str]]) -> None:
    """Every target of the workloads run has its row, judged on the ratio it names, measured in
    this run; one over the fastest peer is over the row's fastest peer."""
    by_key = {(row["workload"], row["case"], row["metric"]): row for row in rows}
    targets = [t for t in TARGETS if (t.workload, t.case) in judged]
    assert {key for key, row in by_key.items() if row["target"]} == {t.key for t in targets}
    for target in targets:
        row = by_key[target.key]
        assert row["target"] == target.goal(), row
        assert row["ratio_over"] == target.over, row
        mine = row["values"]["asgi_ipc"]
        if target.over is None:
            assert row["ratio"] == mine, row
            continue
        if target.over == FASTEST_PEER:
            if not peers:
                assert row["ratio"] is None and row["met"] is None, row
                continue
            assert row["ratio"] == row["peer_ratio"], row
        else:
            assert row["ratio"] == mine / row["values"][target.over], row
        within = (row["ratio"] <= target.bound if target.op == "<=" else
                  row["ratio"] >= target.bound)
        if target.ahead_of_peers:
            ahead = [better(target.metric, mine, v) for p, v in row["values"].items()
                     if p in peers]
            assert row["met"] is (within and all(ahead) if ahead else None), row
        else:
            assert row["met"] is within or target.no_drops, row
    if ("pingpong", "2 processes", "p50_us") in by_key:
        floor = by_key["pingpong", "2 processes", "p50_us"]["values"]["floor"]
        assert floor is not None and floor > 0


def test_quick_run_without_peers_counts_every_message():
    proc = run_bench("--quick", "--json", "--no-redis", "--no-nats")
    document = check_document(proc, {IPC})
    assert document["redis_skipped"] is True and document["nats_skipped"] is True
    assert document["peers"] == {"redis": "skipped (--no-redis)", "nats": "skipped (--no-nats)"}
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
    # The members of the fan-outs are where the workload puts them.
    for workload, case, processes in (("fanout-1proc", "1000", 1), ("fanout-10proc", "1000", 10)):
        result = document["results"][workload][case]["asgi_ipc"]
        assert result["members"] == 1000 and result["processes"] == processes


@pytest.mark.skipif(not (REDIS_RUNS or NATS_RUNS),
                    reason="neither channels_redis with redis-server nor channels_nats with "
                           "nats-server can run here")
def test_quick_run_with_the_peers_counts_every_message():
    proc = run_bench("--quick", "--json")
    peers = (REDIS_LAYERS if REDIS_RUNS else set()) | ({NATS} if NATS_RUNS else set())
    document = check_document(proc, {IPC} | peers)
    assert document["redis_skipped"] is not REDIS_RUNS
    assert document["nats_skipped"] is not NATS_RUNS
    pingpong = document["results"]["pingpong"]["2 processes"]
    for peer in peers:
        assert pingpong[peer]["rounds"] > 0
    for name, runs in (("redis", REDIS_RUNS), ("nats", NATS_RUNS)):
        note = document["peers"][name]
        assert note.startswith("skipped (") is not runs, note
        assert (f"channels_{name} skipped (" in proc.stderr) is not runs


def test_a_peer_whose_server_is_missing_is_left_out_with_a_note(tmp_path):
    # A PATH that has redis-server (when this machine does) but no nats-server.
    redis_server = shutil.which("redis-server")
    if redis_server:
        os.symlink(redis_server, tmp_path / "redis-server")
    env = dict(os.environ, PATH=str(tmp_path))
    workloads = {"pingpong": EXPECTED_CASES["pingpong"],
                 "fanout-1proc": EXPECTED_CASES["fanout-1proc"]}
    proc = run_bench("--quick", "--json", "--only", ",".join(workloads), env=env)
    document = check_document(proc, {IPC} | (REDIS_LAYERS if REDIS_RUNS else set()), workloads)
    assert document["nats_skipped"] is True
    if importlib.util.find_spec("channels_nats") is None:
        reason = "channels-nats is not installed: pip install 'asgi_ipc[bench]'"
    else:
        reason = "nats-server not found on PATH"
    assert document["peers"]["nats"] == f"skipped ({reason})"
    assert f"channels_nats skipped ({reason})" in proc.stderr


def test_table_output_and_only():
    proc = run_bench("--quick", "--no-redis", "--no-nats", "--only", "memory")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shm per message beyond payload" in proc.stdout
    assert "every message counted" in proc.stdout
    assert "ping-pong p50" not in proc.stdout
    assert "channels_redis skipped (--no-redis)" in proc.stderr
    assert "channels_nats skipped (--no-nats)" in proc.stderr
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
        "pingpong": {"2 processes": {"asgi_ipc": {"p50_us": 300.0},
                                     "floor": {"p50_us": 100.0}}},
        "fanout-1proc": {"1000": {
            "asgi_ipc": {"deliveries_per_s": 70.0, "drops": 1},
            "channels_redis": {"deliveries_per_s": 10.0, "ok": True},
            "channels_nats": {"deliveries_per_s": 50.0, "ok": True},
            # Faster, but it lost messages: its figure is not worth reading.
            "channels_redis_pubsub": {"deliveries_per_s": 90.0, "ok": False},
        }},
    }
    pingpong = BY_KEY["pingpong", "2 processes", "p50_us"]
    assert pingpong.judge(results) == (3.0, None, "floor")  # no peer ran: not judged
    cell = results["pingpong"]["2 processes"]
    cell["channels_nats"] = {"p50_us": 400.0, "ok": True}
    assert pingpong.judge(results) == (3.0, False, "floor")
    cell["floor"]["p50_us"] = 200.0
    assert pingpong.judge(results) == (1.5, True, "floor")
    cell["channels_redis_pubsub"] = {"p50_us": 250.0, "ok": True}
    assert pingpong.judge(results) == (1.5, False, "floor")  # near the floor, behind a peer

    fanout = BY_KEY["fanout-1proc", "1000", "deliveries_per_s"]
    assert fanout.judge(results) == (1.4, False, "channels_nats")  # a delivery was dropped
    cell = results["fanout-1proc"]["1000"]
    cell["asgi_ipc"]["drops"] = 0
    assert fanout.judge(results) == (1.4, True, "channels_nats")
    cell["channels_redis_pubsub"]["ok"] = True
    assert fanout.judge(results) == (70 / 90, False, "channels_redis_pubsub")
    for peer in PEERS:
        del cell[peer]
    assert fanout.judge(results) == (None, None, None)  # no peer ran: not judged

    memory = BY_KEY["memory", "group_send", "channel_bytes"]
    assert memory.bound == 10 * 1024 + 1000 * 64 + 4 * 1024
    assert memory.judge({"memory": {"group_send": {"asgi_ipc": {"channel_bytes": 10e6}}}}) == (
        10e6, False, None
    )


def test_unknown_workload_is_refused():
    proc = run_bench("--only", "nosuch", "--no-redis")
    assert proc.returncode == 2
    assert "unknown workload" in proc.stderr
