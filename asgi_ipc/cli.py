"""Look inside the shared-memory store of an asgi_ipc channel layer, check it, empty it or remove
it; list this user's stores; run a demo or the benchmark.

which store:
  --prefix NAME names it. Without it, the prefix is read from the asgi_ipc layer of the
  Django settings: --settings MODULE (or DJANGO_SETTINGS_MODULE in the environment), entry
  --alias of CHANNEL_LAYERS ("default" unless told). With neither, the prefix is "asgi".
  Django is imported only to read settings.

exit status:
  0    all is well (also when the reader of the output stops early, as head does)
  1    verify found problems in the store
  2    the command cannot run: no such store, one that is not an asgi_ipc store or is
       corrupt, one that is not ours (a symlink, another user's, open to others), bad
       arguments or settings, no permission, a store in use (unlink without --force)
  130  interrupted (Ctrl-C)
  Errors are one line on stderr. No command follows a symlink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import signal
import stat
import sys
import time
from dataclasses import dataclass

from . import ENGINE, __version__
from .commandline import bounded, columns, size
from .engine.compiled import FORCED, NOT_BUILT
from .engine.inbox import relay_state
from .engine.layout import NAME_PREFIX, SHM_DIR, store_path, validate_prefix, wake_dir_prefix
from .engine.segment import store_users, unlink
from .exceptions import StoreError, StoreInUse
from .layer import IPCChannelLayer
from .observe import add_commands as add_observe_commands
from .observe import relay_line
from .private import check_private, describe, open_private_file
from .receiver import Receiver

FILE_PREFIX = NAME_PREFIX.lstrip("/")

# The exit statuses listed in the module docstring.
PROBLEMS_FOUND, CANNOT_RUN, INTERRUPTED = 1, 2, 130
# The demo starts each worker as an interpreter of its own, one by one: a few dozen are plenty.
DEMO_PROCESSES = 32


def _open(prefix: str) -> Receiver:
    # The sizes only matter when creating, and these commands never create.
    return Receiver(prefix, 0, 0, create=False)


def _users_of(prefix: str) -> list[int]:
    """Pids of the other processes of this PID namespace that have the store of ``prefix``
    mapped: for display only, since processes of other namespaces are not found."""
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


def _keyed(report: dict) -> dict:
    """The report of ``Engine.inspect`` with its per-channel and per-group rows as objects."""
    return {
        **report,
        "deepest": [
            {"channel": name, "depth": depth, "waiting": waiting}
            for depth, name, waiting in report["deepest"]
        ],
        "largest": [{"group": name, "members": members} for members, name in report["largest"]],
    }


def _shown(listed: int, total: int) -> str:
    return f"all {total}" if listed == total else f"{listed} of {total}"


def _pids(pids: list[int]) -> str:
    return " ".join(map(str, pids)) or "-"


def _engine() -> str:
    """This command's engine, and why."""
    if ENGINE == "compiled":
        return "compiled (this command's; ASGI_IPC_PURE_PYTHON=1 forces python)"
    if FORCED:
        return "python (this command's, chosen by ASGI_IPC_PURE_PYTHON)"
    if NOT_BUILT is not None:
        return ("python (this command's): the compiled engine failed to build when asgi_ipc "
                f"was installed ({NOT_BUILT}); install gcc and python3-dev, then asgi_ipc again")
    return "python (this command's: the compiled engine is not built here)"


def cmd_stats(args: argparse.Namespace) -> int:
    store = _open(args.prefix)
    try:
        report = store.engine.inspect()
        engine = store.engine
        report["relay"] = relay_state(engine.words, engine.segment.fd, engine.clock())
    finally:
        store.close()
    report["processes_attached"] = _users_of(args.prefix)
    # This command's own engine: the store does not record which one each process runs.
    report["engine"] = ENGINE
    report["engine_not_built"] = NOT_BUILT
    report = _keyed(report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"store {report['name']} (prefix {report['prefix']!r}), flush epoch {report['epoch']}")
    for area in ("channel_memory", "group_memory"):
        figures = report[area]
        print(
            f"  {area.replace('_', ' '):16} {size(figures['used']):>10} used of "
            f"{size(figures['size'])}, {size(figures['free'])} free, "
            f"largest free block {size(figures['largest_free'])}"
        )
    print(f"  {'channels':16} {report['channels']} with messages or waiting receives, "
          f"{report['idle_records']} empty kept until the sweep")
    print(f"  {'messages':16} {report['messages']} queued; expired, not yet reclaimed: "
          f"{size(report['expired_bytes'])}")
    print(f"  {'groups':16} {report['groups']}, memberships {report['memberships']}")
    counters = report["counters"]
    print(f"  {'owned channels':16} {report['owned_channels']}, and of processes gone "
          f"{report['channels_to_reap']} still to reap; reaped so far: "
          f"{counters['reaped_channels']} channels, {counters['reaped_memberships']} "
          f"memberships, {counters['reaped_messages']} messages")
    holder = report["lock_holder"]
    print(f"  {'global lock':16} {f'held by pid {holder}' if holder else 'free'}")
    print(f"  {'pids with a slot':16} {_pids(report['waiting_processes'])}")
    print(f"  {'attached pids':16} {_pids(report['processes_attached'])}")
    print(f"  {'engine':16} {_engine()}")
    if report["relay"] is not None:
        print(f"  {'relay':16} {relay_line(report['relay'])}; relayed {counters['relayed']}, "
              f"skipped as applied already {counters['relay_fenced']}")
        print(f"  {'to other hosts':16} {counters['remote_sent']} sent, "
              f"{counters['remote_group_copies']} group_send copies, "
              f"{counters['remote_full']} refused (inbox full)")
    if report["dead_waiters"]:
        print(f"  {'exited waiters':16} {report['dead_waiters']} receives of processes that "
              "have exited, not counted above")
    if report["deepest"]:
        print(f"  deepest channels ({_shown(len(report['deepest']), report['channels'])}):")
        print(f"    {'depth':>8} {'waiting':>8}  channel")
        for row in report["deepest"]:
            print(f"    {row['depth']:8} {row['waiting']:8}  {row['channel']}")
    if report["largest"]:
        print(f"  largest groups ({_shown(len(report['largest']), report['groups'])}):")
        print(f"    {'members':>8}  group")
        for row in report["largest"]:
            print(f"    {row['members']:8}  {row['group']}")
    if report["problems"]:
        print(f"  {len(report['problems'])} problems: run `asgi-ipc verify --prefix {args.prefix}`")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open(args.prefix)
    try:
        problems = store.engine.verify()
    finally:
        store.close()
    if problems:
        print(f"store of prefix {args.prefix!r} is inconsistent:")
        for problem in problems:
            print(f"  - {problem}")
        return PROBLEMS_FOUND
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
    try:
        removed = unlink(args.prefix, unless_in_use=not args.force)
    except StoreInUse as exc:
        pids = _users_of(args.prefix)
        seen = (f"pids in this PID namespace: {_pids(pids)}" if pids
                else "none of them in this PID namespace")
        print(
            f"asgi-ipc: {exc} ({seen}); stop them first, or pass --force (they would go on "
            "with a store nobody else sees)",
            file=sys.stderr,
        )
        return CANNOT_RUN
    if not removed:
        print(f"asgi-ipc: no asgi_ipc store for prefix {args.prefix!r}", file=sys.stderr)
        return CANNOT_RUN
    print(f"removed the store of prefix {args.prefix!r}")
    return 0


def _users(path: str) -> tuple[int, int] | None:
    """``store_users`` of the store at ``path``, or None if it is gone."""
    try:
        fd = open_private_file(path, create=False)[0]
    except FileNotFoundError:
        return None
    try:
        return store_users(fd)
    finally:
        os.close(fd)


def _stores(count: int) -> str:
    return "1 store" if count == 1 else f"{count} stores"


@dataclass(eq=False)
class _Listed:
    """A store as ``list`` shows it."""

    prefix: str
    st: os.stat_result
    attached: int  # processes that have it open
    waiting: int  # process slots their receives wait in

    @property
    def state(self) -> str:
        return "in use" if self.attached else "not in use"


def cmd_list(args: argparse.Namespace) -> int:
    """This user's stores, with the processes that have each open and the process slots their
    receives wait in, from the byte locks, whatever PID namespace they run in; and every object
    under an asgi_ipc name that the layer would refuse (it is a symlink, another user's, or
    open to others), marked foreign. A prefix's own wake-up directory is part of its store, not
    a store. With --remove-abandoned, the stores no process has open are removed, each by
    ``unlink(unless_in_use=True)``, which looks again under the store lock."""
    stores, foreign = [], []
    for entry in sorted(os.listdir(SHM_DIR)):
        if not entry.startswith(FILE_PREFIX):
            continue
        path = f"{SHM_DIR}/{entry}"
        is_wake_dir = wake_dir_prefix(entry) is not None
        try:
            st = os.lstat(path)
            if is_wake_dir:
                check_private(path, st, stat.S_IFDIR, "a directory")
                continue
            check_private(path, st, stat.S_IFREG, "a regular file")
            users = _users(path)
        except FileNotFoundError:
            continue  # removed since listdir
        except StoreError:
            foreign.append(f"{path} FOREIGN: {describe(st)}")
            continue
        if users is not None:
            stores.append(_Listed(entry[len(FILE_PREFIX):], st, *users))
    removed = []
    if args.remove_abandoned:
        for store in stores:
            if store.attached:
                continue
            try:
                if unlink(store.prefix, unless_in_use=True):
                    removed.append(store)
            except StoreInUse as exc:  # a process opened it since
                store.attached, store.waiting = exc.attached, exc.waiting
    if not stores:
        print("no asgi_ipc stores for this user")
    else:
        table = [("prefix", "size", "in memory", "processes", "waiting", "modified", "state")]
        for store in stores:
            modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(store.st.st_mtime))
            table.append((store.prefix, size(store.st.st_size), size(store.st.st_blocks * 512),
                          str(store.attached), str(store.waiting), modified,
                          "removed" if store in removed else store.state))
        print("\n".join(columns(table)))
    for line in foreign:
        print(line)
    unused = [store for store in stores if not store.attached and store not in removed]
    if args.remove_abandoned and stores:
        print(f"removed {_stores(len(removed))} that no process had open" if removed
              else "no store to remove: every one is open in some process")
    elif unused:
        print(f"{len(unused)} not in use (open in no process, in any PID namespace): remove "
              "with asgi-ipc list --remove-abandoned")
    return 0


def _demo_worker(prefix: str, number: int, ready: multiprocessing.queues.Queue[str]) -> None:
    # Ctrl-C reaches the whole process group; the parent alone answers it, and ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

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


class CannotRun(Exception):
    """The command cannot run as asked (exit status 2); the message says why."""


def _prefix_from_settings(module: str, alias: str) -> str:
    """The prefix of CHANNEL_LAYERS[alias] in the Django settings ``module``, which must be an
    asgi_ipc layer. Django is imported here only, so the other commands run without it."""
    try:
        from django.conf import settings
        from django.utils.module_loading import import_string
    except ImportError:
        raise CannotRun("--settings needs Django, which is not installed here") from None
    # Run from a project's directory, as manage.py is: its settings module is found there.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    os.environ["DJANGO_SETTINGS_MODULE"] = module
    try:
        layers = getattr(settings, "CHANNEL_LAYERS", None)
    except Exception as exc:  # whatever the settings module raises while it is imported
        raise CannotRun(f"cannot load the settings module {module!r}: {exc}") from None
    where = f"CHANNEL_LAYERS[{alias!r}] of {module}"
    if not isinstance(layers, dict) or alias not in layers:
        known = ", ".join(map(repr, layers)) if isinstance(layers, dict) and layers else "none"
        raise CannotRun(f"there is no {where} (its layers: {known})")
    entry = layers[alias]
    backend = entry.get("BACKEND") if isinstance(entry, dict) else None
    try:
        cls = import_string(backend) if isinstance(backend, str) else None
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, IPCChannelLayer)):
        raise CannotRun(f"{where} is not an asgi_ipc layer (BACKEND {backend!r})")
    config = entry.get("CONFIG", {})
    try:
        return cls(**config).prefix  # builds no store: checks the options, fills in defaults
    except (TypeError, ValueError) as exc:
        raise CannotRun(f"{where}: {exc}") from None


def _resolve_prefix(args: argparse.Namespace) -> None:
    """Fill in ``args.prefix``: --prefix, else the settings' layer, else the layer's default."""
    if args.prefix is not None:
        return
    module = args.settings or os.environ.get("DJANGO_SETTINGS_MODULE")
    if module:
        args.prefix = _prefix_from_settings(module, args.alias or "default")
    elif args.alias is not None:
        raise CannotRun("--alias needs --settings or DJANGO_SETTINGS_MODULE")
    else:
        args.prefix = IPCChannelLayer().prefix


def _parser() -> argparse.ArgumentParser:
    # The module docstring is the help text, so it is written for a terminal, not as markup.
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="asgi-ipc",
        description=summary,
        epilog=details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"asgi-ipc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=description)

    def with_prefix(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        sub = command(name, summary, description)
        which = sub.add_argument_group(
            "which store",
            "--prefix wins; else the prefix of the asgi_ipc layer in the Django settings "
            "(--settings, or DJANGO_SETTINGS_MODULE); else asgi.",
        )
        which.add_argument("--prefix", type=_prefix, metavar="NAME", help="the layer's prefix")
        which.add_argument("--settings", metavar="MODULE",
                           help="a Django settings module, e.g. mysite.settings")
        which.add_argument("--alias", help="the entry of CHANNEL_LAYERS (default: default)")
        return sub

    stats = with_prefix(
        "stats", "memory, channels, groups and processes of a store",
        "Show a store's memory, its channels with messages or waiting receives (the deepest "
        "ten), its groups (the largest ten), the holder of its lock, and the live processes "
        "that receive through it or have it mapped. Receives of processes that have exited "
        "are counted apart, never as waiting.",
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(run=cmd_stats)
    with_prefix(
        "verify", "walk the whole store and report inconsistencies",
        "Walk every channel, message, group and block of a store under its lock and list "
        "what does not add up. Exit status 1 when anything is found.",
    ).set_defaults(run=cmd_verify)
    with_prefix(
        "flush", "empty every channel and group",
        "Drop every message and every group membership of a store, for every process that "
        "uses it. The store itself stays.",
    ).set_defaults(run=cmd_flush)
    unlink_parser = with_prefix(
        "unlink", "remove the store's shared memory for good",
        "Remove a store from /dev/shm, with its wake-up directory. Refused while any "
        "process has it open, in whatever PID namespace, unless --force. To remove every "
        "store that no process has open: asgi-ipc list --remove-abandoned.",
    )
    unlink_parser.add_argument("--force", action="store_true",
                               help="remove it even while processes use it")
    unlink_parser.set_defaults(run=cmd_unlink)
    list_parser = command(
        "list", "the stores of this user on this machine, in use or not",
        "List this user's stores in /dev/shm: the size of each and the memory it takes, the "
        "processes that have it open and the process slots their receives wait in, in any "
        "PID namespace, and when it was last modified; mark FOREIGN every object under an "
        "asgi_ipc name that the layer would refuse.",
    )
    list_parser.add_argument(
        "--remove-abandoned", action="store_true",
        help="remove the stores that no process has open, in any PID namespace, with the "
        "messages and groups they hold (never one in use: each is checked under its lock)")
    list_parser.set_defaults(run=cmd_list)
    demo = command(
        "demo", "processes exchanging messages through a store",
        "Start worker processes that join a group on a fresh store, send them a few "
        "group messages, print their replies, then remove the store.",
    )
    demo.add_argument("--processes", type=bounded(int, 1, DEMO_PROCESSES), default=3,
                      help=f"worker processes, 1 to {DEMO_PROCESSES} (default 3)")
    demo.add_argument("--rounds", type=bounded(int, 1, 10**6), default=3,
                      help="group_send rounds, 1 to 1000000 (default 3)")
    demo.set_defaults(run=cmd_demo)
    command(
        "bench", "asgi_ipc against channels_redis and in-memory",
        "Compare asgi_ipc with channels_redis and InMemoryChannelLayer; see "
        "asgi-ipc bench --help for its options.",
    )
    add_observe_commands(commands, with_prefix)
    return parser


def _run(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        # The benchmark parses its own options, "--json" and "--quick" among them.
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if hasattr(args, "prefix"):
            _resolve_prefix(args)
        return args.run(args)
    except (CannotRun, StoreError) as exc:
        print(f"asgi-ipc: {exc}", file=sys.stderr)
    except PermissionError as exc:
        print(f"asgi-ipc: no permission: {exc}", file=sys.stderr)
    except BrokenPipeError:
        raise
    except OSError as exc:
        print(f"asgi-ipc: {exc}", file=sys.stderr)
    return CANNOT_RUN


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            return _run(argv)
        finally:
            # Inside the try: a reader gone before the last write is seen here, not when the
            # interpreter flushes stdout on its way out.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped reading (``| head``): that is its choice, not our failure. What
        # is still buffered goes to /dev/null, so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except KeyboardInterrupt:
        return INTERRUPTED
