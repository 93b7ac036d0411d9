"""The command line of ``asgi-ipc bench`` (``python -m asgi_ipc.bench``): options, the
redis-server when channels_redis can run, the run, and the report on stdout (a table, or one
JSON document with ``--json``); progress goes to stderr. ``--targets`` prints the targets table
(``targets.py``) as the README shows it, and runs nothing.

SIGINT and SIGTERM end the run cleanly: the stores, the worker processes and the redis-server
are removed however the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import sys
import threading
from dataclasses import asdict

from .layers import clock
from .redis_server import RedisServer
from .report import build_rows, render_table
from .targets import rst_table
from .workloads import FULL, QUICK, WORKLOADS, Bench


def _workloads(text: str) -> list[str]:
    """The workloads named in ``text``, in the order they run."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    return [w for w in WORKLOADS if w in names]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="asgi-ipc bench",
        description="Compare asgi_ipc with channels_redis and InMemoryChannelLayer.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--quick", action="store_true",
                        help="small counts (a smoke test, not a measurement)")
    parser.add_argument("--only", metavar="NAME[,NAME]", type=_workloads, default=list(WORKLOADS),
                        help=f"run only these workloads: {', '.join(WORKLOADS)}")
    parser.add_argument("--no-redis", action="store_true", help="leave channels_redis out")
    parser.add_argument("--targets", action="store_true",
                        help="print the targets table (as the README shows it) and run nothing")
    if argv and argv[0] == "--":
        # What a wrapping command line passes on when told `bench -- --quick ...`.
        argv = argv[1:]
    return parser.parse_args(argv)


def _all_counted(results: dict) -> bool:
    return all(
        result.get("ok") for cases in results.values() for cell in cases.values()
        for result in cell.values()
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every message was counted, 1 when any went missing."""
    args = _parse(argv)
    if args.targets:
        print(rst_table())
        return 0
    scale = QUICK if args.quick else FULL
    previous = {}
    if _in_main_thread():
        # SIGTERM becomes an exception so that the cleanup below (stores, workers, redis-server)
        # runs. SIGINT gets the same handler: asyncio.run() would otherwise install its own,
        # which cancels the running workload and can lose the interrupt in the error that
        # follows.
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _terminate)
    try:
        with contextlib.ExitStack() as stack:
            redis_note = "skipped (--no-redis)"
            redis_url = None
            if not args.no_redis:
                binary = shutil.which("redis-server")
                if importlib.util.find_spec("channels_redis") is None:
                    redis_note = (
                        "skipped (channels_redis is not installed: "
                        "pip install 'asgi_ipc[bench]')"
                    )
                elif binary is None:
                    redis_note = "skipped (redis-server not found)"
                else:
                    server = stack.enter_context(RedisServer(binary))
                    redis_url = server.url
                    redis_note = f"{server.version.split(' sha=')[0]} on 127.0.0.1:{server.port}"
            if redis_url is None:
                print(f"channels_redis {redis_note}", file=sys.stderr)
            bench = Bench(scale, redis_url)
            stack.callback(bench.close)
            started = clock()
            results = bench.run(args.only)
            elapsed = clock() - started
    except KeyboardInterrupt:
        print("interrupted; stores removed and redis-server stopped", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    header = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "redis": redis_note,
        "seconds": round(elapsed, 1),
    }
    rows = build_rows(results)
    ok = _all_counted(results)
    if args.json:
        document = {
            **header,
            "redis_skipped": redis_url is None,
            "workloads": args.only,
            "scale": asdict(scale) | {"size_ops": {str(k): v for k, v in scale.size_ops.items()}},
            "all_counted": ok,
            "results": results,
            "rows": [asdict(row) for row in rows],
        }
        print(json.dumps(document, indent=2))
    else:
        print(render_table(rows, header))
        print(f"\n{'every message counted' if ok else 'SOME MESSAGES WERE NOT COUNTED'}; "
              f"{header['seconds']} s")
    return 0 if ok else 1


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

