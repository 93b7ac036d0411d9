"""Objects at a store's path that are not this user's private ones: another real user's file, a
world-writable file of ours, a symlink. The layer, ``unlink`` and every command refuse them
without reading or writing them. Directories another user makes under the names of a prefix's
wake-up directories are left alone, and do not keep ``unlink`` from removing the store."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import pwd
import secrets
import socket
import stat
import subprocess

import pytest

import asgi_ipc
from asgi_ipc import ForeignObject, IPCChannelLayer
from asgi_ipc.engine.layout import store_path

from .helpers import MiB, cli


@pytest.fixture(scope="module")
def other_user():
    """A real user of the machine other than us, with no home."""
    name = "aipc" + secrets.token_hex(4)
    subprocess.run(["useradd", "-M", name], check=True)
    yield name
    subprocess.run(["userdel", name], check=True)


def as_user(user: str, script: str) -> None:
    # /usr/bin/python3 and the stdlib only: the other user cannot read our tree.
    subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", script], check=True,
                   timeout=60)


def fingerprint(path: str) -> tuple:
    """What would show that something was written: the bytes, size and mtime."""
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_size, st.st_mtime_ns


@pytest.fixture(params=["other_users_file", "world_writable_file", "symlink_to_our_file"])
def planted(request, prefix, other_user, tmp_path):
    """An object at the store path of ``prefix`` that the layer must refuse: (path, the words
    the refusal must name, the path whose contents must not change)."""
    path = store_path(prefix)
    content = os.urandom(4096)
    if request.param == "other_users_file":
        as_user(other_user, f"""if True:
            import os
            fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.fchmod(fd, 0o666)
            os.write(fd, {content!r})
        """)
        named, watched = [path, other_user, "0666"], path
    elif request.param == "world_writable_file":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.fchmod(fd, 0o666)
        os.write(fd, content)
        os.close(fd)
        named, watched = [path, "0666", "open to group or others"], path
    else:
        target = tmp_path / "precious"
        target.write_bytes(content)
        os.symlink(target, path)
        named, watched = [path, "symbolic link", f"owned by {getpass.getuser()}"], str(target)
    before = fingerprint(watched)
    yield path, named, watched
    assert fingerprint(watched) == before, "the refused object was written to"
    os.unlink(path)


def test_the_layer_refuses_a_planted_store(planted, prefix):
    path, named, _watched = planted

    async def run():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB)
        for _ in range(2):  # and again: nothing was half done the first time
            with pytest.raises(ForeignObject) as info:
                await layer.send("c", {"a": 1})
            for word in named:
                assert word in str(info.value)
        await layer.close()

    asyncio.run(run())
    with pytest.raises(ForeignObject):
        asgi_ipc.unlink(prefix)
    assert os.path.lexists(path)


@pytest.mark.parametrize("command", ["stats", "verify", "flush", "unlink"])
def test_commands_refuse_a_planted_store_with_status_2(planted, prefix, command):
    path, named, _watched = planted
    result = cli(command, "--prefix", prefix)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for word in named:
        assert word in result.stderr
    assert os.path.lexists(path)


def test_list_marks_a_planted_store_foreign(planted):
    path, _named, _watched = planted
    result = cli("list")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if path in line]
    assert len(lines) == 1 and "FOREIGN" in lines[0], result.stdout


def make_store(prefix: str) -> str:
    """A store of our own holding one message, on which a receive has waited (which made the
    store's wake-up directory), closed again: that directory."""

    async def make() -> str:
        layer = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB)
        await layer.send("c", {"a": 1})
        store = layer.engine()
        waiting = asyncio.ensure_future(layer.receive("empty"))
        for _ in range(6000):  # a minute at most
            if store.seat is not None:
                break
            await asyncio.sleep(0.01)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await layer.close()
        return store.wake_dir

    return asyncio.run(make())


def listed(path: str) -> list[str]:
    """The lines of ``asgi-ipc list`` about ``path``."""
    result = cli("list")
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith(path + " ")]


def test_wake_up_directories_planted_by_another_user_are_left_alone(prefix, other_user):
    """Another user can make directories under the names of the prefix's wake-up directories
    (the fixed name of 2.1, one shaped like a keyed name), never under the store's own. The
    layer does not use them, unlink removes our store and our directory and leaves theirs as
    they are (they must not keep us from removing it), and list marks them FOREIGN."""
    ours = make_store(prefix)
    name = store_path(prefix)
    planted = [name + "+wake", name + "+wake." + "0" * 16]
    as_user(other_user, f"import os\nfor p in {planted!r}:\n    os.mkdir(p); os.chmod(p, 0o777)")
    try:
        assert os.path.isdir(ours) and ours not in planted
        assert listed(ours) == []  # part of the store, not an object of its own
        for path in planted:
            (line,) = listed(path)
            assert "FOREIGN" in line and other_user in line and "0777" in line
        result = cli("unlink", "--prefix", prefix)
        assert result.returncode == 0, result.stderr
        assert not os.path.lexists(ours) and not os.path.lexists(name)
        uid = pwd.getpwnam(other_user).pw_uid
        for path in planted:
            st = os.lstat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o777, uid)
    finally:
        for path in planted:
            os.rmdir(path)


def test_unlink_removes_our_wake_up_directories_with_their_sockets(prefix):
    """The store's directory with the sockets of processes still waiting, and one an earlier
    store of the prefix left behind (mode 0700, ours)."""
    ours = make_store(prefix)
    earlier = store_path(prefix) + "+wake." + "1" * 16
    os.mkdir(earlier, 0o700)
    sockets = []
    for directory in (ours, ours, earlier):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.path.join(directory, secrets.token_hex(8)))
        sockets.append(sock)
    try:
        result = cli("list")  # one store; its directories are part of it
        assert f"{prefix} " in result.stdout and f"{prefix}+wake" not in result.stdout
        assert asgi_ipc.unlink(prefix) is True
        assert not any(map(os.path.lexists, (ours, earlier, store_path(prefix))))
    finally:
        for sock in sockets:
            sock.close()
