"""Another local user cannot ring our receivers: it finds our doorbells (every Unix socket is
listed in /proc/net/unix) but every attempt to send to one or connect to one is refused, and the
waiting receiver reads not one datagram from it. Nor can it prepare the wake-up directory for us:
one that is not private to us is refused.

The other user is a real one (``useradd -M``), running a stdlib-only script with the system
Python, since it cannot read our tree.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import secrets
import subprocess

import pytest

from asgi_ipc import ForeignObject, IPCChannelLayer
from asgi_ipc.engine.layout import wake_dir

from .helpers import Worker, doorbells, slot_table, wait_until

pytestmark = pytest.mark.timeout(120)

CONFIG = {"channel_memory": 1024 * 1024, "group_memory": 256 * 1024}
ATTACK_SECONDS = 3

# Run as the other user: for ATTACK_SECONDS, send an empty datagram to (and connect a datagram
# socket to) every Unix socket listed in /proc/net/unix whose name holds the prefix, abstract or
# at a path, plus any it can list in the wake-up directory; report what got through.
ATTACK = r"""
import json, os, socket, sys, time

prefix, seconds = sys.argv[1], float(sys.argv[2])
mark = "asgi_ipc." + prefix
wake = "/dev/shm/asgi_ipc." + prefix + "+wake"
report = {"tried": 0, "delivered": 0, "refused": {}, "names": []}

def targets():
    found = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and mark in fields[7]:
                name = fields[7]
                found.add("\0" + name[1:] if name.startswith("@") else name)
    try:
        found.update(os.path.join(wake, name) for name in os.listdir(wake))
    except OSError as exc:
        report["refused"][type(exc).__name__] = report["refused"].get(type(exc).__name__, 0) + 1
    return found

deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for address in targets():
        if address not in report["names"]:
            report["names"].append(address)
        for how in ("sendto", "connect"):
            report["tried"] += 1
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                try:
                    if how == "sendto":
                        sock.sendto(b"", address)
                    else:
                        sock.connect(address)
                        sock.send(b"")
                    report["delivered"] += 1
                except OSError as exc:
                    name = type(exc).__name__
                    report["refused"][name] = report["refused"].get(name, 0) + 1
    time.sleep(0.01)
print(json.dumps(report))
"""


@pytest.fixture
def other_user():
    name = "aipc" + secrets.token_hex(4)
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
    yield name
    subprocess.run(["userdel", name], check=True)


def test_another_user_cannot_ring_a_waiting_receiver(prefix, workers, other_user):  # noqa: F811
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    receiver = Worker([], "idle", prefix)
    workers.append(receiver)
    ((_slot, token),) = wait_until(lambda: slot_table(layer), "the receiver to wait")
    assert doorbells(prefix) == [f"{token:016x}"]

    attack = subprocess.run(
        ["runuser", "-u", other_user, "--", "/usr/bin/python3", "-c", ATTACK, prefix,
         str(ATTACK_SECONDS)],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert attack.returncode == 0, attack.stderr
    report = json.loads(attack.stdout)
    # It found our doorbell, and every attempt on it was refused.
    assert report["names"], "the other user found no socket of ours to try"
    assert report["tried"] > 0 and report["delivered"] == 0, report
    assert set(report["refused"]) == {"PermissionError"}, report

    # Our own send is the one datagram the receiver's doorbell ever read.
    asyncio.run(layer.send("idle", {"n": 7}))
    assert receiver.expect("datagrams") == ["datagrams", "1", "7"]
    receiver.expect("exit")
    assert receiver.proc.wait(30) == 0
    asyncio.run(layer.close())
    assert doorbells(prefix) == []


@pytest.mark.parametrize("plant", ["open to others", "another user's", "symlink"])
def test_a_planted_wake_up_directory_is_refused(prefix, other_user, plant, tmp_path):
    """Whatever sits where the wake-up directory goes and is not private to us fails the
    receive that would bind there, clearly, and is left as it was; sends still work."""
    path = wake_dir(prefix)
    if plant == "symlink":
        os.symlink(tmp_path, path)
    else:
        os.mkdir(path, 0o777 if plant == "open to others" else 0o700)
        os.chmod(path, 0o777 if plant == "open to others" else 0o700)
        if plant == "another user's":
            os.chown(path, pwd.getpwnam(other_user).pw_uid, -1)
    before = os.lstat(path)

    async def run() -> None:
        layer = IPCChannelLayer(prefix=prefix, **CONFIG)
        with pytest.raises(ForeignObject, match=re.escape(path)):
            await asyncio.wait_for(layer.receive("c"), 10)
        await layer.send("c", {"n": 1})
        assert await layer.receive("c") == {"n": 1}
        await layer.close()

    try:
        asyncio.run(run())
        after = os.lstat(path)
        assert (after.st_mode, after.st_uid, after.st_ino) == (
            before.st_mode, before.st_uid, before.st_ino
        )
        assert os.listdir(tmp_path) == []
    finally:
        if plant == "symlink":
            os.unlink(path)
        else:
            os.rmdir(path)
