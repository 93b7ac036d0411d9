"""Objects that belong to the current user alone: how the layer creates or accepts a path.

/dev/shm is writable by every user (mode 1777), so any of them can create a name the layer is
about to use, with any mode, or plant a symlink there. Every path the layer uses is therefore
created exclusively (``O_CREAT | O_EXCL``, ``mkdir``), never through a symlink (``O_NOFOLLOW``,
``lstat``), and when it exists already it is accepted only if it is of the expected type, owned
by the effective user and closed to group and others. Anything else raises ``ForeignObject``,
naming the path, its owner and mode, and what to do; nothing is read from it or written to it.

The checks are made on the object itself (``fstat`` of the descriptor opened without following
links, ``lstat`` of a directory), and the sticky bit of /dev/shm keeps other users from renaming
or removing an entry of ours afterwards, so nothing can be swapped in between check and use.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat

from .exceptions import ForeignObject

_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFSOCK: "a socket",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def describe(st: os.stat_result) -> str:
    """The kind, owner and mode of an object, as the error messages give them."""
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "an object of unknown type")
    return f"{kind} owned by {_owner(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}"


def foreign(path: str, st: os.stat_result | None, expected: str, why: str) -> ForeignObject:
    found = describe(st) if st is not None else "a symbolic link"
    return ForeignObject(
        f"{path} is {found}, not {expected} private to {_owner(os.geteuid())} ({why}); "
        f"asgi_ipc neither reads nor writes it. Find out who made it; remove it if it is not "
        f"yours (as its owner or root), or use another prefix"
    )


def check_private(path: str, st: os.stat_result, file_type: int, expected: str) -> None:
    """Raise ForeignObject unless ``st`` is of ``file_type``, ours, and closed to others."""
    if stat.S_IFMT(st.st_mode) != file_type:
        raise foreign(path, st, expected, "wrong type")
    if st.st_uid != os.geteuid():
        raise foreign(path, st, expected, "another user's")
    if st.st_mode & 0o077:
        raise foreign(path, st, expected, "open to group or others")


def open_private_file(path: str, create: bool) -> tuple[int, bool]:
    """Open the regular file at ``path`` for reading and writing: (descriptor, created).

    With ``create``, a missing file is created exclusively with mode 0600. An existing one must
    pass ``check_private``; a missing one without ``create`` raises FileNotFoundError."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            pass
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)  # O_NONBLOCK: a planted FIFO must not hang us
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise foreign(
                path, _lstat(path), "a regular file", "a symlink is never followed"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise foreign(path, _lstat(path), "a regular file", "no permission") from None
        raise
    try:
        check_private(path, os.fstat(fd), stat.S_IFREG, "a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def make_private_dir(path: str) -> None:
    """Create the directory ``path`` with mode 0700, or accept it if it is already ours."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        check_private(path, os.lstat(path), stat.S_IFDIR, "a directory")


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None
