"""Damaged stores: random bytes and implausible words written over the header and over every
area of a populated store, and objects that are not stores at all.

Whatever the damage, every operation (attaching, send, receive, the group operations, flush,
verify) either works or raises one of the documented errors (``StoreCorrupted`` and its base
``StoreError``, ``ChannelFull``, ``GroupMemoryFull``; ``TypeError`` for bad input) within a
bounded time, and never hands out a message that was not sent (nor, in a targeted case, one
sent to another channel). Each case runs in a child process with a deadline, so that a hang or an
interpreter crash (a signal) is caught and reported as such rather than taking the run down.
Damage that random writes hardly ever produce (a loop in a list, a link into another channel) is
made on purpose in targeted cases.

The cases are seeded: ``FUZZ_ROUNDS`` (default 3) seeds per area and kind of damage, offset by
``FUZZ_SEED`` (default 0) to explore others.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import signal

import pytest

import asgi_ipc
from asgi_ipc import IPCChannelLayer
from asgi_ipc.engine.layout import H_JOURNAL_COUNT, H_READY, H_VERSION, JOURNAL_ENTRIES, Geometry

from . import workers
from .helpers import shm_path, write_object

pytestmark = pytest.mark.timeout(300)

KiB = 1024
CONFIG = {
    "channel_memory": 256 * KiB,
    "group_memory": 64 * KiB,
    "capacity": 50,
    # A pattern makes group_send decode every member's name to find its capacity.
    "channel_capacity": {"f.d*": 3},
}
CHANNELS = ["f.a", "f.b", "f.c", "f.d"]
GROUPS = ["fg.x", "fg.y", "fg.new"]
ROUNDS = int(os.environ.get("FUZZ_ROUNDS", "3"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
CASE_DEADLINE = 60  # seconds for a whole session; a hang is the only way to exceed it
OPERATION_BOUND = 10  # seconds for one operation, however damaged the store

ALLOWED = {"ok", "StoreCorrupted", "StoreError", "ChannelFull", "GroupMemoryFull"}


def populate(prefix: str) -> tuple[set, dict]:
    """A store with messages on every channel, some of them shared copies of a group_send, and
    a few memberships; what was sent, and the word ranges worth damaging."""
    sent, heaps = set(), {}

    async def run():
        layer = IPCChannelLayer(prefix=prefix, **CONFIG)
        for n in range(12):
            channel = CHANNELS[n % len(CHANNELS)]
            await layer.send(channel, {"ch": channel, "i": n, "pad": "p" * (n * 13)})
            sent.add((channel, n))
        for group, members in (("fg.x", CHANNELS[:2]), ("fg.y", CHANNELS[1:])):
            for channel in members:
                await layer.group_add(group, channel)
            # Stored once for all members: payload blocks and the nodes that reference them.
            await layer.group_send(group, {"ch": "*", "g": group, "pad": "q" * 200})
        store = layer.engine()
        report = store.inspect()
        assert report["problems"] == []
        g = store.geometry
        used_messages = report["channel_memory"]["used"] // 8 + 64
        used_groups = report["group_memory"]["used"] // 8 + 64
        await layer.close()
        heaps["channel"] = (g.message_heap, g.message_heap_end)
        heaps["group"] = (g.group_heap, g.group_heap_end)
        return {
            "header": (0, H_READY),
            "live header": (H_READY, H_READY + 16),
            "heap metadata": (g.message_heap_meta, g.slots),
            "process slots": (g.slots, g.slots + 64),
            "channel index": (g.channel_index, g.message_heap),
            "channel memory": (g.message_heap, g.message_heap + used_messages),
            "group indexes": (g.group_index, g.group_heap),
            "group memory": (g.group_heap, g.group_heap + used_groups),
        }

    areas = asyncio.run(run())
    areas["heaps"] = heaps
    return sent, areas


def used_blocks(words, start: int, end: int) -> list[int]:
    """Where the used blocks of the heap in words [start, end) start (a block's first word is
    its size in words << 2, bit 0 set when it is in use)."""
    blocks, at = [], start
    while at < end - 1:
        size = words[at] >> 2
        if size < 4:
            break
        if words[at] & 1:
            blocks.append(at)
        at += size
    return blocks


def damage(prefix: str, start: int, end: int, kind: str, rng: random.Random, heap=None) -> str:
    """Damage words [start, end) of the object; describe what was done.

    ``bytes`` writes a random span, ``words`` a few implausible words, ``links`` points a few
    words of records (or index buckets) at other records of ``heap``: cross links and cycles,
    which random values hardly ever make."""
    with open(shm_path(prefix), "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        words = memoryview(mm).cast("Q")
        try:
            total = len(words)
            if kind == "links":
                blocks = used_blocks(words, *heap)
                done = []
                for _ in range(rng.randint(1, 3)):
                    if start == heap[0]:
                        at = rng.choice(blocks) + rng.randint(1, 7)
                    else:
                        at = rng.randrange(start, end)
                    words[at] = rng.choice(blocks) + rng.choice([0, 0, 0, 1, -1])
                    done.append(f"word {at} -> {words[at]}")
                return ", ".join(done)
            if kind == "bytes":
                offset = rng.randrange(start * 8, end * 8)
                length = rng.randint(1, min(256, total * 8 - offset))
                mm[offset:offset + length] = rng.randbytes(length)
                return f"{length} random bytes at byte {offset}"
            done = []
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(start, end)
                value = rng.choice([
                    0,
                    rng.getrandbits(64),
                    rng.randrange(64),
                    rng.randrange(1, total),  # a pointer to anywhere
                    rng.randrange(max(1, start - 512), min(total, end + 512)),  # close by
                    (words[at] + rng.choice([-1, 1, 8])) % 2**64,
                ])
                words[at] = value
                done.append(f"word {at} = {value}")
            return ", ".join(done)
        finally:
            words.release()


def run_session(prefix: str, harm) -> tuple[list, list]:
    """Run ``workers.fuzz_session`` in a child, damaging the store with ``harm()`` once it is
    attached; fail on a hang or a crash."""
    child, parent_end = workers.start_piped(
        workers.fuzz_session, prefix, CONFIG, CHANNELS, GROUPS
    )
    try:
        assert parent_end.poll(30), "the child did not attach"
        assert parent_end.recv() == "attached"
        what = harm()
        parent_end.send("go")
        if not parent_end.poll(CASE_DEADLINE):
            pytest.fail(f"hang after {what}: no report within {CASE_DEADLINE} s")
        events, received = parent_end.recv()
        child.join(10)
        assert child.exitcode == 0, f"the child died ({child.exitcode}) after {what}"
        return what, events, received
    except EOFError:
        child.join(10)
        pytest.fail(f"the child died (exit code {child.exitcode}) before reporting")
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)


def check(what: str, events: list, received: list, sent: set) -> None:
    flushed = False
    for name, outcome, seconds, detail in events:
        where = f"{name} after {what}"
        assert seconds < OPERATION_BOUND, f"{where} took {seconds:.1f} s"
        if name.startswith("receive"):
            assert outcome in ALLOWED | {"TimeoutError"}, f"{where}: {outcome} {detail}"
        elif name == "send not-a-dict":
            assert outcome == "TypeError", f"{where}: {outcome} {detail}"
        elif name == "verify":
            if flushed:
                # Flush rewrote every area verify walks: nothing damaged is left there.
                assert outcome in ("ok", "StoreCorrupted"), f"{where}: {outcome} {detail}"
            else:
                assert outcome in ALLOWED | {"problems"}, f"{where}: {outcome} {detail}"
        else:
            assert outcome in ALLOWED, f"{where}: {outcome} {detail}"
        flushed = flushed or (name == "flush" and outcome == "ok")
    for channel, message in received:
        # Whether damaged links can hand a message to another channel than its own is
        # test_a_damaged_link_never_hands_a_message_to_another_channel's business.
        if "i" in message:
            legit = (message["ch"], message["i"]) in sent
        elif "new" in message:
            legit = message["ch"] in CHANNELS
        else:
            legit = message.get("ch") == "*" and message.get("g") in GROUPS
        assert legit, f"{channel} handed out {message!r}, never sent, after {what}"


AREAS = ["header", "live header", "heap metadata", "process slots", "channel index",
         "channel memory", "group indexes", "group memory"]


LINKED = {"channel index": "channel", "channel memory": "channel",
          "group indexes": "group", "group memory": "group"}
CASES = [(area, kind) for area in AREAS for kind in ("bytes", "words")] + [
    (area, "links") for area in LINKED
]


@pytest.mark.parametrize(("area", "kind"), CASES)
def test_damaged_store_never_hangs_crashes_or_invents_messages(prefix, area, kind):
    for n in range(ROUNDS):
        rng = random.Random(f"{area}/{kind}/{SEED + n}")
        asgi_ipc.unlink(prefix)
        sent, areas = populate(prefix)
        start, end = areas[area]
        heap = areas["heaps"].get(LINKED.get(area))

        def harm(start=start, end=end, heap=heap, rng=rng):
            return f"{area}: " + damage(prefix, start, end, kind, rng, heap)

        what, events, received = run_session(prefix, harm)
        check(f"{what} (seed {SEED + n})", events, received, sent)


def test_an_open_undo_journal_full_of_garbage_is_refused_or_undone(prefix):
    """What a holder that died with a corrupt journal leaves: the next holder must not hang or
    write outside the store."""
    for n in range(ROUNDS * 2):
        rng = random.Random(f"journal/{SEED + n}")
        asgi_ipc.unlink(prefix)
        sent, _areas = populate(prefix)
        g = Geometry.for_sizes(CONFIG["channel_memory"], CONFIG["group_memory"])

        def harm(rng=rng, g=g):
            count = rng.choice([1, 7, 300, JOURNAL_ENTRIES, JOURNAL_ENTRIES + 1, 2**63])
            with open(shm_path(prefix), "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
                words = memoryview(mm).cast("Q")
                for k in range(min(count, 300)):
                    words[g.journal + 2 * k] = rng.choice(
                        [rng.randrange(len(words)), rng.getrandbits(64), H_JOURNAL_COUNT, 0]
                    )
                    words[g.journal + 2 * k + 1] = rng.getrandbits(64)
                words[H_JOURNAL_COUNT] = count
                words.release()
            return f"journal of {count} garbage entries"

        what, events, received = run_session(prefix, harm)
        check(f"{what} (seed {SEED + n})", events, received, sent)


# --- damage that random bytes hardly ever make ---------------------------------------------


def _attempt_in_child(prefix: str, ops: list, deadline: float = 20) -> list:
    """Outcomes of ``workers.attempt_ops``; an operation still running at the deadline is
    reported as ``hang`` (and its process killed)."""
    child, parent_end = workers.start_piped(workers.attempt_ops, prefix, CONFIG, ops)
    outcomes = []
    try:
        for method, _args in ops:
            if not parent_end.poll(deadline):
                outcomes.append((method, "hang", f"still running after {deadline} s"))
                break
            outcomes.append(parent_end.recv())
        return outcomes
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)


def _words_of(prefix: str):
    f = open(shm_path(prefix), "r+b")
    mm = mmap.mmap(f.fileno(), 0)
    f.close()
    return mm, memoryview(mm).cast("Q")


def test_a_damaged_link_never_hands_a_message_to_another_channel(prefix):
    from asgi_ipc.engine.queues import C_HEAD, M_NEXT

    populate(prefix)
    store = IPCChannelLayer(prefix=prefix, **CONFIG).engine()
    heads = store.locked(lambda: {
        c: store.words[store.queues.find(c.encode(), store.queues.hash.of(c.encode())) + C_HEAD]
        for c in ("f.a", "f.c")
    })
    store.close()
    mm, words = _words_of(prefix)
    words[heads["f.a"] + M_NEXT] = heads["f.c"]  # f.a's first message now leads into f.c
    words.release()
    mm.close()
    outcomes = _attempt_in_child(prefix, [("receive", ("f.a",))] * 2)
    for method, outcome, result in outcomes:
        assert outcome in ("ok", "StoreCorrupted"), (method, outcome, result)
        if outcome == "ok":
            assert result["ch"] == "f.a", f"f.a handed out {result}"


@pytest.mark.parametrize("method", ["group_send", "verify"])
def test_a_member_list_that_loops_is_refused_not_walked_forever(prefix, method):
    from asgi_ipc.engine.groups import B_LIST_NEXT, G_FIRST, G_LAST, G_MEMBERS
    from asgi_ipc.engine.layout import H_MEMBERSHIPS

    populate(prefix)
    store = IPCChannelLayer(prefix=prefix, **CONFIG).engine()
    rec = store.locked(lambda: store.groups.find(b"fg.y"))
    store.close()
    mm, words = _words_of(prefix)
    words[words[rec + G_LAST] + B_LIST_NEXT] = words[rec + G_FIRST]
    words[rec + G_MEMBERS] = words[H_MEMBERSHIPS] = 2**40
    words.release()
    mm.close()
    args = ("fg.y", {"ch": "*", "g": "fg.y"}) if method == "group_send" else ()
    [(_method, outcome, detail)] = _attempt_in_child(prefix, [(method, args)], deadline=5)
    assert outcome in ("StoreCorrupted", "problems"), (outcome, detail)


# --- objects that are not stores -----------------------------------------------------------


def _open_in_child(prefix: str):
    child, parent_end = workers.start_piped(workers.open_and_use, prefix, CONFIG)
    try:
        assert parent_end.poll(30), "attaching hangs"
        result = parent_end.recv()
        child.join(10)
        assert child.exitcode == 0
        return result
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)


def _valid_store(prefix: str) -> bytes:
    asyncio.run(_send_one(prefix))
    with open(shm_path(prefix), "rb") as f:
        return f.read()


async def _send_one(prefix: str) -> None:
    layer = IPCChannelLayer(prefix=prefix, **CONFIG)
    await layer.send("kept", {"a": 1})
    await layer.close()


def _other_version(prefix: str) -> bytes:
    data = bytearray(_valid_store(prefix))
    data[H_VERSION * 8:H_VERSION * 8 + 8] = (7).to_bytes(8, "little")
    return bytes(data)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


FOREIGN = {
    "random bytes": lambda prefix: os.urandom(3 * 4096),
    "too short": lambda prefix: os.urandom(100),
    "one page of ones": lambda prefix: b"\xff" * 4096,
    "odd size": lambda prefix: os.urandom(4096 + 3),
    "other layout version": _other_version,
    "truncated to half": lambda prefix: _half(_valid_store(prefix)),
    "truncated to 100 bytes": lambda prefix: _valid_store(prefix)[:100],
    "truncated to one page": lambda prefix: _valid_store(prefix)[:4096],
}


@pytest.mark.parametrize("content", list(FOREIGN))
def test_a_foreign_object_is_refused_naming_the_prefix_and_the_fix(prefix, content):
    data = FOREIGN[content](prefix)
    write_object(prefix, data)
    outcome, message, _problems = _open_in_child(prefix)
    assert outcome == "StoreCorrupted", (outcome, message)
    assert prefix in message and f"asgi-ipc unlink --prefix {prefix}" in message, message
    with open(shm_path(prefix), "rb") as f:
        assert f.read() == data, "the foreign object was changed"


def test_an_empty_object_is_initialised(prefix):
    write_object(prefix, b"")
    outcome, message, problems = _open_in_child(prefix)
    assert (outcome, message, problems) == ("ok", {"n": 1}, [])
