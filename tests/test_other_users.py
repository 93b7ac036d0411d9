"""Another local user cannot ring our receivers: it finds our doorbells (every Unix socket is
listed in /proc/net/unix) but every attempt to send to one or connect to one is refused, and the
waiting receiver reads not one datagram from it. Nor can it take the wake-up directory from us,
before the store exists or once every waiting process has left: its name comes from the store's
secret key, and it lives as long as the store. One that is not private to us is refused.

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

from .helpers import Worker, doorbells, slot_table, wait_until

pytestmark = pytest.mark.timeout(120)

CONFIG = {"channel_memory": 1024 * 1024, "group_memory": 256 * 1024}
ATTACK_SECONDS = 3

# Run as the other user: for ATTACK_SECONDS, send an empty datagram to (and connect a datagram
# socket to) every Unix socket listed in /proc/net/unix whose name holds the prefix, abstract or
# at a path, plus any it can list in the wake-up directories (whose names it can see in /dev/shm);
# report what got through.
ATTACK = r"""
import json, os, socket, sys, time

prefix, seconds = sys.argv[1], float(sys.argv[2])
mark = "asgi_ipc." + prefix
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
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(mark + "+wake"):
            wake = "/dev/shm/" + entry
            try:
                found.update(os.path.join(wake, name) for name in os.listdir(wake))
            except OSError as exc:
                name = type(exc).__name__
                report["refused"][name] = report["refused"].get(name, 0) + 1
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


# Run as the other user: try to remove, open up or rename whatever of the prefix's it finds in
# /dev/shm, and plant a wake-up directory open to all at the name the layer used before 2.2.
PLANT = r"""
import json, os, sys

name = "asgi_ipc." + sys.argv[1]
report = {"seen": [], "changed": [], "planted": []}
for entry in os.listdir("/dev/shm"):
    if entry.startswith(name + "+"):
        report["seen"].append(entry)
        path = "/dev/shm/" + entry
        for how, act, args in (("rmdir", os.rmdir, ()), ("chmod", os.chmod, (0o777,)),
                               ("rename", os.rename, (path + ".x",))):
            try:
                act(path, *args)
                report["changed"].append(how)
            except OSError:
                pass
planted = "/dev/shm/" + name + "+wake"
os.mkdir(planted)
os.chmod(planted, 0o777)
report["planted"].append(planted)
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
def test_a_wake_up_directory_not_private_to_us_is_refused(prefix, other_user, plant, tmp_path):
    """Should the store's wake-up directory be removed by hand (its name shows in /dev/shm once
    it exists) and something not private to us take its place, the receive that would bind
    there fails, clearly, and leaves it as it was; sends still work."""
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    path = layer.engine().wake_dir
    if plant == "symlink":
        os.symlink(tmp_path, path)
    else:
        os.mkdir(path, 0o777 if plant == "open to others" else 0o700)
        os.chmod(path, 0o777 if plant == "open to others" else 0o700)
        if plant == "another user's":
            os.chown(path, pwd.getpwnam(other_user).pw_uid, -1)
    before = os.lstat(path)

    async def run() -> None:
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


def plant_as(user: str, prefix: str) -> dict:
    planting = subprocess.run(
        ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", PLANT, prefix],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert planting.returncode == 0, planting.stderr
    return json.loads(planting.stdout)


def wait_and_get_one(workers, layer, prefix: str, n: int) -> None:
    """A process whose receive has to wait (its first), rung by our send."""
    receiver = Worker([], "idle", prefix)
    workers.append(receiver)
    wait_until(lambda: slot_table(layer), "the receiver to wait")
    asyncio.run(layer.send("idle", {"n": n}))
    assert receiver.expect("datagrams") == ["datagrams", "1", str(n)]
    receiver.expect("exit")
    assert receiver.proc.wait(30) == 0


@pytest.mark.parametrize("when", ["before the store", "after the last waiter left"])
def test_another_user_cannot_take_the_wake_up_directory(prefix, workers, other_user, when):
    """Before 2.2 the wake-up directory had a fixed name and was removed when its last waiting
    process closed: another user who created it open to all, before the first wait or after the
    last, made every later receive that had to wait raise ForeignObject."""
    report = None
    try:
        if when == "before the store":
            report = plant_as(other_user, prefix)
        layer = IPCChannelLayer(prefix=prefix, **CONFIG)
        wait_and_get_one(workers, layer, prefix, 1)
        if when == "after the last waiter left":
            report = plant_as(other_user, prefix)
        wait_and_get_one(workers, layer, prefix, 2)
        assert report["changed"] == [], report
        if when == "after the last waiter left":
            # It found our directory, kept for the next waiter, and could do nothing to it.
            assert len(report["seen"]) == 1, report
        asyncio.run(layer.close())
    finally:
        for planted in report["planted"] if report else []:
            os.rmdir(planted)
