"""What asgi_ipc needs of the machine it runs on, and its refusal where that is missing.

The layer needs what Linux offers: the tmpfs at /dev/shm where its store lives, open-file-
description locks (``fcntl.F_OFD_SETLK``), by which the kernel tells which processes are
attached or waiting whatever their PID namespace, and ``os.posix_fallocate``, which reserves a
page of the store before it is touched so that a full tmpfs is an error rather than a SIGBUS.
macOS, Windows and the BSDs lack one or more of them. Rather than fail at the first call that
needs what is missing, the layer refuses at construction (``UnsupportedPlatform``) and the
system check reports ``asgi_ipc.E005``, both with ``refusal()``'s message. On Windows Python has
no ``fcntl`` at all, so the refusal comes at ``import asgi_ipc`` already.

This module imports nothing that a platform may lack. ``probe()`` is the seam through which
everything here learns about the host: tests replace it (``monkeypatch.setattr(asgi_ipc.host,
"probe", ...)``) to play another platform.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

from .exceptions import UnsupportedPlatform

# Linux keeps POSIX shared memory as files in this tmpfs; the layer opens them there directly,
# so that it can refuse symlinks and check the owner (see private.py).
SHM_DIR = "/dev/shm"

INSTEAD = (
    "On this machine use channels.layers.InMemoryChannelLayer for a single development server "
    "(one process), or channels_redis to share a layer between processes"
)


class Host(NamedTuple):
    """What the layer needs, and whether this machine has it."""

    platform: str  # sys.platform, for the message
    shm_dir: bool  # SHM_DIR is a directory
    ofd_locks: bool  # fcntl.F_OFD_SETLK
    fallocate: bool  # os.posix_fallocate


NEEDS = {
    "shm_dir": f"a tmpfs at {SHM_DIR}",
    "ofd_locks": "open-file-description locks (fcntl.F_OFD_SETLK)",
    "fallocate": "os.posix_fallocate",
}


def probe() -> Host:
    """What this machine offers of what the layer needs."""
    try:
        import fcntl
    except ImportError:  # Windows
        ofd_locks = False
    else:
        ofd_locks = hasattr(fcntl, "F_OFD_SETLK")
    return Host(
        platform=sys.platform,
        shm_dir=os.path.isdir(SHM_DIR),
        ofd_locks=ofd_locks,
        fallocate=hasattr(os, "posix_fallocate"),
    )


def refusal() -> str | None:
    """Why the layer cannot run here, saying what it needs and what to use instead; None where
    it can."""
    host = probe()
    missing = [need for field, need in NEEDS.items() if not getattr(host, field)]
    if not missing:
        return None
    return (
        f"asgi_ipc runs on Linux only: it needs {', '.join(NEEDS.values())}, and this machine "
        f"({host.platform}) lacks {', '.join(missing)}. {INSTEAD}"
    )


def require_supported() -> None:
    """Raise UnsupportedPlatform unless the layer can run here."""
    why = refusal()
    if why is not None:
        raise UnsupportedPlatform(why)
