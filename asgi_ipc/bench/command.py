"""The command line of ``asgi-ipc bench`` (``python -m asgi_ipc.bench``): options, the servers
of the peers that can run (a redis-server for channels_redis's two layers, a nats-server for
channels-nats; a peer that cannot is left out with one line on stderr saying why), the run, and
the report on stdout (a table, or one JSON document with ``--json``); progress goes to stderr.
``--targets`` prints the targets table (``targets.py``) as the README shows it, and runs nothing.

SIGINT and SIGTERM end the run cleanly: the stores, the worker processes and the servers are
removed however the run ends.
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
from dataclasses import asdict, dataclass
from importlib import metadata

from .layers import NATS, REDIS, REDIS_PUBSUB, clock
from .nats_server import NatsServer
from .redis_server import RedisServer
from .report import build_rows, render_table
from .server import ThrowAwayServer
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


@dataclass(frozen=True)
class Peer:
    """A package of peer layers and the server they run against."""

    name: str  # as --no-NAME and the report's header say it
    package: str  # what is imported
    distribution: str  # what pip installs
    binary: str
    server: type[ThrowAwayServer]
    layers: tuple[str, ...]


PEER_PACKAGES = (
    Peer("redis", "channels_redis", "channels_redis", "redis-server", RedisServer,
         (REDIS, REDIS_PUBSUB)),
    Peer("nats", "channels_nats", "channels-nats", "nats-server", NatsServer, (NATS,)),
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="asgi-ipc bench",
        description="Compare asgi_ipc with channels_redis (both its layers), channels-nats and "
                    "InMemoryChannelLayer.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--quick", action="store_true",
                        help="small counts (a smoke test, not a measurement)")
    parser.add_argument("--only", metavar="NAME[,NAME]", type=_workloads, default=list(WORKLOADS),
                        help=f"run only these workloads: {', '.join(WORKLOADS)}")
    for peer in PEER_PACKAGES:
        parser.add_argument(f"--no-{peer.name}", action="store_true",
                            help=f"leave {peer.package} out")
    parser.add_argument("--multihost", action="store_true",
                        help="run the multi-host section alone: MultiHostChannelLayer against "
                             "RedisChannelLayer on one redis-server, Redis commands counted")
    parser.add_argument("--targets", action="store_true",
                        help="print the targets table (as the README shows it) and run nothing")
    if argv and argv[0] == "--":
        # What a wrapping command line passes on when told `bench -- --quick ...`.
        argv = argv[1:]
    return parser.parse_args(argv)


def _start_peers(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[dict, dict]:
    """The server URL of each peer layer that can run, and a note on each peer package: its
    server, or why it was left out (also said on stderr)."""
    urls: dict[str, str] = {}
    notes: dict[str, str] = {}
    for peer in PEER_PACKAGES:
        binary = shutil.which(peer.binary)
        if getattr(args, f"no_{peer.name}"):
            note = f"skipped (--no-{peer.name})"
        elif importlib.util.find_spec(peer.package) is None:
            note = f"skipped ({peer.distribution} is not installed: pip install 'asgi_ipc[bench]')"
        elif binary is None:
            note = f"skipped ({peer.binary} not found on PATH)"
        else:
            server = stack.enter_context(peer.server(binary))
            urls.update(dict.fromkeys(peer.layers, server.url))
            notes[peer.name] = (f"{peer.distribution} {metadata.version(peer.distribution)} "
                                f"against {server.version} on 127.0.0.1:{server.port}")
            continue
        notes[peer.name] = note
        print(f"{peer.package} {note}", file=sys.stderr)
    return urls, notes


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
    if args.multihost:
        return _multihost(args)
    scale = QUICK if args.quick else FULL
    previous = {}
    if _in_main_thread():
        # SIGTERM becomes an exception so that the cleanup below (stores, workers, servers)
        # runs. SIGINT gets the same handler: asyncio.run() would otherwise install its own,
        # which cancels the running workload and can lose the interrupt in the error that
        # follows.
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _terminate)
    try:
        with contextlib.ExitStack() as stack:
            urls, notes = _start_peers(args, stack)
            bench = Bench(scale, urls)
            stack.callback(bench.close)
            started = clock()
            results = bench.run(args.only)
            elapsed = clock() - started
    except KeyboardInterrupt:
        print("interrupted; stores removed and servers stopped", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    header = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "peers": notes,
        "seconds": round(elapsed, 1),
    }
    rows = build_rows(results)
    ok = _all_counted(results)
    if args.json:
        document = {
            **header,
            **{f"{peer.name}_skipped": peer.layers[0] not in urls for peer in PEER_PACKAGES},
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


def _multihost(args: argparse.Namespace) -> int:
    """The multi-host section (multihost.py), against a redis-server of its own."""
    from . import multihost

    binary = shutil.which("redis-server")
    if binary is None or importlib.util.find_spec("channels_redis") is None:
        print("the multi-host section needs redis-server on PATH and channels_redis "
              "(pip install 'asgi_ipc[bench,redis]')", file=sys.stderr)
        return 2
    with RedisServer(binary) as server:
        results = multihost.run(server.url, args.quick)
    if args.json:
        print(json.dumps({"quick": args.quick, "cpus": os.cpu_count(),
                          "redis": server.version, "multihost": results}, indent=2))
    else:
        print(multihost.render(results))
    return 0


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

