"""``Engine.apply_relayed`` (engine/inbox.py) cut short at every journaled write, as a relay
killed there would be, then applied again from the inbox as the next relay does: every message
sent to a channel arrives once, in order; each group member gets each group_send once (a batch
that commits in steps may leave a member without one, never with two: see engine/inbox.py);
the position ends past the last entry."""

from __future__ import annotations

import msgpack
import pytest

import asgi_ipc
from asgi_ipc.engine import Engine
from asgi_ipc.engine.inbox import ADD, GROUP, SEND, Entry, position

from .helpers import MiB, new_prefix

EPOCH = 0x1234


class Cut(Exception):
    pass


def batch() -> list[Entry]:
    entries = []
    for n in range(12):
        entries.append(Entry(1000 + n, 0, SEND, b"", b"chan%d" % (n % 3), msgpack.packb(n)))
    entries.append(Entry(2000, 0, ADD, b"room", b"late.member"))
    for n in range(3):
        entries.append(Entry(2001, n, GROUP, b"room", b"", msgpack.packb(100 + n)))
    return entries


def apply(engine: Engine, entries: list[Entry]) -> None:
    engine.apply_relayed(EPOCH, (0, 0), (0, 0), entries, lambda _c: 1000, 60_000, 86_400_000)


def drain(engine: Engine, channel: bytes) -> list[int]:
    got = []
    while True:
        found = engine.locked(lambda: engine.queues.pop(channel, engine.clock()))
        if found is None:
            return got
        got.append(msgpack.unpackb(found[0]))


def writes_of_one_apply() -> int:
    prefix = new_prefix()
    engine = Engine(prefix, MiB, MiB)
    count = 0

    def tally(_word: int) -> None:
        nonlocal count
        count += 1

    try:
        for member in (b"m1", b"m2", b"m3"):
            engine.group_add(b"room", member)
        engine.inject(on_write=tally)
        apply(engine, batch())
    finally:
        engine.close()
        asgi_ipc.unlink(prefix)
    return count


@pytest.mark.timeout(300)
def test_a_relay_cut_at_every_write_applies_each_entry_once():
    total = writes_of_one_apply()
    assert total > 50
    for cut in range(1, total + 1, max(1, total // 150)):
        prefix = new_prefix()
        engine = Engine(prefix, MiB, MiB)
        try:
            for member in (b"m1", b"m2", b"m3"):
                engine.group_add(b"room", member)
            seen = 0

            def stop(_word: int, cut: int = cut) -> None:
                nonlocal seen
                seen += 1
                if seen == cut:
                    raise Cut

            engine.inject(on_write=stop)
            with pytest.raises(Cut):
                apply(engine, batch())
            engine.journal.hook = None
            apply(engine, batch())  # the next relay reads the whole batch again
            for c in range(3):
                assert drain(engine, b"chan%d" % c) == list(range(c, 12, 3)), cut
            for member in (b"m1", b"m2", b"m3", b"late.member"):
                copies = drain(engine, member)
                # No step of this batch commits before its end (nothing it frees), so the
                # rollback takes back whole group_sends too: every member gets each once.
                assert copies == [100, 101, 102], (cut, member, copies)
            assert position(engine.words) == (EPOCH, 2001, 2)
            assert engine.verify() == []
        finally:
            engine.close()
            asgi_ipc.unlink(prefix)


def test_a_membership_group_memory_has_no_room_for_is_refused_and_the_relay_goes_on():
    prefix = new_prefix()
    engine = Engine(prefix, MiB, 64 * 1024)
    try:
        adds = [Entry(3000, n, ADD, b"big", b"member.%090d" % n) for n in range(2000)]
        after = Entry(3001, 0, SEND, b"", b"after", msgpack.packb("after"))
        applied = engine.apply_relayed(EPOCH, (0, 0), (0, 0), [*adds, after], lambda _c: 10,
                                       60_000, 86_400_000)
        assert 0 < applied.refused < 2000 and applied.applied == 2001
        assert drain(engine, b"after") == ["after"]
        assert position(engine.words) == (EPOCH, 3001, 0)
        assert engine.verify() == []
    finally:
        engine.close()
        asgi_ipc.unlink(prefix)


def test_a_batch_read_from_past_the_position_is_refused_whole():
    """A relay that read the position as another moved it (or torn) must not skip entries."""
    prefix = new_prefix()
    engine = Engine(prefix, MiB, MiB)
    try:
        def send(ms: int) -> Entry:
            return Entry(ms, 0, SEND, b"", b"c", msgpack.packb(ms))

        def run(read_from: tuple[int, int], entries: list[Entry]):
            return engine.apply_relayed(EPOCH, (0, 0), read_from, entries, lambda _c: 100,
                                        60_000, 86_400_000)

        assert run((0, 0), [send(10), send(11)]).applied == 2
        # Read from 12-0 while the store is at 11-0: 11-x..12-0 would be skipped for good.
        refused = run((12, 0), [send(13)])
        assert refused.behind and refused.applied == 0
        assert position(engine.words) == (EPOCH, 11, 0)
        # Read from behind the position: what was applied is fenced, the rest applied.
        again = run((10, 0), [send(11), send(12), send(13)])
        assert (again.fenced, again.applied, again.behind) == (1, 2, False)
        assert drain(engine, b"c") == [10, 11, 12, 13]
    finally:
        engine.close()
        asgi_ipc.unlink(prefix)
