"""Watching a store: the counters every process keeps in it (exact, and never counting what was
rolled back), the figures API, the Prometheus metrics and `asgi-ipc top`."""

from __future__ import annotations

import asyncio
import mmap
import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.request
from dataclasses import replace

import pytest
from channels.exceptions import ChannelFull
from prometheus_client.parser import text_string_to_metric_families

import asgi_ipc
from asgi_ipc import StoreError
from asgi_ipc.observe import Channel, figures, metrics_text

from . import workers
from .helpers import (
    ROOT,
    SPAWN,
    cli,
    left_behind,
    new_prefix,
    pythonpath,
    shm_path,
    start,
    wait_until,
)

NOTHING = dict.fromkeys(workers.expected_counters(0), 0)


def run_workers(prefix, children, processes=2):
    done = SPAWN.Queue()
    started = [start(children, workers.work, prefix, f"p{n}", done)
               for n in range(processes)]
    refused = [done.get(timeout=120) for _ in started]
    for worker in started:
        worker.join(60)
        assert worker.exitcode == 0
    return refused


def test_counters_add_up_the_work_of_every_process_exactly(prefix, children):
    refused = run_workers(prefix, children)
    assert refused == [2, 2]  # the ChannelFull each process saw
    f = figures(prefix, check=True)
    assert f.counters == workers.expected_counters(2)
    assert f.problems == []
    light = figures(prefix)  # the counts the records keep agree with the full walk
    assert (light.counters, light.channels, light.messages, light.memberships) == (
        f.counters, f.channels, f.messages, f.memberships
    )
    assert [(c.name, c.depth) for c in light.deepest] == [(c.name, c.depth) for c in f.deepest]
    # full.p0 and full.p1 hold 3 each; bulk what was sent and not received.
    assert (f.channels, f.messages) == (3, 2 * 3 + workers.BULK)
    c = f.counters
    assert c["sent"] + c["delivered"] + c["returned"] - c["received"] - c["expired"] == f.messages
    assert f.deepest[0].name == "bulk"
    assert sorted((c.name, c.depth) for c in f.deepest[:3]) == [
        ("bulk", workers.BULK), ("full.p0", 3), ("full.p1", 3)
    ]


async def test_sends_refused_for_memory_are_counted(prefix):
    layer = workers.observed_layer(prefix, channel_memory=64 * 1024)
    big = {"blob": b"x" * 40_000}
    await layer.send("first", big)
    with pytest.raises(ChannelFull, match="no room"):
        await layer.send("second", big)
    await layer.group_add("g", "m.one")
    await layer.group_add("g", "m.two")
    await layer.group_send("g", big)  # neither member gets a copy
    await layer.close()
    counters = figures(prefix).counters
    assert counters == {**NOTHING, "sent": 1, "no_memory": 3, "group_sends": 1}


class _Boom:
    """A channel_capacity pattern that raises when asked about one channel: inside the lock
    hold of a group_send, after the operation has counted itself."""

    def match(self, channel: str):
        if channel == "b.two":
            raise RuntimeError("capacity lookup failed")
        return None


async def test_an_operation_that_raises_is_not_counted(prefix):
    layer = workers.observed_layer(prefix, channel_capacity={_Boom(): 5})
    await layer.send("a.one", {"before": True})
    await layer.group_add("g", "a.one")
    await layer.group_add("g", "b.two")
    with pytest.raises(RuntimeError, match="capacity lookup failed"):
        await layer.group_send("g", {"rolled": "back"})
    await layer.close()
    f = figures(prefix, check=True)
    assert f.counters == {**NOTHING, "sent": 1}
    assert (f.messages, f.problems) == (1, [])


async def test_an_operation_cut_off_by_a_kill_is_not_counted(prefix, children):
    layer = workers.observed_layer(prefix)
    await layer.send("before", {"n": 1})
    await layer.close()
    # More members than one run of copies: the first 512 are linked, and counted, before the
    # process dies, all uncommitted.
    victim = start(children, workers.killed_in_group_send, prefix, 600)
    victim.join(120)
    assert victim.exitcode == -signal.SIGKILL
    f = figures(prefix, check=True)  # its lock hold rolls back what the dead process left
    assert f.counters == {**NOTHING, "sent": 1}
    assert (f.messages, f.memberships, f.problems) == (1, 600, [])


async def test_figures_describe_the_store(prefix, children):
    layer = workers.observed_layer(prefix, expiry=60)
    for i in range(3):
        await layer.send("deep", {"i": i})
    await layer.send("shallow", {"i": 0})
    await layer.group_add("room", "deep")
    await layer.group_add("room", "shallow")
    ready = SPAWN.Queue()
    waiter = start(children, workers.wait_in_receive, prefix, "idle.wait", ready)
    pid = ready.get(timeout=60)

    f = figures(prefix, top=5)
    assert f.prefix == prefix
    assert (f.channels, f.messages, f.groups, f.memberships) == (3, 4, 1, 2)
    assert [(c.name, c.depth, c.waiting) for c in f.deepest] == [
        ("deep", 3, 0), ("shallow", 1, 0), ("idle.wait", 0, 1)
    ]
    assert f.deepest[2] == Channel("idle.wait", 0, 1, None)
    assert {c.name for c in f.expiring} == {"deep", "shallow"}
    for channel in f.expiring:
        assert 0 < channel.expires_in <= 60
    assert 0 < f.oldest_expires_in <= 60
    assert f.waiting_processes == [pid]
    assert f.largest_groups == [("room", 2)]
    assert 0 < f.channel_memory.used < f.channel_memory.size
    assert f.channel_memory.used + f.channel_memory.free == f.channel_memory.size
    assert 0 < f.group_memory.used < f.group_memory.size
    assert (f.flushes, f.expired_bytes, f.problems) == (0, None, None)  # not checked
    checked = figures(prefix, top=5, check=True)
    assert (checked.expired_bytes, checked.problems) == (0, [])
    assert [replace(c, expires_in=None) for c in checked.deepest] == [
        replace(c, expires_in=None) for c in f.deepest
    ]

    waiter.kill()
    waiter.join(30)
    assert figures(prefix).waiting_processes == []  # only the live ones

    await layer.flush()
    f = figures(prefix, top=0)
    assert (f.flushes, f.messages, f.deepest, f.expiring) == (1, 0, [], [])
    assert f.counters["sent"] == 4  # counters outlive a flush
    await layer.close()


def test_figures_never_create_a_store():
    missing = new_prefix()
    with pytest.raises(StoreError, match="no asgi_ipc store"):
        figures(missing)
    assert not left_behind(missing)


async def test_figures_refuse_a_bad_top(prefix):
    with pytest.raises(ValueError, match="top must be"):
        figures(prefix, top=-1)


def metric_values(text: str) -> dict[tuple, float]:
    """(sample name, frozenset of labels but prefix) -> value, after checking each family's
    type and that every sample carries the prefix label."""
    values = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("asgi_ipc_")
        assert family.type == ("counter" if family.name + "_total" in text else "gauge")
        for sample in family.samples:
            labels = dict(sample.labels)
            labels.pop("prefix")
            values[sample.name, frozenset(labels.items())] = sample.value
    return values


def test_metrics_parse_with_the_figures_of_several_processes(prefix, children):
    run_workers(prefix, children)
    result = cli("metrics", "--prefix", prefix, "--check")
    assert result.returncode == 0, result.stderr
    values = metric_values(result.stdout)
    assert values["asgi_ipc_problems", frozenset()] == 0
    for name, count in workers.expected_counters(2).items():
        assert values[f"asgi_ipc_{name}_total", frozenset()] == count, name
    assert values["asgi_ipc_up", frozenset()] == 1
    assert values["asgi_ipc_messages", frozenset()] == 2 * 3 + workers.BULK
    depth = {dict(labels)["channel"]: value for (name, labels), value in values.items()
             if name == "asgi_ipc_channel_depth"}
    assert depth == {"bulk": workers.BULK, "full.p0": 3, "full.p1": 3}
    memory = {tuple(sorted(labels)): value for (name, labels), value in values.items()
              if name == "asgi_ipc_memory_bytes"}
    used = memory[("area", "channel"), ("state", "used")]
    assert 0 < used < memory[("area", "channel"), ("state", "size")]


def test_metrics_of_a_missing_store_or_a_bad_port_fail_in_one_line():
    result = cli("metrics", "--prefix", new_prefix())
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no asgi_ipc store" in result.stderr
    result = cli("metrics", "--serve", "70000")
    assert result.returncode == 2 and "from 0 to 65535" in result.stderr


async def test_metrics_served_over_http_follow_the_store(prefix):
    layer = workers.observed_layer(prefix)
    await layer.send("c.one", {"n": 1})
    await layer.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "asgi_ipc", "metrics", "--prefix", prefix, "--serve", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), 60)
        url = re.search(r"http://127\.0\.0\.1:\d+/metrics", line).group(0)

        def scrape() -> dict:
            with urllib.request.urlopen(url, timeout=30) as response:
                return metric_values(response.read().decode())

        values = await asyncio.to_thread(scrape)
        assert values["asgi_ipc_sent_total", frozenset()] == 1
        assert values["asgi_ipc_up", frozenset()] == 1
        assert ("asgi_ipc_problems", frozenset()) not in values  # only with --check
        asgi_ipc.unlink(prefix)
        values = await asyncio.to_thread(scrape)
        assert values["asgi_ipc_up", frozenset()] == 0
        assert ("asgi_ipc_sent_total", frozenset()) not in values
    finally:
        server.terminate()
        server.wait(30)


VIEW = textwrap.dedent("""
    import sys
    import django
    from django.conf import settings
    settings.configure(CHANNEL_LAYERS={"default": {
        "BACKEND": "asgi_ipc.IPCChannelLayer", "CONFIG": {"prefix": sys.argv[1]}}})
    django.setup()
    from django.test import RequestFactory
    from asgi_ipc.observe import metrics_view
    response = metrics_view(RequestFactory().get("/metrics"))
    print(response["Content-Type"])
    print(response.content.decode(), end="")
""")


async def test_metrics_view_serves_the_store_of_the_layer(prefix):
    layer = workers.observed_layer(prefix)
    for n in range(4):
        await layer.send("c.view", {"n": n})
    await layer.close()
    result = subprocess.run([sys.executable, "-c", VIEW, prefix], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    content_type, _, body = result.stdout.partition("\n")
    assert content_type.startswith("text/plain")
    values = metric_values(body)
    assert values["asgi_ipc_sent_total", frozenset()] == 4
    assert values["asgi_ipc_channel_depth", frozenset({("channel", "c.view")})] == 4


# Longer than a line of 80 columns, as the names of new_channel() and a prefix of its own make them.
LONG = "specific.a-consumer-with-a-long-class-name!" + "0123456789abcdef" * 3


def channel_name(n: int) -> str:
    return f"{LONG}{n:02d}"


async def fill(prefix):
    """c.deep at capacity (one send refused), c.shallow emptied, and twelve channels of long
    names holding 1 to 12 messages."""
    layer = workers.observed_layer(prefix, capacity=20)
    for n in range(21):
        try:
            await layer.send("c.deep", {"n": n})
        except ChannelFull:
            pass
    await layer.send("c.shallow", {"n": 0})
    await layer.receive("c.shallow")
    for n in range(1, 13):
        for _ in range(n):
            await layer.send(channel_name(n), {"n": n})
    await layer.close()


def plain_rows(text: str) -> dict[str, list[str]]:
    """The rows of plain tables, by their first cell (cells two spaces or more apart)."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1:
            rows.setdefault(cells[0], cells[1:])
    return rows


async def test_top_once_prints_plain_tables_with_every_name_whole(prefix):
    await fill(prefix)
    result = await asyncio.to_thread(cli, "top", "--prefix", prefix, "--once", "--check")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert not re.search("[\u2500-\u257f]", text), text  # no box drawing
    assert text.startswith(f"asgi_ipc prefix {prefix!r} at ")
    rows = plain_rows(text)
    assert rows["problems"] == ["none"]
    assert rows["sent"] == ["99", "-"]  # 20 to c.deep, 1 to c.shallow, 1 + 2 + ... + 12
    assert rows["received"] == ["1", "-"]
    assert rows["channel_full"] == ["1", "-"]
    assert rows["messages"] == ["98"]
    assert rows["channel memory"][0].endswith("MiB, largest free 2.0 MiB")
    assert "MB" not in text
    deepest = text.split("deepest channels (10 of 13)\n")[1].split("\n\n")[0].splitlines()
    assert deepest[0].split() == ["depth", "waiting", "first", "expires", "in", "channel"]
    assert deepest[1].split()[:2] == ["20", "0"] and deepest[1].endswith("  c.deep")
    assert deepest[2].split()[:2] == ["12", "0"]
    assert deepest[2].endswith("  " + channel_name(12)) and len(deepest[2]) > 80


async def test_top_piped_prints_each_view_plain(prefix):
    await fill(prefix)
    result = await asyncio.to_thread(cli, "top", "--prefix", prefix, "--iterations", "2",
                                     "--interval", "0.5", "--top", "20")
    assert result.returncode == 0, result.stderr
    views = result.stdout.split(f"\n\nasgi_ipc prefix {prefix!r} at ")
    assert len(views) == 2 and "\u2502" not in result.stdout
    # The second view has rates: nothing was sent between the two.
    assert plain_rows(views[1])["sent"] == ["99", "0.0"]
    assert "deepest channels (all 13)" in views[1]
    for n in range(1, 13):
        assert re.search(rf"^ +{n} +0 +[\d.]+ s  {channel_name(n)}$", views[1], re.M), n


class Terminal:
    """A tmux server of its own (its socket in ``directory``) with one window of 80 x 24."""

    def __init__(self, directory) -> None:
        self.socket = str(directory / "tmux")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def start(self, command: list[str]) -> None:
        # The shell stays after the command so that its last screen can be read, and says
        # when the command has ended, with its exit status.
        self.tmux("new-session", "-d", "-x", "80", "-y", "24",
                  "-e", f"PYTHONPATH={pythonpath(ROOT)}",
                  f"{shlex.join(command)}; echo ended $?; sleep 600")

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p").splitlines()

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=60)


@pytest.fixture
def terminal(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    term = Terminal(tmp_path)
    yield term
    term.close()


async def test_top_live_fits_80_by_24_and_shows_the_deepest_channels(prefix, terminal):
    await fill(prefix)
    terminal.start([sys.executable, "-m", "asgi_ipc", "top", "--prefix", prefix,
                    "--iterations", "2", "--interval", "0.5"])
    screen = await asyncio.to_thread(
        wait_until, lambda: (s := terminal.screen()) and any(
            line.startswith("ended") for line in s) and s, "top to end")
    assert "ended 0" in screen
    view = screen[:screen.index("ended 0")]
    assert len(view) < 24 and all(len(line) <= 80 for line in view)
    assert view[0].startswith(f"asgi_ipc top · prefix {prefix!r}")
    # The second view, with rates: nothing was sent between the two.
    assert re.search(r"\bsent +99 +0\.0\b", "\n".join(view)), view
    at, shown = next(
        (n, int(found[1])) for n, line in enumerate(view)
        if (found := re.search(r"deepest channels \((\d+) of 13\)", line))
    )
    assert shown >= 5
    deepest = view[at + 1:at + 1 + shown]
    assert [line.split()[0] for line in deepest] == ["20", *map(str, range(12, 13 - shown, -1))]
    assert deepest[0].endswith(" c.deep")
    # A name too long for the line keeps its beginning and its end.
    assert re.search(r" specific\.a-consumer.*….*cdef12$", deepest[1]), deepest[1]


@pytest.mark.parametrize("command, module, needs", [
    ("top", "rich", "the live view of asgi-ipc top needs rich: pip install 'rich>=13'"),
    ("metrics", "prometheus_client",
     "the metrics need prometheus_client: pip install 'prometheus_client>=0.20'"),
])
def test_a_missing_extra_is_one_line(prefix, command, module, needs):
    script = (f"import sys; sys.modules[{module!r}] = None; from asgi_ipc.cli import main; "
              f"sys.exit(main([{command!r}, '--prefix', {prefix!r}]))")
    # top needs rich for its live view only, in a terminal.
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-c", script], stdout=terminal,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 2
    assert result.stderr.startswith(f"asgi-ipc: {needs}") and result.stderr.count("\n") == 1


async def test_top_once_needs_no_rich(prefix):
    await fill(prefix)
    script = (f"import sys; sys.modules['rich'] = None; from asgi_ipc.cli import main; "
              f"sys.exit(main(['top', '--prefix', {prefix!r}, '--once']))")
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script],
                                     capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert plain_rows(result.stdout)["messages"] == ["98"]


def test_top_refuses_a_bad_interval_and_a_missing_store(prefix):
    result = cli("top", "--prefix", prefix, "--interval", "0")
    assert result.returncode == 2
    assert "argument --interval: expected a number of seconds from 0.5 to 3600" in result.stderr
    result = cli("top", "--prefix", prefix, "--once")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no asgi_ipc store" in result.stderr
    assert not left_behind(prefix)


def test_metrics_text_of_a_missing_store_says_it_is_down():
    missing = new_prefix()
    values = metric_values(metrics_text([missing]))
    assert values == {("asgi_ipc_up", frozenset()): 0}
    with pytest.raises(StoreError, match="no asgi_ipc store"):
        metrics_text([missing], strict=True)
    assert not left_behind(missing)


async def test_a_message_put_back_by_a_cancelled_receive_is_counted(prefix):
    layer = workers.observed_layer(prefix)
    await layer.send("c.a", {"n": "a"})
    await layer.send("c.b", {"n": "b"})
    first = asyncio.ensure_future(layer.receive("c.a"))
    second = asyncio.ensure_future(layer.receive("c.b"))
    await asyncio.sleep(0)
    # Both receives ran in that pass of the loop: the first was served at once, the second
    # waits to be served with the receives gathered in this pass, in a callback queued
    # before this one: so the cancel lands after its message was handed over, before the
    # receive resumed, and the message goes back.
    asyncio.get_running_loop().call_soon(second.cancel)
    assert await first == {"n": "a"}
    with pytest.raises(asyncio.CancelledError):
        await second
    counters = figures(prefix).counters
    assert counters == {**NOTHING, "sent": 2, "received": 2, "returned": 1}
    assert await layer.receive("c.b") == {"n": "b"}
    assert figures(prefix).counters["received"] == 3
    await layer.close()


async def test_a_checked_view_reports_a_damaged_store(prefix):
    layer = workers.observed_layer(prefix)
    await layer.send("c.damaged", {"text": "findme-payload"})
    await layer.close()
    with open(shm_path(prefix), "r+b") as file, mmap.mmap(file.fileno(), 0) as memory:
        at = memory.find(b"findme-payload")
        memory[at : at + 1] = b"F"  # the CRC no longer matches
    assert figures(prefix).problems is None  # not checked: nothing walked the message
    problems = figures(prefix, check=True).problems
    assert len(problems) == 1 and "CRC" in problems[0]
    result = cli("metrics", "--prefix", prefix, "--check")
    assert metric_values(result.stdout)["asgi_ipc_problems", frozenset()] == 1
