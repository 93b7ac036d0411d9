"""A full channel memory takes back exactly what a receive gave: the space of a message received
fits a message of the same size, and a store filled, drained and filled again holds as many
messages the second time."""

from __future__ import annotations

import pytest
from channels.exceptions import ChannelFull

from asgi_ipc import IPCChannelLayer

from .helpers import MiB


def layer_for(prefix):
    return IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB, capacity=1 << 30)


async def fill(layer, size: int, channels: int) -> int:
    sent = 0
    try:
        while True:
            await layer.send(f"c{sent % channels}", {"d": "a" * size})
            sent += 1
    except ChannelFull:
        return sent


@pytest.mark.parametrize("size", [100, 900, 5000])
async def test_a_received_message_makes_room_for_one_of_its_size(prefix, size):
    layer = layer_for(prefix)
    sent = await fill(layer, size, 1)
    for _ in range(3):
        assert await layer.receive("c0") == {"d": "a" * size}
        await layer.send("c0", {"d": "a" * size})  # raised ChannelFull before
    assert layer.engine().verify() == []
    await layer.close()
    assert sent > 0


@pytest.mark.parametrize(("size", "channels"), [(900, 1), (900, 7), (1000, 3), (5000, 2)])
async def test_a_drained_store_holds_as_many_messages_again(prefix, size, channels):
    layer = layer_for(prefix)
    first = await fill(layer, size, channels)
    for i in range(first):
        await layer.receive(f"c{i % channels}")
    assert await fill(layer, size, channels) == first
    assert layer.engine().verify() == []
    await layer.close()
