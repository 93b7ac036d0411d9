"""What the layer and its commands say agrees with the README: one sizing rule that holds for
every store, the store named by its path, one piece of advice to resize it, and every dotted
name the README gives exists."""

from __future__ import annotations

import importlib
import logging
import os
import re

import pytest

from asgi_ipc import IPCChannelLayer, StoreCorrupted
from asgi_ipc.engine.layout import Geometry

from .helpers import ROOT, MiB, shm_path, write_object

README = (ROOT / "README.rst").read_text()
KiB = 1024
SIZES = [(64 * KiB, 64 * KiB), (256 * KiB, 256 * KiB), (MiB, MiB), (3 * MiB, 5 * MiB),
         (100 * MiB, 20 * MiB), (130 * MiB, 30 * MiB), (200 * MiB + 8, 20 * MiB - 8),
         (1 << 40, 1 << 40)]


def flat(text: str) -> str:
    return " ".join(text.split())


def test_one_sizing_rule_holds_for_every_store():
    assert ("a store takes at most channel_memory + group_memory, plus 8% of that, plus 1.1 MiB"
            in flat(README))
    assert "about 6%" not in README and "about 2%" not in README
    for channel_memory, group_memory in SIZES:
        geometry = Geometry.for_sizes(channel_memory, group_memory)
        indexes = (geometry.message_heap - geometry.channel_index
                   + geometry.group_heap - geometry.group_index) * 8
        rest = geometry.total_bytes - channel_memory - group_memory - indexes
        assert round(rest / MiB, 2) == 1.07  # journal, process table and header
        both = channel_memory + group_memory
        assert geometry.total_bytes <= both + 0.08 * both + 1.1 * MiB
    default = Geometry.for_sizes(100 * MiB, 20 * MiB)
    assert f"The default store is {default.total_bytes / MiB:.1f} MiB" in flat(README)


@pytest.mark.parametrize("channel_memory, group_memory", SIZES[1:])
def test_the_index_shares_the_readme_gives_are_right(channel_memory, group_memory):
    geometry = Geometry.for_sizes(channel_memory, group_memory)
    channel = (geometry.message_heap - geometry.channel_index) * 8 / channel_memory
    group = (geometry.group_heap - geometry.group_index) * 8 / group_memory
    assert 0.0156 <= channel <= 0.0313 and 0.039 <= group <= 0.0782
    assert ("1.6% to 3.1% of ``channel_memory`` and 3.9% to 7.8% of ``group_memory``"
            in flat(README))


def test_the_resize_warning_gives_the_readme_advice_and_names_the_path(prefix, caplog):
    first = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB).engine()
    try:
        with caplog.at_level(logging.WARNING, logger="asgi_ipc"):
            IPCChannelLayer(prefix=prefix, channel_memory=2 * MiB, group_memory=MiB).engine(
            ).close()
    finally:
        first.close()
    assert f"asgi_ipc store /dev/shm/asgi_ipc.{prefix} exists" in caplog.text
    assert (f"to resize it: stop every process of the prefix, run `asgi-ipc unlink --prefix "
            f"{prefix}`, start them again") in caplog.text
    assert "flush" not in caplog.text
    assert ("to resize, stop every process, ``asgi-ipc unlink --prefix P`` and start again"
            in flat(README))


def test_a_damaged_store_is_named_by_its_path(prefix):
    write_object(prefix, os.urandom(8192))
    with pytest.raises(StoreCorrupted, match=re.escape(f"{shm_path(prefix)} is not an asgi_ipc")):
        IPCChannelLayer(prefix=prefix).engine()


def test_every_dotted_name_in_the_readme_exists():
    # asgi_ipc.E001 and the like are ids of the system check, not Python names.
    names = set(re.findall(r"``(asgi_ipc(?:\.\w+)+)", README)) - set(
        re.findall(r"asgi_ipc\.[EW]\d{3}", README))
    assert "asgi_ipc.engine.layout.SLOTS" in names
    for name in sorted(names):
        module, attribute = name, []
        while True:
            try:
                found = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, _, last = module.rpartition(".")
                attribute.insert(0, last)
        for part in attribute:
            assert hasattr(found, part), name
            found = getattr(found, part)
