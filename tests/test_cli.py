"""The asgi-ipc command line, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

from asgi_ipc import IPCChannelLayer

from .conftest import MiB, shm_path


def cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "asgi_ipc", *args], capture_output=True, text=True, timeout=timeout
    )


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
    assert report["deepest"][0][:2] == [5, "deep"]
    assert report["channel_memory"]["used"] > 0 and report["lock_holder"] is None
    text = cli("stats", "--prefix", prefix)
    assert text.returncode == 0
    assert "messages in flight 6" in text.stdout and "deep" in text.stdout


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
    assert bad.returncode == 1
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


def test_list_shows_this_users_stores(prefix):
    fill(prefix)
    result = cli("list")
    assert result.returncode == 0 and prefix in result.stdout


def test_missing_foreign_and_invalid_prefixes_exit_2(prefix):
    missing = cli("stats", "--prefix", prefix)
    assert missing.returncode == 2 and "no asgi_ipc store" in missing.stderr
    assert not os.path.exists(shm_path(prefix))
    fd = os.open(shm_path(prefix), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(8192))
    os.close(fd)
    foreign = cli("verify", "--prefix", prefix)
    assert foreign.returncode == 2 and "not an asgi_ipc store" in foreign.stderr
    assert f"asgi-ipc unlink --prefix {prefix}" in foreign.stderr
    invalid = cli("stats", "--prefix", "../../etc/passwd")
    assert invalid.returncode == 2 and "invalid asgi_ipc prefix" in invalid.stderr


def test_demo_runs_processes_and_cleans_up():
    def demo_stores():
        return {name for name in os.listdir("/dev/shm") if name.startswith("asgi_ipc.demo")}

    before = demo_stores()
    result = cli("demo", "--processes", "2", "--rounds", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("HELLO NUMBER 1") == 2
    assert "3 processes talked through shared memory" in result.stdout
    assert demo_stores() <= before
