"""The compiled engine and the pure-Python one: which runs, how to force the pure one, and a
process of each sharing one store at the same time."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import asgi_ipc
from asgi_ipc.engine import Engine, open_engine
from asgi_ipc.engine.compiled import MODULES

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "engine_worker.py")
COUNT = 300


def _env(pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ASGI_IPC_PURE_PYTHON"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if pure:
        env["ASGI_IPC_PURE_PYTHON"] = "1"
    return env


def _engine_of(env: dict) -> list[str]:
    code = (
        "import asgi_ipc, importlib\n"
        "print(asgi_ipc.ENGINE)\n"
        f"for m in {MODULES!r}: print(importlib.import_module('asgi_ipc.engine.' + m).__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.split()


def test_the_engine_attribute_says_which_modules_run():
    modules = [sys.modules[f"asgi_ipc.engine.{m}"] for m in MODULES]
    assert asgi_ipc.ENGINE in ("compiled", "python")
    assert [m.__file__.endswith(".py") for m in modules] == [asgi_ipc.ENGINE == "python"] * len(
        MODULES
    )


def test_the_environment_variable_forces_the_pure_engine():
    engine, *files = _engine_of(_env(pure=True))
    assert engine == "python"
    assert [os.path.basename(f) for f in files] == [f"{m}.py" for m in MODULES]


needs_compiled = pytest.mark.skipif(
    _engine_of(_env(pure=False))[0] != "compiled",
    reason="the compiled engine is not built here (python setup.py build_ext --inplace)",
)


@needs_compiled
def test_a_compiled_and_a_pure_process_share_one_store(prefix):
    names = {"a": True, "b": False}  # a runs the pure engine, b the compiled one
    procs = {
        me: subprocess.Popen(
            [sys.executable, WORKER, prefix, me, "b" if me == "a" else "a", str(COUNT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(pure),
        )
        for me, pure in names.items()
    }
    try:
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs.values():
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = {me: json.loads(proc.communicate(timeout=180)[0]) for me, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    assert results["a"]["engine"] == "python" and results["a"]["journal"].endswith(".py")
    assert results["b"]["engine"] == "compiled" and not results["b"]["journal"].endswith(".py")
    in_order = list(range(COUNT))
    for me, peer in (("a", "b"), ("b", "a")):
        assert results[me]["got"] == {peer: in_order, f"{peer}.g": in_order, f"{me}.g": in_order}
    store = open_engine(prefix)
    try:
        figures = store.inspect()
    finally:
        store.close()
    assert figures["problems"] == []
    assert figures["messages"] == 0
    counters = figures["counters"]
    assert (counters["sent"], counters["group_sends"], counters["delivered"]) == (
        2 * COUNT, 2 * COUNT, 4 * COUNT
    )
    assert counters["received"] == 6 * COUNT


@pytest.mark.parametrize("pure", [True, False])
def test_stats_prints_the_engine_it_runs(prefix, pure):
    env = _env(pure)
    engine = _engine_of(env)[0]
    layer = asgi_ipc.IPCChannelLayer(prefix=prefix)
    layer.engine()
    try:
        stats = [
            subprocess.run([sys.executable, "-m", "asgi_ipc", "stats", "--prefix", prefix, *json],
                           env=env, capture_output=True, text=True, check=True, timeout=60).stdout
            for json in ([], ["--json"])
        ]
    finally:
        asyncio.run(layer.close())
    assert f"engine           {engine} " in stats[0]
    assert json.loads(stats[1])["engine"] == engine


def _corruptions(store: Engine) -> dict[str, list[tuple[int, int]]]:
    """Words to overwrite, (index, value), each set a way to damage the store of
    ``_filled_store``: huge words where links are, counts that lie, a journal that points
    outside the store."""
    from asgi_ipc.engine.layout import H_EXPIRY_HEAD, H_JOURNAL_COUNT
    from asgi_ipc.engine.queues import C_COUNT, C_HEAD, C_TAIL, M_LENGTH, M_NEXT

    def rec(name: bytes) -> int:
        return store.queues.find(name, store.queues.hash.of(name))

    one, two = rec(b"c.one"), rec(b"c.two")
    head = store.words[one + C_HEAD]
    top = (1 << 64) - 1
    return {
        "head past the end": [(one + C_HEAD, top)],
        "head that wraps round": [(one + C_HEAD, top - M_NEXT + 1)],
        "head at the top half": [(one + C_HEAD, 1 << 63)],
        "count of zero": [(one + C_COUNT, 0)],
        "count of the top": [(two + C_COUNT, top)],
        "tail past the end": [(two + C_TAIL, top - 3)],
        "next that wraps round": [(head + M_NEXT, top)],
        "length past the end": [(head + M_LENGTH, top)],
        "block header of the top": [(head, top)],
        "oldest message past the end": [(H_EXPIRY_HEAD, top)],
        "journal entry outside": [(H_JOURNAL_COUNT, 1), (store.geometry.journal, top)],
        "journal count past its room": [(H_JOURNAL_COUNT, top)],
    }


@needs_compiled
def test_both_engines_meet_a_corrupt_store_alike(prefix):
    """The same damage, met by a pure-Python process and by a compiled one, gives the same
    outcome of every operation and the same findings of verify."""
    from asgi_ipc.engine.layout import store_path

    config = {"channel_memory": 1 << 20, "group_memory": 1 << 20}
    layer = asgi_ipc.IPCChannelLayer(prefix=prefix, **config)
    run = asyncio.new_event_loop().run_until_complete
    for channel in ("c.one", "c.two", "c.three"):
        run(layer.group_add("g", channel))
        for n in range(3):
            run(layer.send(channel, {"n": n}))
    store = layer.engine()
    corruptions = store.locked(_corruptions, store)
    run(layer.close())
    with open(store_path(prefix), "rb") as f:
        pristine = f.read()
    seen = {}
    for what, writes in corruptions.items():
        for pure in (True, False):
            with open(store_path(prefix), "r+b") as f:
                f.write(pristine)
                for index, value in writes:
                    f.seek(index * 8)
                    f.write(value.to_bytes(8, "little"))
            out = subprocess.run(
                [sys.executable, str(ROOT / "tests" / "corrupt_worker.py"), prefix],
                env=_env(pure), capture_output=True, text=True, timeout=120,
            )
            assert out.returncode == 0, f"{what}: {out.stderr}"
            seen[pure] = json.loads(out.stdout.splitlines()[-1])
        assert (seen[True]["engine"], seen[False]["engine"]) == ("python", "compiled")
        assert seen[False]["results"] == seen[True]["results"], what
        assert seen[False]["verify"] == seen[True]["verify"], what


_DAMAGED_OWNER = """
import asyncio, json, logging, sys
import asgi_ipc
from asgi_ipc.engine.queues import X_OWNER

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


async def run(prefix):
    layer = asgi_ipc.IPCChannelLayer(prefix=prefix)
    name = (await layer.new_channel()).encode()
    store = layer.engine()
    queues = store.queues

    def damage():
        part = queues.owner_part(queues.find(name, queues.hash.of(name)))
        store.words[part + X_OWNER] = 1 << 40  # slot bits 0, not fresh

    store.locked(damage)
    await layer.close()  # reaps its own channel, through the damaged owner word
    engine = asgi_ipc.engine.open_engine(prefix)
    try:
        problems = engine.verify()
    finally:
        engine.close()
    return {"engine": asgi_ipc.ENGINE, "problems": problems}

print(json.dumps(asyncio.run(run(sys.argv[1]))))
"""


@needs_compiled
def test_both_engines_meet_a_damaged_owner_word_alike(prefix):
    """An owner word whose slot bits are 0 (only damage makes one): reaping the channel through
    it stops at StoreCorrupted in both engines, where the pure-Python one used to take slot -1
    and go on (and could write before the slot table), and leaves the same store behind."""
    seen = {}
    for pure in (True, False):
        store_prefix = f"{prefix}{int(pure)}"
        try:
            out = subprocess.run(
                [sys.executable, "-c", _DAMAGED_OWNER, store_prefix],
                env=_env(pure), capture_output=True, text=True, timeout=120,
            )
        finally:
            asgi_ipc.unlink(store_prefix)
        assert out.returncode == 0, out.stderr
        assert "StoreCorrupted" in out.stderr and "names no process slot" in out.stderr
        seen[pure] = json.loads(out.stdout.splitlines()[-1])
    assert (seen[True]["engine"], seen[False]["engine"]) == ("python", "compiled")
    assert seen[True]["problems"] == seen[False]["problems"]
    assert seen[True]["problems"]
