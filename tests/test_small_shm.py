"""A /dev/shm smaller than the store, as Docker's 64 MiB default is smaller than the default
channel_memory: refused at creation when the store cannot fit, and a store that fills the tmpfs
up gets ChannelFull and GroupMemoryFull, never SIGBUS. A /dev/shm whose inodes are all taken
(which any user can do): store creation is refused with SharedMemoryTooSmall, and a receive
still waits and gets its message. Run in a mount namespace of its own with a real 16 MiB tmpfs
on /dev/shm (of few inodes, for the latter); and on the real /dev/shm, reading a big sparse store
allocates nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from asgi_ipc import IPCChannelLayer
from asgi_ipc.engine.layout import store_path

from .helpers import ROOT, MiB, pythonpath

CHILD = os.path.join(os.path.dirname(__file__), "small_shm_child.py")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to mount a tmpfs of its own",
)


def in_small_shm(scenario: str, prefix: str, options: str = "size=16m") -> dict:
    """Run a scenario of small_shm_child.py with a tmpfs mounted with ``options`` on /dev/shm."""
    env = dict(os.environ, PYTHONPATH=pythonpath(ROOT))
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o {options} tmpfs /dev/shm && exec "$0" "$@"',
         sys.executable, CHILD, scenario, prefix],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_store_larger_than_dev_shm_is_refused_at_creation(prefix):
    report = in_small_shm("too_large", prefix)
    message = report["outcome"]
    assert message != "created"
    assert "64.0 MiB" in message and "16.0 MiB" in message  # channel_memory, the tmpfs
    assert "--shm-size" in message and "channel_memory" in message
    assert report["left"] == []  # nothing left behind


def test_a_full_tmpfs_gives_channel_full_and_group_memory_full_not_sigbus(prefix):
    report = in_small_shm("fills_up", prefix)
    assert report["writer"] == "ChannelFull" and report["sent"] > 0
    assert report["other"][0] == 0, report["other"]  # not killed by a signal
    assert json.loads(report["other"][1]) == {"sent": 0, "outcome": "ChannelFull"}
    assert report["writer_again"] == "ChannelFull"
    assert report["group_add"] == "GroupMemoryFull" and report["members"] > 0
    assert report["stats"][0] == 0, report["stats"]
    assert report["verify"] == [0, f"store of prefix {prefix!r} is consistent"]
    assert report["problems"] == []
    assert report["received"] == report["sent"] + 10
    assert report["send_after_receive"] == "no error"
    assert report["after_flush"][1] == "ChannelFull" and report["problems_after_flush"] == []


def test_a_receive_after_a_flush_on_a_full_tmpfs_waits_rather_than_dies_of_sigbus(prefix):
    report = in_small_shm("receive_after_flush", prefix)
    assert report == {"first": True, "second": "waited", "problems": [], "third": True}


FEW_INODES = "size=16m,nr_inodes=64"


def test_no_inode_left_refuses_the_store_with_shared_memory_too_small(prefix):
    report = in_small_shm("no_inode_for_store", prefix, FEW_INODES)
    assert report["outcome"][0] == "SharedMemoryTooSmall", report["outcome"]
    message = report["outcome"][1]
    assert "inode" in message and "/dev/shm" in message and prefix in message
    assert report["left"] == []  # nothing of the store, in the tmpfs or anywhere else


def test_no_inode_left_for_a_doorbell_still_lets_a_receive_wait(prefix):
    """The first receive of a process to wait needs an inode for its doorbell (and one for the
    wake-up directory). Without one it waits anyway, woken by the periodic check, and its
    process binds its doorbell once an inode is free."""
    report = in_small_shm("no_inode_to_wait", prefix, FEW_INODES)
    assert report["without_doorbell"] is True
    assert report["first"] == {"n": 0}  # sent by another process while no inode was free
    assert report["bound_later"] is True
    assert report["wake_dir_mode"] == "0700" and report["sockets"] == 1
    assert report["third"] == {"n": 0}  # read by an event loop that reads the doorbell
    assert report["problems"] == [] and report["left"] == []


async def test_reading_a_big_sparse_store_allocates_nothing(prefix):
    layer = IPCChannelLayer(prefix=prefix, channel_memory=1024 * MiB, group_memory=MiB)
    store = layer.engine()

    def allocated() -> int:
        return os.stat(store_path(prefix)).st_blocks

    before = allocated()
    stats = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "asgi_ipc", "stats", "--prefix", prefix],
        capture_output=True, text=True, timeout=120,
    )
    assert stats.returncode == 0, stats.stderr
    assert allocated() == before, "stats allocated pages"
    assert store.verify() == []
    assert allocated() == before, "verify allocated pages"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("empty"), 0.5)
    assert allocated() == before, "a receive on an empty channel allocated pages"
    await layer.close()
