"""Django system checks for asgi_ipc's settings, run by ``manage.py check`` and at the start of
``runserver``, ``migrate`` and the like.

Every ``CHANNEL_LAYERS`` entry whose ``BACKEND`` is IPCChannelLayer (or a subclass) has its
``CONFIG`` and ``TEST_CONFIG`` checked by ``config_problems``, the very validation the layer runs
when it is built, so the check and the layer can never disagree. And since Docker gives a
container a 64 MiB /dev/shm unless told otherwise, a store larger than the /dev/shm it would live
in is reported before the first message meets a full tmpfs.

Registered by ``asgi_ipc.apps.AsgiIpcConfig``, that is when ``"asgi_ipc"`` is in INSTALLED_APPS.
(Django runs the checks of installed apps only; nothing imports the layer before the checks run.)

Ids: E001 a CONFIG that is not a dict; E002 an option with a bad value; E003 an option the layer
does not know; E004 an option of channels_redis only; W001 a /dev/shm smaller than the store.
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from .engine.layout import SHM_DIR, Geometry
from .layer import IPCChannelLayer, config_problems

KIND_IDS = {"value": "asgi_ipc.E002", "unknown": "asgi_ipc.E003", "channels_redis": "asgi_ipc.E004"}


def _is_ours(backend: Any) -> bool:
    if not isinstance(backend, str):
        return False
    try:
        cls = import_string(backend)
    except Exception:  # not importable: Channels reports that itself
        return False
    return isinstance(cls, type) and issubclass(cls, IPCChannelLayer)


def _shm_size() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Errors for every bad option of every asgi_ipc layer in CHANNEL_LAYERS; a warning for each
    whose store would not fit in /dev/shm."""
    layers = getattr(settings, "CHANNEL_LAYERS", None)
    if not isinstance(layers, dict):
        return []
    found: list[checks.CheckMessage] = []
    shm_size = _shm_size()
    for alias, entry in layers.items():
        if not isinstance(entry, dict) or not _is_ours(entry.get("BACKEND")):
            continue
        for key in ("CONFIG", "TEST_CONFIG"):
            if key not in entry:
                continue
            where = f"CHANNEL_LAYERS[{alias!r}][{key!r}]"
            config = entry[key]
            if not isinstance(config, dict):
                found.append(checks.Error(
                    f"{where} is a {type(config).__name__}, not a dict of options",
                    hint="Write the layer's options as a dict, e.g. {'prefix': 'mysite'}.",
                    id="asgi_ipc.E001",
                ))
                continue
            problems = config_problems(config)
            for problem in problems:
                found.append(checks.Error(
                    f"{where}: {problem.message}",
                    hint=problem.hint + ".",
                    id=KIND_IDS[problem.kind],
                ))
            if problems or shm_size is None:
                continue
            layer = IPCChannelLayer(**config)  # builds no store: just fills in the defaults
            needed = Geometry.for_sizes(layer.channel_memory, layer.group_memory).total_bytes
            if needed > shm_size:
                found.append(checks.Warning(
                    f"{where}: the store of prefix {layer.prefix!r} takes {needed} bytes "
                    f"(channel_memory {layer.channel_memory} + group_memory "
                    f"{layer.group_memory} + indexes), more than the {shm_size} bytes of "
                    f"{SHM_DIR}, so the store cannot grow to its configured size",
                    hint=f"Give {SHM_DIR} more room (docker run --shm-size=..., or shm_size: "
                    "in docker compose; a Kubernetes emptyDir with medium: Memory and a "
                    "sizeLimit), or set a smaller channel_memory.",
                    id="asgi_ipc.W001",
                ))
    return found


def register() -> None:
    """Register the check (again is harmless: the registry is a set)."""
    checks.register(check_channel_layers)
