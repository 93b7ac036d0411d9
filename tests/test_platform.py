"""Machines the layer cannot run on: macOS, Windows, a Linux without /dev/shm. The layer refuses
at construction, the system check reports asgi_ipc.E005, and on Windows, where Python has no
fcntl, ``import asgi_ipc`` refuses already, each saying what the layer needs and what to use
instead. The other platforms are played through ``asgi_ipc.host.probe``, the seam host.py
documents, or by hiding fcntl from the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import asgi_ipc.host
from asgi_ipc import IPCChannelLayer, UnsupportedPlatform
from asgi_ipc.host import Host

from .helpers import django_check, pythonpath, shm_path

MACOS = Host(platform="darwin", shm_dir=False, ofd_locks=False, fallocate=False)
NEEDS = (
    "a tmpfs at /dev/shm, open-file-description locks (fcntl.F_OFD_SETLK), os.posix_fallocate"
)
INSTEAD = "InMemoryChannelLayer for a single development server"


def test_this_machine_has_what_the_layer_needs():
    assert asgi_ipc.host.refusal() is None


@pytest.mark.parametrize(
    ("host", "lacks"),
    [
        (MACOS, f"lacks {NEEDS}."),
        (Host("linux", shm_dir=False, ofd_locks=True, fallocate=True),
         "lacks a tmpfs at /dev/shm."),
    ],
)
def test_the_layer_refuses_at_construction_saying_what_it_needs_and_what_instead(
    monkeypatch, prefix, host, lacks
):
    monkeypatch.setattr(asgi_ipc.host, "probe", lambda: host)
    with pytest.raises(UnsupportedPlatform) as refused:
        IPCChannelLayer(prefix=prefix)
    message = str(refused.value)
    assert f"this machine ({host.platform})" in message and lacks in message, message
    assert NEEDS in message and INSTEAD in message and "channels_redis" in message
    assert not os.path.exists(shm_path(prefix))


def test_the_system_check_reports_the_machine_and_still_the_options(tmp_path, prefix):
    code, output = django_check(
        tmp_path,
        '{"default": {"BACKEND": "asgi_ipc.IPCChannelLayer", '
        f'"CONFIG": {{"prefix": {prefix!r}, "capacity": 0}}}}}}',
        settings=f"""
            import asgi_ipc.host
            asgi_ipc.host.probe = lambda: asgi_ipc.host.{MACOS!r}
        """,
    )
    assert code == 1, output
    assert "(asgi_ipc.E005) CHANNEL_LAYERS['default']: the layer cannot run here" in output
    assert "this machine (darwin)" in output and NEEDS in output and INSTEAD in output
    assert "(asgi_ipc.E002)" in output and "capacity=0" in output
    assert not os.path.exists(shm_path(prefix))


def test_without_fcntl_as_on_windows_importing_the_package_refuses(prefix):
    hide_fcntl = "import sys; sys.modules['fcntl'] = None; import asgi_ipc"
    done = subprocess.run(
        [sys.executable, "-c", hide_fcntl], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": pythonpath()},
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("asgi_ipc.exceptions.UnsupportedPlatform: asgi_ipc runs on Linux"), last
    assert "lacks open-file-description locks (fcntl.F_OFD_SETLK)." in last and INSTEAD in last
    assert not os.path.exists(shm_path(prefix))
