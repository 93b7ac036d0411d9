"""The layer's rules for names and messages, in one process and across real processes (spawn).

Names: every name Channels' own validation accepts works (non-ASCII digits and letters, a
trailing newline, 99 characters of four UTF-8 bytes each), in channels, groups and capacity
patterns. Messages: what send and group_send accept, receive returns; the rest is refused at send
with a TypeError naming the value, and the store is left as it was.
"""

from __future__ import annotations

import asyncio
import multiprocessing

import msgpack
import pytest
from channels.exceptions import ChannelFull

from asgi_ipc import IPCChannelLayer
from asgi_ipc.layer import SKIM_FROM

from .helpers import MiB

spawn = multiprocessing.get_context("spawn")
WAIT = 60  # seconds: only turns a hang into a failure

# Channel names Channels accepts that are not ASCII, or end in a newline ("$" lets one through).
CHANNEL_NAMES = [
    "chan.\u0663\u0664",  # Arabic-Indic digits: \d
    "specific.x!\u00f1and\u00fa",  # letters after "!": \w
    "line.end\n",
    "nl.specific!abc\n",
    "\U0001d7d8" * 99,  # MATHEMATICAL DOUBLE-STRUCK DIGIT ZERO: 99 characters, 396 bytes
    "a!" + "\u65e5" * 97,  # CJK letters after "!": 99 characters
]
GROUP_NAMES = ["grp.\u0663", "grp.line\n", "\U0001d7d9" * 99]


def layer_for(prefix: str, **options) -> IPCChannelLayer:
    options.setdefault("channel_memory", 4 * MiB)
    options.setdefault("group_memory", MiB)
    return IPCChannelLayer(prefix=prefix, **options)


def test_unicode_and_newline_names_in_one_process(prefix):
    async def run():
        layer = layer_for(prefix, capacity=5, channel_capacity={"cap.\u0663*": 1})
        # The names are ones Channels' validation accepts; it counts characters, not bytes.
        for name in CHANNEL_NAMES:
            assert len(name) <= 99 and layer.require_valid_channel_name(name)
        for name in GROUP_NAMES:
            assert layer.require_valid_group_name(name)
        assert any(len(name.encode()) > 99 for name in CHANNEL_NAMES)
        with pytest.raises(TypeError):
            layer.require_valid_channel_name("\U0001d7d8" * 100)
        for name in CHANNEL_NAMES:
            await layer.send(name, {"to": name})
        for name in CHANNEL_NAMES:
            assert await layer.receive(name) == {"to": name}
        # A newline-ended name is its own channel, not the name without the newline.
        await layer.send("line.end", {"to": "line.end"})
        await layer.send("line.end\n", {"to": "line.end\n"})
        assert await layer.receive("line.end\n") == {"to": "line.end\n"}
        assert await layer.receive("line.end") == {"to": "line.end"}
        # A capacity pattern with non-ASCII characters, for send and for group_send.
        await layer.send("cap.\u0663\u0664", {"n": 1})
        with pytest.raises(ChannelFull):
            await layer.send("cap.\u0663\u0664", {"n": 2})
        await layer.group_add(GROUP_NAMES[0], "cap.\u0663\u0664")
        await layer.group_add(GROUP_NAMES[0], CHANNEL_NAMES[0])
        await layer.group_send(GROUP_NAMES[0], {"n": 3})
        assert await layer.receive(CHANNEL_NAMES[0]) == {"n": 3}
        assert await layer.receive("cap.\u0663\u0664") == {"n": 1}
        store = layer.engine()
        assert store.verify() == []
        names = {group for _count, group in store.inspect()["largest"]}
        assert GROUP_NAMES[0] in names  # shown as the name, not as replacement characters
        await layer.group_discard(GROUP_NAMES[0], CHANNEL_NAMES[0])
        await layer.group_send(GROUP_NAMES[0], {"n": 4})
        assert await layer.receive("cap.\u0663\u0664") == {"n": 4}
        await layer.flush()
        await layer.close()

    asyncio.run(run())


# --- across processes -------------------------------------------------------------------------


def _member(prefix: str, ready, results) -> None:
    """Join every group with one channel, then wait on every channel of CHANNEL_NAMES (so that
    each is woken by a ring) and report what each received."""

    async def run():
        layer = layer_for(prefix)
        for group, channel in zip(GROUP_NAMES, CHANNEL_NAMES[: len(GROUP_NAMES)], strict=True):
            await layer.group_add(group, channel)
        waits = [asyncio.ensure_future(layer.receive(name)) for name in CHANNEL_NAMES]
        await asyncio.sleep(0)
        ready.put("waiting")
        got = await asyncio.wait_for(asyncio.gather(*waits), WAIT)
        after = [await asyncio.wait_for(layer.receive(name), WAIT) for name in CHANNEL_NAMES[:3]]
        await layer.close()
        results.put((got, after))

    asyncio.run(run())


def _waiters(layer: IPCChannelLayer) -> dict[str, int]:
    return {name: waiters for _count, name, waiters in layer.engine().inspect()["deepest"]}


def test_unicode_newline_and_long_names_across_processes(prefix, children):
    ready, results = spawn.Queue(), spawn.Queue()
    child = spawn.Process(target=_member, args=(prefix, ready, results))
    child.start()
    children.append(child)
    assert ready.get(timeout=WAIT) == "waiting"

    async def run():
        layer = layer_for(prefix)
        # Send only once every receive waits on its channel: each is then woken by a ring.
        for _ in range(WAIT * 100):
            if all(_waiters(layer).get(name) for name in CHANNEL_NAMES):
                break
            await asyncio.sleep(0.01)
        assert all(_waiters(layer).get(name) for name in CHANNEL_NAMES), _waiters(layer)
        for name in CHANNEL_NAMES:
            await layer.send(name, {"to": name})
        for group in GROUP_NAMES:
            await layer.group_send(group, {"group": group})
        await layer.close()

    asyncio.run(run())
    got, after = results.get(timeout=WAIT)
    assert got == [{"to": name} for name in CHANNEL_NAMES]
    assert after == [{"group": group} for group in GROUP_NAMES]
    child.join(WAIT)
    assert child.exitcode == 0


# --- messages ---------------------------------------------------------------------------------


def _deepest_packable() -> dict | None:
    """A message nested as deep as msgpack packs, if its unpacker then refuses it."""
    last = None
    for depth in range(1, 5000):
        inner: list = []  # an empty innermost list: msgpack packs one level more than it unpacks
        for _ in range(depth):
            inner = [inner]
        message = {"deep": inner}
        try:
            data = msgpack.packb(message, use_bin_type=True)
        except ValueError:
            break
        last = data, message
    data, message = last
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=False)
    except ValueError:
        return message
    return None


def bad_message(kind: str) -> dict:
    if kind == "tuple key":
        return {"type": "x", "scores": {("alice", 1): 10}}
    if kind == "nested tuple key":
        return {"type": "x", "rows": [{"k": {((1, 2), "b"): None}}]}
    if kind.startswith("too deep"):
        message = _deepest_packable()
        if message is None:
            pytest.skip("this msgpack decodes everything it packs at any depth")
        if kind == "too deep, large":  # large enough to be skimmed rather than decoded
            message["pad"] = "x" * (2 * SKIM_FROM)
        return message
    raise AssertionError(kind)


BAD_KINDS = ["tuple key", "nested tuple key", "too deep", "too deep, large"]
NAMED = {
    "tuple key": "('alice', 1)",
    "nested tuple key": "((1, 2), 'b')",
    "too deep": "under the key 'deep'",
    "too deep, large": "under the key 'deep'",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_message_receive_could_not_decode_is_refused_at_send(prefix, kind):
    message = bad_message(kind)

    async def run():
        layer = layer_for(prefix)
        await layer.group_add("g", "c.member")
        with pytest.raises(TypeError) as sent:
            await layer.send("c.direct", message)
        assert NAMED[kind] in str(sent.value) and "'c.direct'" in str(sent.value)
        with pytest.raises(TypeError) as grouped:
            await layer.group_send("g", message)
        assert NAMED[kind] in str(grouped.value) and "'g'" in str(grouped.value)
        # Nothing was queued: the next message on each channel is the next one sent.
        assert layer.engine().inspect()["messages"] == 0
        await layer.send("c.direct", {"ok": 1})
        await layer.group_send("g", {"ok": 2})
        assert await layer.receive("c.direct") == {"ok": 1}
        assert await layer.receive("c.member") == {"ok": 2}
        await layer.flush()
        await layer.close()

    asyncio.run(run())


# Accepted messages, and what receive returns for them.
GOOD = [
    ({"type": "a", "text": "h\u00e9llo \U0001f600", "n": -(2**63), "u": 2**64 - 1},) * 2,
    ({"b": b"\x00\xff", "f": 1.5, "t": True, "none": None, "l": [1, [2, {"x": []}]]},) * 2,
    ({1: "int key", b"k": "bytes key", None: "none key", 2.5: "float key"},) * 2,
    ({"t": (1, (2, 3))}, {"t": [1, [2, 3]]}),  # tuples arrive as lists
    ({"blob": b"x" * (MiB - 64)},) * 2,
]


def _sender(prefix: str, kinds: list[str], results) -> None:
    """Send good and bad messages, in turn, on one channel; report what send refused."""

    async def run():
        layer = layer_for(prefix)
        refused = []
        for i, (message, _expected) in enumerate(GOOD):
            await layer.send("rules.c", message)
            for kind in kinds:
                try:
                    await layer.send("rules.c", bad_message(kind))
                except TypeError:
                    refused.append((i, kind))
        await layer.close()
        results.put(refused)

    asyncio.run(run())


def test_what_send_accepts_receive_returns_across_processes(prefix, children):
    kinds = ["tuple key", "nested tuple key"]
    if _deepest_packable() is not None:
        kinds += ["too deep", "too deep, large"]
    results = spawn.Queue()
    child = spawn.Process(target=_sender, args=(prefix, kinds, results))
    child.start()
    children.append(child)
    refused = results.get(timeout=WAIT)
    child.join(WAIT)
    assert child.exitcode == 0
    assert refused == [(i, kind) for i in range(len(GOOD)) for kind in kinds]

    async def run():
        layer = layer_for(prefix)
        got = [await asyncio.wait_for(layer.receive("rules.c"), WAIT) for _ in GOOD]
        assert got == [expected for _message, expected in GOOD]
        assert layer.engine().inspect()["messages"] == 0
        await layer.close()

    asyncio.run(run())
