"""Objects at a store's path (or its wake-up directory's) that are not this user's private ones:
another real user's file, a world-writable file of ours, a symlink, another user's directory.
The layer, ``unlink`` and every command refuse them without reading or writing them."""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import subprocess

import pytest

import asgi_ipc
from asgi_ipc import ForeignObject, IPCChannelLayer
from asgi_ipc.engine.layout import store_path, wake_dir

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


def make_store(prefix: str) -> None:
    """A store of our own holding one message, closed again."""

    async def make():
        layer = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB)
        await layer.send("c", {"a": 1})
        await layer.close()

    asyncio.run(make())


def test_a_foreign_wake_up_directory_is_refused_and_left_alone(prefix, other_user):
    make_store(prefix)
    directory = wake_dir(prefix)
    as_user(other_user, f"import os; os.mkdir({directory!r}); os.chmod({directory!r}, 0o777)")
    try:
        store_before = fingerprint(store_path(prefix))
        with pytest.raises(ForeignObject) as info:
            asgi_ipc.unlink(prefix)
        assert directory in str(info.value) and other_user in str(info.value)
        assert "0777" in str(info.value)
        result = cli("unlink", "--prefix", prefix)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert directory in result.stderr and result.stderr.count("\n") == 1
        listed = [line for line in cli("list").stdout.splitlines() if directory in line]
        assert len(listed) == 1 and "FOREIGN" in listed[0]
        # Neither the directory nor the store went.
        assert os.path.isdir(directory) and fingerprint(store_path(prefix)) == store_before
    finally:
        os.rmdir(directory)


def test_unlink_removes_our_wake_up_directory_with_its_sockets(prefix):
    """What another part of the layer creates: mode 0700, one socket per waiting process."""
    import socket

    make_store(prefix)
    directory = wake_dir(prefix)
    os.mkdir(directory, 0o700)
    sockets = []
    for _ in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.path.join(directory, secrets.token_hex(8)))
        sockets.append(sock)
    try:
        listed = cli("list").stdout
        assert f"{prefix} " in listed and directory not in listed  # a store, not two
        assert asgi_ipc.unlink(prefix) is True
        assert not os.path.lexists(directory) and not os.path.lexists(store_path(prefix))
    finally:
        for sock in sockets:
            sock.close()
