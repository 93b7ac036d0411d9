"""Stores of their own for a site's tests, so that they never touch the running site's.

Channels 4 builds every layer from ``CONFIG``: it never reads ``TEST_CONFIG`` (its
``make_test_backend`` is called by nothing), so tests that use ``get_channel_layer()`` share the
store of the running site's prefix, and a ``flush()`` in a test empties the site.

``isolated_stores()`` overrides ``CHANNEL_LAYERS`` for as long as it lasts: every asgi_ipc
layer is built from its ``TEST_CONFIG`` (its ``CONFIG`` where it has none) with a prefix made up
afresh in place of the one given; aliases that shared a prefix share the new one. On the way
out it closes the layers Channels built from them and removes their stores. One line brings it
to a test run:

- ``manage.py test``: ``TEST_RUNNER = "asgi_ipc.testing.IsolatedLayersRunner"`` in the settings
  (or that class first among the bases of a runner of your own);
- pytest: ``pytest_plugins = ["asgi_ipc.pytest_plugin"]`` in the top ``conftest.py``
  (pytest_plugin.py).

The override lives in the test process, and in the processes it forks (Django's ``--parallel``
workers and the server of ``ChannelsLiveServerTestCase`` under the fork start method, Linux's
default up to Python 3.13); a process that loads the settings afresh does not see it.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from django.conf import settings
from django.test.runner import DiscoverRunner
from django.test.utils import override_settings

from .checks import is_ipc_backend
from .engine.segment import unlink
from .layer import IPCChannelLayer


def new_test_prefix() -> str:
    """A prefix no store has: "test." and 12 random hex digits."""
    return f"test.{secrets.token_hex(6)}"


@contextlib.contextmanager
def isolated_stores() -> Iterator[dict[str, str]]:
    """Within it, every asgi_ipc layer of CHANNEL_LAYERS has a store of its own, removed at its
    end. Gives ``{alias: prefix}`` of those layers."""
    layers = getattr(settings, "CHANNEL_LAYERS", {})
    renamed: dict[Any, str] = {}  # the configured prefix (None: the default) -> the tests'
    prefixes: dict[str, str] = {}
    isolated = {}
    for alias, entry in layers.items():
        if isinstance(entry, dict) and is_ipc_backend(entry.get("BACKEND")):
            key = "TEST_CONFIG" if "TEST_CONFIG" in entry else "CONFIG"
            config: dict[str, Any] = dict(entry[key]) if key in entry else {}
            config["prefix"] = renamed.setdefault(config.get("prefix"), new_test_prefix())
            prefixes[alias] = config["prefix"]
            entry = {**entry, "CONFIG": config}
        isolated[alias] = entry
    try:
        with override_settings(CHANNEL_LAYERS=isolated):
            try:
                yield prefixes
            finally:
                # Channels forgets the layers it built when the setting changes back, without
                # closing them.
                for layer in list(channel_layers.backends.values()):
                    if isinstance(layer, IPCChannelLayer) and layer.prefix in prefixes.values():
                        async_to_sync(layer.close)()
    finally:
        for prefix in renamed.values():
            unlink(prefix)


class IsolatedLayersRunner(DiscoverRunner):
    """Django's test runner, with the run's asgi_ipc layers on stores of their own
    (``isolated_stores``): ``TEST_RUNNER = "asgi_ipc.testing.IsolatedLayersRunner"``. Their
    prefixes are ``channel_layer_prefixes`` ({alias: prefix}) once the run has started."""

    def setup_test_environment(self, **kwargs: Any) -> None:
        super().setup_test_environment(**kwargs)
        self._isolation = contextlib.ExitStack()
        self.channel_layer_prefixes = self._isolation.enter_context(isolated_stores())

    def teardown_test_environment(self, **kwargs: Any) -> None:
        self._isolation.close()
        super().teardown_test_environment(**kwargs)
