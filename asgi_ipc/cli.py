"""The ``asgi-ipc`` command line: look inside a prefix's store, check it, empty it, remove it,
list the stores of this user, run a demo, and run the benchmark.

Exit status: 0 when all is well, 1 when ``verify`` finds problems, 2 when the store is missing,
corrupt or not ours (a symlink, another user's, open to others: ``ForeignObject``), or the
command was misused; each of those is one line on stderr. No command follows a symlink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import stat
import sys
import time

from .exceptions import StoreError
from .layout import NAME_PREFIX, SHM_DIR, WAKE_DIR_SUFFIX, store_path, validate_prefix
from .observe import add_commands as add_observe_commands
from .private import check_private, describe
from .segment import unlink
from .store import Store

FILE_PREFIX = NAME_PREFIX.lstrip("/")


def _open(prefix: str) -> Store:
    # The sizes only matter when creating, and these commands never create.
    return Store(prefix, 0, 0, create=False)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _users_of(prefix: str) -> list[int]:
    """Pids of the other processes that have the store of ``prefix`` mapped."""
    path = store_path(prefix)
    users = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/maps") as maps:
                if any(line.rstrip().endswith(path) for line in maps):
                    users.append(int(entry))
        except OSError:
            continue
    return users


def cmd_stats(args: argparse.Namespace) -> int:
    store = _open(args.prefix)
    try:
        report = store.inspect()
    finally:
        store.close()
    report["processes_attached"] = _users_of(args.prefix)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"store {report['name']} (prefix {report['prefix']!r}), flush epoch {report['epoch']}")
    for area in ("channel_memory", "group_memory"):
        figures = report[area]
        print(
            f"  {area:15} {_size(figures['used']):>10} used of {_size(figures['size'])}, "
            f"{_size(figures['free'])} free, largest free block {_size(figures['largest_free'])}"
        )
    print(f"  channels        {report['channels']}, messages in flight {report['messages']}")
    print(f"  expired, not yet reclaimed: {_size(report['expired_bytes'])}")
    print(f"  groups          {report['groups']}, memberships {report['memberships']}")
    holder = report["lock_holder"]
    print(f"  lock            {f'held by pid {holder}' if holder else 'free'}")
    print(f"  waiting pids    {report['waiting_processes'] or '-'}")
    print(f"  attached pids   {report['processes_attached'] or '-'}")
    if report["deepest"]:
        print("  deepest channels:")
        for depth, name, waiters in report["deepest"]:
            print(f"    {depth:8}  {name}{f'  ({waiters} waiting)' if waiters else ''}")
    if report["largest"]:
        print("  largest groups:")
        for size, name in report["largest"]:
            print(f"    {size:8}  {name}")
    if report["problems"]:
        print(f"  {len(report['problems'])} problems: run `asgi-ipc verify --prefix {args.prefix}`")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open(args.prefix)
    try:
        problems = store.verify()
    finally:
        store.close()
    if problems:
        print(f"store of prefix {args.prefix!r} is inconsistent:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"store of prefix {args.prefix!r} is consistent")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    store = _open(args.prefix)
    try:
        store.flush()
    finally:
        store.close()
    print(f"flushed every channel and group of prefix {args.prefix!r}")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    users = _users_of(args.prefix)
    if users and not args.force:
        print(
            f"prefix {args.prefix!r} is in use by pids {users}; stop them first, or pass --force "
            "(they would go on with a store nobody else sees)",
            file=sys.stderr,
        )
        return 2
    if not unlink(args.prefix):
        print(f"no asgi_ipc store for prefix {args.prefix!r}", file=sys.stderr)
        return 2
    print(f"removed the store of prefix {args.prefix!r}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """This user's stores, and every object under an asgi_ipc name that the layer would refuse
    (it is a symlink, another user's, or open to others), marked foreign. A prefix's own
    wake-up directory is part of its store, not a store."""
    rows, foreign = [], []
    for entry in sorted(os.listdir(SHM_DIR)):
        if not entry.startswith(FILE_PREFIX):
            continue
        path = f"{SHM_DIR}/{entry}"
        is_wake_dir = entry.endswith(WAKE_DIR_SUFFIX)
        try:
            st = os.lstat(path)
            if is_wake_dir:
                check_private(path, st, stat.S_IFDIR, "a directory")
            else:
                check_private(path, st, stat.S_IFREG, "a regular file")
        except FileNotFoundError:
            continue  # removed since listdir
        except StoreError:
            foreign.append(f"{path} FOREIGN: {describe(st)}")
            continue
        if not is_wake_dir:
            rows.append((entry[len(FILE_PREFIX):], st.st_size, st.st_blocks * 512))
    if not rows:
        print("no asgi_ipc stores for this user")
    for prefix, size, resident in rows:
        print(f"{prefix:22} {_size(size):>10} reserved {_size(resident):>10} in memory")
    for line in foreign:
        print(line)
    return 0


def _demo_worker(prefix: str, number: int, ready) -> None:
    from .layer import IPCChannelLayer

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix)
        me = await layer.new_channel()
        await layer.group_add("demo", me)
        ready.put(me)
        while True:
            message = await layer.receive(me)
            if message["type"] == "demo.stop":
                break
            await layer.send(
                message["reply_to"],
                {"type": "demo.reply", "worker": number, "pid": os.getpid(),
                 "text": message["text"].upper()},
            )
        await layer.group_discard("demo", me)
        await layer.close()

    asyncio.run(run())


def cmd_demo(args: argparse.Namespace) -> int:
    from .layer import IPCChannelLayer

    prefix = "demo" + secrets.token_hex(4)
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    workers = [
        context.Process(target=_demo_worker, args=(prefix, n, ready))
        for n in range(args.processes)
    ]

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix)
        inbox = await layer.new_channel()
        for worker in workers:
            worker.start()
        for _ in workers:
            print(f"worker joined group 'demo' on channel {ready.get(timeout=30)}")
        for round_number in range(args.rounds):
            text = f"hello number {round_number}"
            started = time.perf_counter()
            await layer.group_send("demo", {"type": "demo.ask", "reply_to": inbox, "text": text})
            replies = [await layer.receive(inbox) for _ in workers]
            elapsed = (time.perf_counter() - started) * 1e6
            print(f"pid {os.getpid()} group_send {text!r}: {len(replies)} replies in "
                  f"{elapsed:.0f} us")
            for reply in sorted(replies, key=lambda r: r["worker"]):
                print(f"    worker {reply['worker']} (pid {reply['pid']}): {reply['text']!r}")
        await layer.group_send("demo", {"type": "demo.stop"})
        await layer.close()

    try:
        asyncio.run(run())
        for worker in workers:
            worker.join(10)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        unlink(prefix)
    print(f"{args.processes + 1} processes talked through shared memory; store removed")
    return 0


def _prefix(value: str) -> str:
    try:
        return validate_prefix(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asgi-ipc", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def with_prefix(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--prefix", default="asgi", type=_prefix,
                         help="the layer's prefix (default: asgi)")
        return sub

    stats = with_prefix("stats", "memory, channels, groups and processes of a store")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(run=cmd_stats)
    with_prefix("verify", "walk the whole store and report inconsistencies").set_defaults(
        run=cmd_verify
    )
    with_prefix("flush", "empty every channel and group").set_defaults(run=cmd_flush)
    unlink_parser = with_prefix("unlink", "remove the store's shared memory for good")
    unlink_parser.add_argument("--force", action="store_true",
                               help="remove it even while processes use it")
    unlink_parser.set_defaults(run=cmd_unlink)
    commands.add_parser("list", help="the stores of this user on this machine").set_defaults(
        run=cmd_list
    )
    demo = commands.add_parser("demo", help="processes exchanging messages through a store")
    demo.add_argument("--processes", type=int, default=3, help="worker processes (default 3)")
    demo.add_argument("--rounds", type=int, default=3, help="group_send rounds (default 3)")
    demo.set_defaults(run=cmd_demo)
    commands.add_parser("bench", help="asgi_ipc against channels_redis and in-memory (see "
                        "`asgi-ipc bench --help`)")
    add_observe_commands(commands, with_prefix)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # The benchmark parses its own options, "--json" and "--quick" among them.
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except StoreError as exc:
        print(f"asgi-ipc: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"asgi-ipc: no permission: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"asgi-ipc: {exc}", file=sys.stderr)
        return 2
