"""The asgi-ipc command line, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import asgi_ipc
from asgi_ipc import IPCChannelLayer

from .helpers import (
    ROOT,
    MiB,
    cli,
    new_prefix,
    pythonpath,
    shm_path,
    wait_until,
    write_object,
)
from .workers import forking_waiter

COMMANDS = ("stats", "verify", "flush", "unlink", "list", "demo", "bench")


def fill(prefix):
    async def run():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=2 * MiB, group_memory=MiB)
        for i in range(5):
            await layer.send("deep", {"i": i})
        await layer.send("shallow", {"i": 0})
        await layer.group_add("room", "deep")
        await layer.close()

    asyncio.run(run())


def test_stats_shows_what_is_inside(prefix):
    fill(prefix)
    result = cli("stats", "--prefix", prefix, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["messages"], report["channels"]) == (6, 2)
    assert (report["groups"], report["memberships"]) == (1, 1)
    assert report["deepest"][0] == {"channel": "deep", "depth": 5, "waiting": 0}
    assert report["largest"] == [{"group": "room", "members": 1}]
    assert report["channel_memory"]["used"] > 0 and report["lock_holder"] is None
    text = cli("stats", "--prefix", prefix)
    assert text.returncode == 0
    assert "6 queued" in text.stdout and "deep" in text.stdout


def test_verify_passes_then_reports_damage(prefix):
    fill(prefix)
    good = cli("verify", "--prefix", prefix)
    assert good.returncode == 0 and "consistent" in good.stdout
    # Damage one message's bytes: its CRC no longer matches.
    with open(shm_path(prefix), "r+b") as f:
        data = f.read()
        at = data.index(b"\x81\xa1i\x03")  # msgpack of {"i": 3}
        f.seek(at + 3)
        f.write(b"\x7f")
    bad = cli("verify", "--prefix", prefix)
    assert (bad.returncode, bad.stderr) == (1, "")
    assert "fails its CRC check" in bad.stdout


def test_flush_empties_the_store(prefix):
    fill(prefix)
    assert cli("flush", "--prefix", prefix).returncode == 0
    report = json.loads(cli("stats", "--prefix", prefix, "--json").stdout)
    assert (report["messages"], report["groups"], report["problems"]) == (0, 0, [])


def test_unlink_refuses_while_in_use_unless_forced(prefix):
    fill(prefix)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import asyncio, sys
            from asgi_ipc import IPCChannelLayer
            layer = IPCChannelLayer(prefix={prefix!r}, channel_memory=2 << 20, group_memory=1 << 20)
            asyncio.run(layer.send("x", {{}}))
            print("attached", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "attached"
        refused = cli("unlink", "--prefix", prefix)
        assert refused.returncode == 2 and str(holder.pid) in refused.stderr
        assert os.path.exists(shm_path(prefix))
        forced = cli("unlink", "--prefix", prefix, "--force")
        assert forced.returncode == 0 and not os.path.exists(shm_path(prefix))
    finally:
        holder.kill()
        holder.wait()


def test_a_forked_child_keeps_the_store_in_use_until_it_exits(prefix, children):
    """A process forked by an attached one is attached too, with a descriptor of its own: its
    parent dead, the store is still in use (by one process, not waiting), until it exits."""
    with forking_waiter(children, prefix, "forked.wait") as (waiter, pid, forked):
        refused = cli("unlink", "--prefix", prefix)
        assert "open in 2 processes, with receives waiting in 1 process slot" in refused.stderr
        os.kill(pid, signal.SIGKILL)
        # Not join(timeout): that waits for a pipe the forked child holds open too.
        wait_until(lambda: waiter.exitcode is not None, "the waiter to die")
        refused = cli("unlink", "--prefix", prefix)
        assert refused.returncode == 2 and os.path.exists(shm_path(prefix))
        assert "open in 1 process, with no receive waiting" in refused.stderr
        assert f"pids in this PID namespace: {forked}" in refused.stderr
        with pytest.raises(asgi_ipc.StoreInUse) as in_use:
            asgi_ipc.unlink(prefix, unless_in_use=True)
        assert (in_use.value.attached, in_use.value.waiting) == (1, 0)
        assert os.path.exists(shm_path(prefix))
    removed = cli("unlink", "--prefix", prefix)
    assert removed.returncode == 0 and not os.path.exists(shm_path(prefix))


def test_list_shows_this_users_stores(prefix):
    fill(prefix)
    result = cli("list")
    assert result.returncode == 0 and prefix in result.stdout


def test_missing_foreign_and_invalid_prefixes_exit_2(prefix):
    missing = cli("stats", "--prefix", prefix)
    assert missing.returncode == 2 and "no asgi_ipc store" in missing.stderr
    assert not os.path.exists(shm_path(prefix))
    write_object(prefix, os.urandom(8192))
    foreign = cli("verify", "--prefix", prefix)
    assert foreign.returncode == 2 and "not an asgi_ipc store" in foreign.stderr
    assert f"asgi-ipc unlink --prefix {prefix}" in foreign.stderr
    invalid = cli("stats", "--prefix", "../../etc/passwd")
    assert invalid.returncode == 2 and "invalid asgi_ipc prefix" in invalid.stderr


def test_expected_errors_are_one_line_and_exit_2(prefix):
    """No traceback for what an operator can cause: each is one line naming the problem."""
    for args in (("stats", "--prefix", prefix), ("unlink", "--prefix", prefix),
                 ("flush", "--prefix", prefix), ("stats", "--alias", "default")):
        result = cli(*args, env={k: v for k, v in os.environ.items()
                                 if k != "DJANGO_SETTINGS_MODULE"})
        assert result.returncode == 2, (args, result)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("asgi-ipc: "), (args, result.stderr)
    assert not os.path.exists(shm_path(prefix))


def run_into_closed_pipe(*args) -> subprocess.CompletedProcess:
    """The command with its stdout a pipe whose reader is already gone, as after ``| head -1``
    once head has its line: its first write meets EPIPE, whatever it buffers."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "asgi_ipc", *args], stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)


def test_a_reader_that_stops_reading_ends_the_command_quietly(prefix):
    fill(prefix)
    for args in (("stats", "--prefix", prefix), ("stats", "--prefix", prefix, "--json"),
                 ("verify", "--prefix", prefix), ("list",), ("--help",), ("--version",)):
        result = run_into_closed_pipe(*args)
        assert (result.returncode, result.stderr) == (0, ""), args


def test_version_is_the_packages():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"asgi-ipc {asgi_ipc.__version__}\n"
    # One source: the package metadata is built from asgi_ipc.__version__.
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    assert 'version = { attr = "asgi_ipc.__version__" }' in pyproject


def test_help_is_plain_text_with_exit_statuses():
    result = cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert "``" not in result.stdout and ":class:" not in result.stdout
    statuses = result.stdout.split("exit status:")[1]
    for status in ("0", "1", "2", "130"):
        assert re.search(rf"^  {status} ", statuses, re.M), status
    for command in COMMANDS:
        assert re.search(rf"^    {command} +\w", result.stdout, re.M), command


def test_every_command_describes_itself():
    for command in COMMANDS:
        result = cli(command, "--help")
        assert result.returncode == 0 and "``" not in result.stdout
        # argparse prints the description between the usage lines and the first option section.
        head = result.stdout.split("\n\n")
        assert head[0].startswith(f"usage: asgi-ipc {command}")
        assert not head[1].startswith(("options:", "positional arguments:")), result.stdout
        assert len(head[1].split()) >= 5, result.stdout


def fill_idle(prefix):
    """Channels that had messages and were emptied: records kept until the sweep. Every send
    comes first: a send sweeps a few buckets of the index, which could free a record emptied
    before it, depending on where the store's random hash key puts it; a receive never
    sweeps."""
    async def run():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=2 * MiB, group_memory=MiB)
        for i in range(5):
            await layer.send(f"emptied{i}", {"i": i})
        for i in range(5):
            await layer.receive(f"emptied{i}")
        await layer.close()

    asyncio.run(run())


def test_stats_counts_the_channels_it_lists(prefix):
    fill(prefix)
    fill_idle(prefix)
    report = json.loads(cli("stats", "--prefix", prefix, "--json").stdout)
    assert report["channels"] == 2 and report["idle_records"] == 5
    assert [row["channel"] for row in report["deepest"]] == ["deep", "shallow"]
    text = cli("stats", "--prefix", prefix).stdout
    assert "emptied" not in text
    assert "channels         2 with messages or waiting receives, 5 empty" in text
    assert "deepest channels (all 2)" in text


WAITER = """
import asyncio, sys
from asgi_ipc import IPCChannelLayer

async def main():
    layer = IPCChannelLayer(prefix=sys.argv[1], channel_memory=2 << 20, group_memory=1 << 20)
    await layer.receive("waiting.here")

asyncio.run(main())
"""


def test_a_killed_receiver_is_not_shown_waiting(prefix):
    fill(prefix)
    waiter = subprocess.Popen([sys.executable, "-c", WAITER, prefix])
    try:
        def stats():
            result = cli("stats", "--prefix", prefix, "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        deadline = time.monotonic() + 60
        while not any(row["waiting"] for row in stats()["deepest"]):
            assert time.monotonic() < deadline, "the receive never registered"
            assert waiter.poll() is None
            time.sleep(0.05)
        alive = stats()
        assert waiter.pid in alive["waiting_processes"] and alive["channels"] == 3
        assert {"channel": "waiting.here", "depth": 0, "waiting": 1} in alive["deepest"]
        waiter.send_signal(signal.SIGKILL)
        waiter.wait(60)
        dead = stats()
        assert waiter.pid not in dead["waiting_processes"]
        assert [row["waiting"] for row in dead["deepest"]] == [0, 0]
        assert (dead["channels"], dead["dead_waiters"]) == (2, 1)
        text = cli("stats", "--prefix", prefix).stdout
        assert "waiting.here" not in text and str(waiter.pid) not in text
        assert "1 receives of processes that have exited" in text
    finally:
        waiter.kill()
        waiter.wait(60)


def write_settings(directory, module, layers) -> None:
    with open(os.path.join(directory, f"{module}.py"), "w") as f:
        f.write(f"SECRET_KEY = 'cli'\nCHANNEL_LAYERS = {layers!r}\n")


def test_the_prefix_comes_from_django_settings(prefix, tmp_path):
    other = new_prefix()
    module = "clisettings_" + prefix
    write_settings(tmp_path, module, {
        "default": {"BACKEND": "asgi_ipc.IPCChannelLayer", "CONFIG": {"prefix": prefix}},
        "second": {"BACKEND": "asgi_ipc.layer.IPCChannelLayer", "CONFIG": {"prefix": other}},
        "memory": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
    })
    fill(prefix)
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}

    def run(*args, **extra):
        return cli(*args, cwd=tmp_path, env={**env, **extra})

    by_option = run("stats", "--json", "--settings", module)
    assert by_option.returncode == 0, by_option.stderr
    assert json.loads(by_option.stdout)["prefix"] == prefix
    by_env = run("stats", "--json", DJANGO_SETTINGS_MODULE=module)
    assert json.loads(by_env.stdout)["prefix"] == prefix
    # The alias picks the layer; its store does not exist.
    second = run("verify", "--settings", module, "--alias", "second")
    assert second.returncode == 2 and f"prefix {other!r}" in second.stderr
    for alias, why in (("memory", "is not an asgi_ipc layer"), ("nope", "there is no")):
        refused = run("stats", "--settings", module, "--alias", alias)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert why in refused.stderr and f"CHANNEL_LAYERS[{alias!r}]" in refused.stderr
    missing = run("stats", "--settings", "no_such_settings_module")
    assert missing.returncode == 2 and "no_such_settings_module" in missing.stderr
    assert missing.stderr.count("\n") == 1
    # An explicit --prefix wins: the settings are not even read.
    explicit = run("stats", "--json", "--prefix", prefix, "--settings", "no_such_settings_module")
    assert explicit.returncode == 0 and json.loads(explicit.stdout)["prefix"] == prefix
    assert not os.path.exists(shm_path(other))


def test_an_interrupt_ends_the_command_quietly():
    # Ctrl-C signals the terminal's whole foreground process group: the demo and its workers.
    demo = subprocess.Popen(
        [sys.executable, "-m", "asgi_ipc", "demo", "--processes", "2", "--rounds", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        for _ in range(2):
            assert demo.stdout.readline().startswith("worker joined")
        assert demo.stdout.readline().startswith(f"pid {demo.pid} group_send")
        os.killpg(demo.pid, signal.SIGINT)
        _out, err = demo.communicate(timeout=60)
        assert (demo.returncode, err) == (130, "")
    finally:
        try:
            os.killpg(demo.pid, signal.SIGKILL)  # the workers too, should the demo hang
        except ProcessLookupError:
            pass
        demo.wait(60)


@pytest.mark.parametrize("args, refusal", [
    (("demo", "--processes", "-5"), "argument --processes: expected a whole number from 1 to 32"),
    (("demo", "--processes", "100000000000000000000"), "argument --processes: expected"),
    (("demo", "--processes", "three"), "argument --processes: expected"),
    (("demo", "--rounds", "-1"), "argument --rounds: expected a whole number from 1 to 1000000"),
    (("demo", "--rounds", "0"), "argument --rounds: expected"),
    (("top", "--interval", "inf"), "argument --interval: expected a number of seconds from 0.5"),
    (("top", "--interval", "1e-300"), "argument --interval: expected"),
    (("top", "--interval", "nan"), "argument --interval: expected"),
    (("top", "--iterations", "0"), "argument --iterations: expected a whole number from 1"),
    (("top", "--top", "0"), "argument --top: expected a whole number from 1 to 1000"),
    (("top", "--top", "100000"), "argument --top: expected"),
    (("top", "--once", "--iterations", "3"), "argument --iterations: not allowed with"),
    (("metrics", "--top", "-1"), "argument --top: expected a whole number from 1 to 1000"),
    (("metrics", "--serve", "70000"), "argument --serve: expected a TCP port from 0 to 65535"),
    (("metrics", "--serve", "²"), "argument --serve: expected a TCP port"),
    (("metrics", "--bind", "nowhere.invalid"), "argument --bind: not an address to listen on"),
    (("bench", "--only", "nosuch"), "argument --only: unknown workload"),
])
def test_every_argument_out_of_range_is_refused_as_argparse_does(prefix, args, refusal):
    """Nothing runs: one usage and one error line, exit status 2."""
    where = () if args[0] in ("demo", "bench") else ("--prefix", prefix)
    result = cli(*args, *where)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.startswith(f"usage: asgi-ipc {args[0]}")
    assert result.stderr.splitlines()[-1].startswith(f"asgi-ipc {args[0]}: error: {refusal}")
    assert not os.path.exists(shm_path(prefix))


def test_stats_names_the_store_by_its_path_and_sizes_in_mib(prefix):
    fill(prefix)
    text = cli("stats", "--prefix", prefix).stdout
    assert text.startswith(f"store /dev/shm/asgi_ipc.{prefix} (prefix {prefix!r})")
    assert "2.0 MiB free" in text and "1.0 MiB" in text and "MB" not in text


def test_list_tells_the_size_from_the_memory_and_who_uses_each_store(prefix):
    fill(prefix)
    result = cli("list")
    assert result.returncode == 0
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["prefix", "size", "in", "memory", "processes", "waiting",
                              "modified", "state"]
    (row,) = [line for line in lines if line.startswith(prefix + " ")]
    # 2 MiB + 1 MiB, their indexes and 1.04 MiB of journal, process table and header.
    assert re.fullmatch(rf"{prefix} +4\.1 MiB +[\d.]+ (KiB|MiB) +0 +0 +[\d-]+ [\d:]+ +not in use",
                        row), row
    assert "--remove-abandoned" in lines[-1]


# Run in a mount namespace of its own, on a tmpfs of its own: --remove-abandoned removes every
# store of the user that no process has open, and the real /dev/shm holds those of tests that run
# beside this one. Store a is left behind; a process waits on store b from another PID namespace;
# a process of this namespace has store c open.
ABANDONED = """
import asyncio, json, os, sys
from asgi_ipc import IPCChannelLayer
from asgi_ipc.observe import figures
from tests.helpers import Worker, cli, wait_until
from tests.ns_worker import CONFIG

prefix = sys.argv[1]
a, b, c = prefix + "a", prefix + "b", prefix + "c"

async def create(name):
    layer = IPCChannelLayer(prefix=name, **CONFIG)
    await layer.send("left", {})
    await layer.close()

for name in (a, b, c):
    asyncio.run(create(name))
waiter = Worker(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"], "wait", b)
sender = Worker([], "attach", c)
try:
    sender.expect("attached")
    wait_until(lambda: figures(b).waiting_processes, "the waiter to wait")
    listed = cli("list")
    removed = cli("list", "--remove-abandoned")
    again = cli("list", "--remove-abandoned")
finally:
    sender.stop()
    waiter.proc.kill()
    waiter.proc.wait()
print(json.dumps({
    "listed": listed.stdout, "removed": removed.stdout, "again": again.stdout,
    "status": [listed.returncode, removed.returncode, again.returncode],
    "errors": listed.stderr + removed.stderr + again.stderr,
    "left": sorted(os.listdir("/dev/shm")),
}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to mount a tmpfs of its own")
def test_list_tells_stores_in_use_from_abandoned_ones_and_removes_only_those(prefix):
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" "$@"',
         sys.executable, "-c", ABANDONED, prefix],
        capture_output=True, text=True, timeout=240,
        env=dict(os.environ, PYTHONPATH=pythonpath(ROOT)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["status"] == [0, 0, 0] and report["errors"] == ""

    def rows(text):
        return {line.split()[0]: (line.split()[5:7], line.split(None, 9)[-1])
                for line in text.splitlines() if line.startswith(prefix)}

    # (processes, waiting), state; the waiter's process is in another PID namespace.
    assert rows(report["listed"]) == {
        prefix + "a": (["0", "0"], "not in use"),
        prefix + "b": (["1", "1"], "in use"),
        prefix + "c": (["1", "0"], "in use"),
    }
    assert report["listed"].splitlines()[-1] == (
        "1 not in use (open in no process, in any PID namespace): remove with asgi-ipc list "
        "--remove-abandoned")
    assert rows(report["removed"]) == {
        prefix + "a": (["0", "0"], "removed"),
        prefix + "b": (["1", "1"], "in use"),
        prefix + "c": (["1", "0"], "in use"),
    }
    assert report["removed"].splitlines()[-1] == "removed 1 store that no process had open"
    assert report["again"].splitlines()[-1] == (
        "no store to remove: every one is open in some process")
    stores = [entry for entry in report["left"] if "+" not in entry]
    assert stores == [f"asgi_ipc.{prefix}b", f"asgi_ipc.{prefix}c"]
    assert not [entry for entry in report["left"] if entry.startswith(f"asgi_ipc.{prefix}a")]
