"""Django system checks for asgi_ipc's settings, run by ``manage.py check`` and at the start of
``runserver``, ``migrate`` and the like.

Every ``CHANNEL_LAYERS`` entry whose ``BACKEND`` is IPCChannelLayer (or a subclass) has its
``CONFIG`` checked as the layer will meet it, with the layer's own judgements, so that the check
and the layer can never disagree: the host (``host.refusal``), the options (``config_problems``,
the very validation the layer runs when it is built), and the store of the prefix as the layer's
first call would find it (segment.py): a ready store is used as it is, whatever sizes are
configured; a store to be created must pass ``creation_refusal``, the rule creation applies. What
the layer would refuse is an Error, so that a deploy that cannot work stops here rather than at
every WebSocket; a store that works but cannot grow to its full size is a Warning.

``TEST_CONFIG`` is not read by Channels 4 at all; ``asgi_ipc.testing`` builds the tests' store
from it. Its options are checked, and nothing else: the tests may run elsewhere, on another
/dev/shm, and their store is a new one of a prefix of its own.

Registered by ``asgi_ipc.apps.AsgiIpcConfig``, that is when ``"asgi_ipc"`` is in INSTALLED_APPS.
(Django runs the checks of installed apps only; nothing imports the layer before the checks run.)

Ids: E001 a CONFIG that is not a dict; E002 an option with a bad value; E003 an option the layer
does not know; E004 an option of channels_redis only; E005 a machine the layer cannot run on;
E006 no room in /dev/shm to create the store; E007 an object at the store's path that the layer
refuses; W001 a store that cannot grow to its full size.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from .engine.layout import Geometry, store_path
from .engine.segment import creation_refusal, existing_store, growth_shortfall, shm_space
from .exceptions import ForeignObject, StoreCorrupted
from .host import refusal
from .layer import IPCChannelLayer, config_problems

KIND_IDS = {"value": "asgi_ipc.E002", "unknown": "asgi_ipc.E003", "channels_redis": "asgi_ipc.E004"}

_TEST_CONFIG_NOTE = (
    " (Channels never reads TEST_CONFIG: asgi_ipc.testing builds the tests' store from it)"
)
_ONLY_WHERE_UNUSED = (
    "Where this process never uses the layer (a one-off container that only runs migrate, "
    "say), silence it with SILENCED_SYSTEM_CHECKS."
)


def is_ipc_backend(backend: Any) -> bool:
    """Whether ``backend``, the BACKEND of a CHANNEL_LAYERS entry, names IPCChannelLayer or a
    subclass."""
    if not isinstance(backend, str):
        return False
    try:
        cls = import_string(backend)
    except Exception:  # not importable: Channels reports that itself
        return False
    return isinstance(cls, type) and issubclass(cls, IPCChannelLayer)


def _store_problems(where: str, layer: IPCChannelLayer) -> list[checks.CheckMessage]:
    """What the layer's first call will meet of its store, in /dev/shm as it is now."""
    try:
        existing = existing_store(layer.prefix)
    except (ForeignObject, StoreCorrupted) as exc:
        return [checks.Error(
            f"{where}: the layer's first call will refuse what is at the path of its store: "
            f"{exc}",
            hint=_ONLY_WHERE_UNUSED,
            id="asgi_ipc.E007",
        )]
    space = shm_space()
    if existing is None:
        geometry = Geometry.for_sizes(layer.channel_memory, layer.group_memory)
        refused = creation_refusal(store_path(layer.prefix), geometry, space)
        if refused is None:
            return []
        return [checks.Error(
            f"{where}: there is no store of prefix {layer.prefix!r} yet, and the layer's first "
            f"call will refuse to create it (SharedMemoryTooSmall): {refused}",
            hint=_ONLY_WHERE_UNUSED,
            id="asgi_ipc.E006",
        )]
    shortfall = growth_shortfall(layer.prefix, existing, space)
    if shortfall is None:
        return []
    return [checks.Warning(
        f"{where}: {shortfall}",
        hint="Give /dev/shm more room (docker run --shm-size=..., Compose shm_size:, in "
        "Kubernetes an emptyDir with medium: Memory and a sizeLimit mounted at /dev/shm), or "
        "stop every process of the prefix, remove the store (asgi-ipc unlink) and start again "
        "with a smaller channel_memory.",
        id="asgi_ipc.W001",
    )]


def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Errors for every asgi_ipc layer in CHANNEL_LAYERS that will be refused, on this machine,
    for its options or for its store; a warning for each whose store cannot grow to its full
    size."""
    layers = getattr(settings, "CHANNEL_LAYERS", None)
    if not isinstance(layers, dict):
        return []
    found: list[checks.CheckMessage] = []
    unsupported = refusal()
    for alias, entry in layers.items():
        if not isinstance(entry, dict) or not is_ipc_backend(entry.get("BACKEND")):
            continue
        for key in ("CONFIG", "TEST_CONFIG"):
            if key not in entry:
                continue
            where = f"CHANNEL_LAYERS[{alias!r}][{key!r}]"
            note = _TEST_CONFIG_NOTE if key == "TEST_CONFIG" else ""
            config = entry[key]
            if not isinstance(config, dict):
                found.append(checks.Error(
                    f"{where} is a {type(config).__name__}, not a dict of options{note}",
                    hint="Write the layer's options as a dict, e.g. {'prefix': 'mysite'}.",
                    id="asgi_ipc.E001",
                ))
                continue
            # A subclass's own options (MultiHostChannelLayer's ``hosts``...) are its to check,
            # when it is built; the rest are IPCChannelLayer's.
            own = getattr(import_string(entry["BACKEND"]), "OWN_OPTIONS", ())
            config = {option: value for option, value in config.items() if option not in own}
            problems = config_problems(config)
            for problem in problems:
                found.append(checks.Error(
                    f"{where}: {problem.message}{note}",
                    hint=problem.hint + ".",
                    id=KIND_IDS[problem.kind],
                ))
            if key != "CONFIG":
                continue
            if unsupported is not None:
                found.append(checks.Error(
                    f"CHANNEL_LAYERS[{alias!r}]: the layer cannot run here: {unsupported}",
                    hint="Give this machine's settings another BACKEND. " + _ONLY_WHERE_UNUSED,
                    id="asgi_ipc.E005",
                ))
            elif not problems:
                # Builds no store: it only fills in the defaults.
                found += _store_problems(where, IPCChannelLayer(**config))
    return found


def register() -> None:
    """Register the check (again is harmless: the registry is a set)."""
    checks.register(check_channel_layers)
