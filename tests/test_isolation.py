"""A site's tests on a store of their own (asgi_ipc.testing): a tiny Django project in a temporary
directory, whose tests flush the layer, send and receive, is run by a real ``manage.py test`` and
by a real pytest with pytest-django, each in a subprocess, while the "running site" has a message
waiting in its store. With the one line each way (the test runner, the pytest plugin) that
message is still there afterwards and the tests' store is gone; without it, the run empties the
site's store, which is what Channels does left to itself (it never reads TEST_CONFIG)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest

import asgi_ipc
from asgi_ipc import IPCChannelLayer

from .helpers import MiB, left_behind, pythonpath

SETTINGS = """
import os

SECRET_KEY = "test-only"
INSTALLED_APPS = ["channels", "asgi_ipc", "shop"]
DATABASES = {{}}
USE_TZ = True
# Both aliases on the site's store, and TEST_CONFIG naming the site's prefix too: the tests must
# still get a store of their own, and one for both aliases.
LAYER = {{
    "BACKEND": "asgi_ipc.IPCChannelLayer",
    "CONFIG": {{"prefix": {prefix!r}, "channel_memory": {memory}, "group_memory": {memory}}},
    "TEST_CONFIG": {{"prefix": {prefix!r}, "channel_memory": 2 * {memory},
                    "group_memory": {memory}}},
}}
CHANNEL_LAYERS = {{"default": LAYER, "other": LAYER}}
{runner}
"""

MANAGE = """
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")
from django.core.management import execute_from_command_line

execute_from_command_line(sys.argv)
"""

TESTS = """
import json
import os

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.test import SimpleTestCase


class LayerTests(SimpleTestCase):
    def test_flush_then_send_and_receive(self):
        layer, other = get_channel_layer(), get_channel_layer("other")
        async_to_sync(layer.flush)()
        async_to_sync(layer.send)("shop.orders", {"type": "order", "n": 1})
        self.assertEqual(async_to_sync(other.receive)("shop.orders"), {"type": "order", "n": 1})
        with open(os.environ["LAYER_REPORT"], "w") as report:
            json.dump({"prefix": layer.prefix, "other": other.prefix,
                       "channel_memory": layer.channel_memory}, report)
"""

SITE_MESSAGE = {"type": "site.message", "text": "for the running site"}

# How each run is made: the command, and the one line that isolates it (None: left out).
RUNS = {
    "manage.py test": (
        ["manage.py", "test", "shop", "-v", "2"],
        ("site_settings.py", 'TEST_RUNNER = "asgi_ipc.testing.IsolatedLayersRunner"'),
    ),
    "pytest-django": (
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "shop/tests.py"],
        ("conftest.py", 'pytest_plugins = ["asgi_ipc.pytest_plugin"]'),
    ),
}


async def open_the_site(prefix: str) -> None:
    """The running site's store, with a message waiting in it."""
    site = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB)
    await site.send("site.inbox", SITE_MESSAGE)
    await site.close()


async def site_messages(prefix: str, take: bool = False) -> tuple[int, list[dict]]:
    """How many messages the site's store holds, and, with ``take``, those of its inbox."""
    site = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB)
    try:
        count = site.engine().inspect()["messages"]
        return count, [await site.receive("site.inbox") for _ in range(count if take else 0)]
    finally:
        await site.close()


def run_tests(tmp_path, prefix: str, how: str, isolated: bool) -> tuple[dict, str]:
    """The project's tests run ``how``, with or without the line that isolates them: what the
    test saw of its layers, and the run's output."""
    command, (where, line) = RUNS[how]
    files = {
        "site_settings.py": SETTINGS.format(prefix=prefix, memory=MiB, runner=""),
        "manage.py": MANAGE,
        "shop/__init__.py": "",
        "shop/tests.py": TESTS,
        "conftest.py": "",
        "pytest.ini": "[pytest]\nDJANGO_SETTINGS_MODULE = site_settings\n",
    }
    if isolated:
        files[where] += "\n" + line + "\n"
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    report = tmp_path / "report.json"
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("PYTEST_", "DJANGO_"))
    }
    env.update(PYTHONPATH=pythonpath(tmp_path), PYTHONDONTWRITEBYTECODE="1",
               LAYER_REPORT=str(report))
    done = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout
    return json.loads(report.read_text()), done.stdout


@pytest.mark.parametrize("how", list(RUNS))
def test_the_one_line_gives_the_tests_a_store_of_their_own(tmp_path, prefix, how):
    asyncio.run(open_the_site(prefix))
    seen, output = run_tests(tmp_path, prefix, how, isolated=True)
    try:
        assert seen["prefix"] != prefix and seen["prefix"].startswith("test."), (seen, output)
        assert seen["other"] == seen["prefix"]  # one store for the aliases that shared one
        assert seen["channel_memory"] == 2 * MiB  # built from TEST_CONFIG
        assert not left_behind(seen["prefix"]), "the tests' store was not removed"
    finally:
        asgi_ipc.unlink(seen["prefix"])
    assert asyncio.run(site_messages(prefix, take=True)) == (1, [SITE_MESSAGE])


@pytest.mark.parametrize("how", list(RUNS))
def test_without_it_the_tests_flush_the_running_sites_store(tmp_path, prefix, how):
    asyncio.run(open_the_site(prefix))
    seen, output = run_tests(tmp_path, prefix, how, isolated=False)
    assert seen["prefix"] == prefix, (seen, output)
    assert asyncio.run(site_messages(prefix)) == (0, [])
