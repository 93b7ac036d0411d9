"""A pytest plugin that gives a Django site's tests asgi_ipc stores of their own, so that they
never touch the running site's (see testing.py). One line in the top ``conftest.py``::

    pytest_plugins = ["asgi_ipc.pytest_plugin"]

Django's settings must be configured by the time the tests start, as pytest-django does, or
named by ``DJANGO_SETTINGS_MODULE``; where they are neither, the plugin does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.conf import settings

from .testing import isolated_stores


@pytest.fixture(scope="session", autouse=True)
def asgi_ipc_test_stores() -> Iterator[dict[str, str]]:
    """For the whole session, every asgi_ipc layer of CHANNEL_LAYERS on a store of its own, of
    a fresh prefix, removed at the end: ``{alias: prefix}``."""
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        yield {}
        return
    with isolated_stores() as prefixes:
        yield prefixes
