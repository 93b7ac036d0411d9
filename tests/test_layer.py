"""The channel layer contract, run against IPCChannelLayer and, when a redis-server can be
started, against channels_redis's RedisChannelLayer and MultiHostChannelLayer (whose normal
channels, the names without '!', live in Redis) with the same config keys."""

from __future__ import annotations

import asyncio
import re
import sys
import threading

import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from .helpers import verify_clean

EVERY_TYPE = {
    "bytes": b"\x00\xff raw",
    "str": "text é ✓",
    "int": -(2**63),
    "big": 2**64 - 1,
    "float": 1.5,
    "list": [1, "two", [3.0]],
    "dict": {"nested": {"deeper": None}},
    "bool": True,
    "none": None,
}


async def receive_within(layer, channel, seconds=2.0):
    return await asyncio.wait_for(layer.receive(channel), seconds)


async def nothing_within(layer, channel, seconds=0.3):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), seconds)


def test_is_a_channels_layer(make_layer):
    layer = make_layer()
    assert isinstance(layer, BaseChannelLayer)
    assert set(layer.extensions) >= {"groups", "flush"}


async def test_send_receive_keeps_every_type(make_layer):
    layer = make_layer()
    await layer.send("test.types", {"type": "t", **EVERY_TYPE})
    got = await receive_within(layer, "test.types")
    assert got == {"type": "t", **EVERY_TYPE}
    assert isinstance(got["bytes"], bytes) and isinstance(got["str"], str)
    verify_clean(layer)


async def test_fifo_per_channel(make_layer):
    layer = make_layer()
    for i in range(50):
        await layer.send("test.fifo", {"i": i})
    assert [(await receive_within(layer, "test.fifo"))["i"] for i in range(50)] == list(range(50))


async def test_receive_waits_for_a_later_send(make_layer):
    layer = make_layer()
    waiting = asyncio.ensure_future(layer.receive("test.later"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await layer.send("test.later", {"n": 1})
    assert await asyncio.wait_for(waiting, 2) == {"n": 1}


async def test_new_channel_names_are_valid_unique_and_usable(make_layer):
    layer = make_layer()
    names = {await layer.new_channel() for _ in range(200)}
    assert len(names) == 200
    for name in list(names)[:5]:
        layer.require_valid_channel_name(name)
        assert "!" in name
    name = names.pop()
    await layer.send(name, {"to": "me"})
    assert await receive_within(layer, name) == {"to": "me"}


async def test_two_layers_on_one_prefix_share_channels(make_layer):
    first, second = make_layer(), make_layer()
    await first.send("test.shared", {"from": "first"})
    assert await receive_within(second, "test.shared") == {"from": "first"}


async def test_capacity_refuses_and_keeps_what_was_queued(make_layer):
    layer = make_layer(capacity=3)
    for i in range(3):
        await layer.send("test.cap", {"i": i})
    with pytest.raises(ChannelFull):
        await layer.send("test.cap", {"i": 3})
    assert [(await receive_within(layer, "test.cap"))["i"] for _ in range(3)] == [0, 1, 2]
    await nothing_within(layer, "test.cap")
    await layer.send("test.cap", {"i": 4})
    verify_clean(layer)


async def test_channel_capacity_globs_and_regexes_first_match_wins(make_layer):
    layer = make_layer(
        capacity=5,
        channel_capacity={
            "test.tiny.*": 1,
            re.compile(r"^test\.t"): 2,
            "test.*": 3,
        },
    )
    assert layer.get_capacity("test.tiny.a") == 1
    assert layer.get_capacity("test.two") == 2
    assert layer.get_capacity("test.other") == 3
    assert layer.get_capacity("elsewhere") == 5
    for channel, room in (("test.tiny.a", 1), ("test.two", 2), ("test.other", 3)):
        for i in range(room):
            await layer.send(channel, {"i": i})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"i": room})


async def test_expired_messages_are_not_delivered(make_layer):
    layer = make_layer(expiry=1)
    await layer.send("test.expiry", {"old": True})
    await asyncio.sleep(2.1)  # channels_redis counts expiry in whole seconds
    await layer.send("test.expiry", {"old": False})
    assert await receive_within(layer, "test.expiry") == {"old": False}
    await nothing_within(layer, "test.expiry")


async def test_groups_reach_members_and_discard_removes(make_layer):
    layer = make_layer()
    await layer.group_add("room", "test.a")
    await layer.group_add("room", "test.b")
    await layer.group_add("room", "test.a")  # adding twice is one membership
    await layer.group_send("room", {"msg": 1})
    assert await receive_within(layer, "test.a") == {"msg": 1}
    assert await receive_within(layer, "test.b") == {"msg": 1}
    await nothing_within(layer, "test.a")
    await layer.group_discard("room", "test.a")
    await layer.group_discard("room", "test.a")  # absent: no error
    await layer.group_discard("nosuchgroup", "test.a")
    await layer.group_send("room", {"msg": 2})
    assert await receive_within(layer, "test.b") == {"msg": 2}
    await nothing_within(layer, "test.a")
    await layer.group_send("empty-group", {"msg": 3})
    verify_clean(layer)


async def test_group_send_skips_full_members_without_raising(make_layer, caplog):
    layer = make_layer(capacity=1)
    await layer.group_add("g", "test.full")
    await layer.group_add("g", "test.room")
    await layer.send("test.full", {"already": "here"})
    with caplog.at_level("INFO"):
        await layer.group_send("g", {"msg": "hi"})
    assert await receive_within(layer, "test.room") == {"msg": "hi"}
    assert await receive_within(layer, "test.full") == {"already": "here"}
    await nothing_within(layer, "test.full")
    assert "1 of 2 channels over capacity in group g" in caplog.text


async def test_memberships_expire_after_group_expiry(make_layer):
    layer = make_layer(group_expiry=1)
    await layer.group_add("brief", "test.member")
    await asyncio.sleep(2.1)
    await layer.group_send("brief", {"late": True})
    await nothing_within(layer, "test.member")
    verify_clean(layer)


async def test_flush_empties_channels_and_groups(make_layer):
    layer, other = make_layer(), make_layer()
    await layer.send("test.flush", {"a": 1})
    await layer.group_add("g", "test.flushed-member")
    await other.flush()
    await nothing_within(layer, "test.flush")
    await layer.group_send("g", {"b": 2})
    await nothing_within(layer, "test.flushed-member")
    await layer.send("test.flush", {"after": True})
    assert await receive_within(layer, "test.flush") == {"after": True}
    verify_clean(layer)


@pytest.mark.parametrize(
    "name", ["", "bad name", "x" * 100, "two!bang!s", "ü", 42, None, b"bytes"]
)
async def test_bad_channel_names_raise_type_error(make_layer, name):
    layer = make_layer()
    with pytest.raises(TypeError):
        await layer.send(name, {"a": 1})
    with pytest.raises(TypeError):
        await layer.receive(name)
    with pytest.raises(TypeError):
        await layer.group_add("group", name)


@pytest.mark.parametrize("name", ["", "has!bang", "x" * 100, "sp ace", 7])
async def test_bad_group_names_raise_type_error(make_layer, name):
    layer = make_layer()
    with pytest.raises(TypeError):
        await layer.group_add(name, "test.ok")
    with pytest.raises(TypeError):
        await layer.group_send(name, {"a": 1})


async def test_longest_names_are_accepted(make_layer):
    layer = make_layer()
    channel, group = "c" * 99, "g" * 99
    await layer.group_add(group, channel)
    await layer.group_send(group, {"long": True})
    assert await receive_within(layer, channel) == {"long": True}


async def test_non_dict_message_is_refused(make_layer):
    layer = make_layer()
    # channels_redis refuses with an assert (AssertionError); asgi_ipc with TypeError.
    expected = AssertionError if make_layer.backend == "redis" else TypeError
    for bad in (["list"], "text", None):
        with pytest.raises(expected):
            await layer.send("test.bad", bad)
    await nothing_within(layer, "test.bad")


async def test_unserialisable_value_raises_type_error(make_layer):
    layer = make_layer()
    with pytest.raises(TypeError):
        await layer.send("test.bad", {"a set": {1, 2}})
    # channels_redis only serialises for a group with members, so give it one.
    await layer.group_add("g", "test.bad")
    with pytest.raises(TypeError):
        await layer.group_send("g", {"an object": object()})
    await nothing_within(layer, "test.bad")


async def test_a_message_just_under_one_mib_is_carried(make_layer):
    layer = make_layer()
    payload = bytes(range(256)) * 4000  # 1 024 000 bytes, ~1 MiB serialised
    await layer.send("test.big", {"blob": payload})
    assert (await receive_within(layer, "test.big"))["blob"] == payload


async def test_cancelled_receive_loses_nothing(make_layer, request):
    if make_layer.backend == "redis" and sys.version_info < (3, 11):
        # Seen with redis-py on Python 3.10: a cancel that lands while async_timeout's own
        # timeout is firing comes out of channels_redis's receive as redis's TimeoutError.
        request.applymarker(pytest.mark.xfail(reason="redis-py turns some cancels into "
                                              "TimeoutError on Python 3.10", strict=False))
    layer = make_layer()
    channel = await layer.new_channel()
    for _ in range(20):
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await layer.send(channel, {"kept": 1})
    assert await receive_within(layer, channel) == {"kept": 1}
    verify_clean(layer)


async def test_cancel_racing_a_send_neither_loses_nor_duplicates(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    delivered = []
    for i in range(30):
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0.005)
        await layer.send(channel, {"i": i})
        waiting.cancel()  # may land before or after the wake-up
        try:
            delivered.append((await waiting)["i"])
        except asyncio.CancelledError:
            delivered.append((await receive_within(layer, channel))["i"])
    assert delivered == list(range(30))
    await nothing_within(layer, channel)


async def test_cancel_at_each_step_of_a_delivery_keeps_every_message_in_order(make_layer):
    """The cancel lands some loop steps after a send from another layer: before the wake-up,
    between the message being handed over and the receive resuming, or after it returned."""
    layer, sender = make_layer(), make_layer()
    channel = await layer.new_channel()
    delivered = []
    for steps in range(12):
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0.005)
        await sender.send(channel, {"i": 2 * steps})
        await sender.send(channel, {"i": 2 * steps + 1})
        for _ in range(steps):
            await asyncio.sleep(0)
        waiting.cancel()
        try:
            delivered.append((await waiting)["i"])
        except asyncio.CancelledError:
            pass
        while len(delivered) < 2 * steps + 2:
            delivered.append((await receive_within(layer, channel))["i"])
    assert delivered == list(range(24))
    await nothing_within(layer, channel)
    verify_clean(layer)


async def test_concurrent_receivers_get_distinct_messages(make_layer):
    layer = make_layer(capacity=1000)
    receivers = [asyncio.ensure_future(layer.receive("test.many")) for _ in range(10)]
    await asyncio.sleep(0.05)
    for i in range(10):
        await layer.send("test.many", {"i": i})
    got = await asyncio.wait_for(asyncio.gather(*receivers), 5)
    assert sorted(m["i"] for m in got) == list(range(10))


def test_used_from_several_threads_and_event_loops(make_layer, request):
    if make_layer.backend == "redis":
        # Measured with channels_redis 4.3.0: with one event loop per call (async_to_sync in
        # threads) it hands back the first message again and again instead of the next ones.
        request.applymarker(pytest.mark.xfail(reason="channels_redis duplicates messages "
                                              "across event loops", strict=False))
    layer = make_layer(capacity=1000)
    errors = []

    def worker(n):
        try:
            for i in range(20):
                async_to_sync(layer.send)(f"test.thread{n}", {"i": i})
            got = [async_to_sync(layer.receive)(f"test.thread{n}")["i"] for _ in range(20)]
            assert got == list(range(20))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


async def test_a_receive_waiting_in_another_thread_is_woken(make_layer):
    layer = make_layer()
    result = {}

    def waiter():
        result["got"] = async_to_sync(layer.receive)("test.cross-loop")

    thread = threading.Thread(target=waiter)
    thread.start()
    await asyncio.sleep(0.2)
    await layer.send("test.cross-loop", {"hello": "thread"})
    thread.join(5)
    assert result.get("got") == {"hello": "thread"}
