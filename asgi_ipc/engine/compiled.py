"""Which implementation of the engine this process runs: compiled, or the pure-Python reference.

The compiled engine is the engine's own .py files compiled by Cython in pure-Python mode, typed
by the .pxd files beside them: ``journal.py`` and ``journal.pxd`` build the extension module
``asgi_ipc.engine.journal`` (``journal.cpython-*.so``), which lies beside ``journal.py`` under
the same name. Python's path finder tries extension modules before source files, so an
installed build is used with nothing to configure, and the .py files stay the one source of
both.

The pure-Python engine is used instead, by a finder placed first on ``sys.meta_path`` that loads
these modules from their .py files, when the environment variable ``ASGI_IPC_PURE_PYTHON`` is
set (to anything but "" or "0"), or when any of them has no extension beside it: a partial build
never mixes the two, since the compiled modules reach each other's classes directly. Nothing
else differs: both read and write the same layout under the same journal protocol, so a process
running one and a process running the other share a store at the same time.

What is compiled is the work under the lock that touches the store's words: the journal, the
allocator, the one chained index, the channel queues and the groups; and, outside the lock, the
book of messages lent to this process, which nearly every receive of a group's member reads
(lent.py), and the clock that every hold reads (clock.py). The .pxd files type the classes'
attributes (the word view above all) and their methods, and leave the locals Python integers,
so every word read from a store, however corrupt, is compared and added as in Python.
Corrupt stores are met as the pure-Python engine meets them (tests/test_compiled.py compares the
two on the same damage): every index into the view is bounds-checked, a negative Python index is
read as Python reads it, and an overflow of a typed integer raises (setup.py's directives). A
word of 2**63 or more used as an index raises OverflowError where Python raises IndexError; the
engine turns both into the same StoreCorrupted.

What it buys, measured with 20 000 in-process send+receive pairs through the layer on two busy
cores: the queue work of a pair (append and pop in one hold) from 10.6-11.7 to 4.4 us, the
whole pair from 26.6 to 20.2 us (InMemoryChannelLayer: 6.3 us); a group_send to 1000 members
delivers 1.3-3x as fast (3.8-4.1x channels_redis, against 2.0-2.5x). The rest of a pair is
outside these modules: two lock holds (5 us, 2.8 of them the flock calls), the layer's and the
receiver's Python and asyncio (6-8 us).
Compiling the lock hold itself (``one_hold``) bought nothing measurable, so it stays Python.

Crash tests stop the compiled engine at each journaled write as they stop the pure one, through
``Journal.hook`` (``Engine.inject``), which the compiled ``set`` tests like the pure one.

A build that could not compile them (no C compiler, no Python headers) still installs, with the
pure-Python engine, and says why only in pip's verbose output; it leaves the reason in the
package, in ``BUILD_FAILED`` (setup.py). A process that runs the pure-Python engine for want of
the compiled one while that record is there says so once, at the first store it opens
(``warn_if_not_built``), on the ``asgi_ipc`` logger; ``asgi-ipc stats`` says it too. Not when
``ASGI_IPC_PURE_PYTHON`` chose the pure-Python engine, nor in a checkout where nobody built it.

This module must be imported before any of ``MODULES``, which ``asgi_ipc/engine/__init__.py``
does first.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys

# The modules built as extensions (see setup.py), in the order they import each other.
MODULES = ("clock", "journal", "heap", "index", "queues", "groups", "lent")

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = __name__.rpartition(".")[0]


def built() -> bool:
    """Whether every module of ``MODULES`` has its extension beside it."""
    return all(_extension(module) for module in MODULES)


def _extension(module: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, module + suffix)
        if os.path.isfile(path):
            return path
    return None


class _PureFinder:
    """Finds the engine's modules as their .py source, never as their extension."""

    names = frozenset(f"{_PACKAGE}.{module}" for module in MODULES)

    @classmethod
    def find_spec(
        cls, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in cls.names:
            return None
        source = os.path.join(_HERE, fullname.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_file_location(fullname, source)


#: Whether ``ASGI_IPC_PURE_PYTHON`` chose the pure-Python engine.
FORCED = os.environ.get("ASGI_IPC_PURE_PYTHON", "") not in ("", "0")


def _choose() -> str:
    if not FORCED and built():
        return "compiled"
    if not any(isinstance(f, type) and f.__name__ == "_PureFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _PureFinder)
    return "python"


#: "compiled" or "python": the engine this process runs (also ``asgi_ipc.ENGINE``).
ENGINE = _choose()

#: Where the build leaves why it could not compile the engine (setup.py writes it).
BUILD_FAILED = os.path.join(_HERE, "build-failed.txt")


def _build_failure() -> str | None:
    if ENGINE == "compiled" or FORCED:
        return None
    try:
        with open(BUILD_FAILED) as record:
            return record.readline().strip() or "no reason recorded"
    except OSError:
        return None


#: Why this installation, built to run the compiled engine, runs the pure-Python one: the
#: first failure its build recorded; None when it runs what it was meant to.
NOT_BUILT = _build_failure()
_warned = False


def warn_if_not_built() -> None:
    """Log ``NOT_BUILT``, once per process."""
    global _warned
    if NOT_BUILT is None or _warned:
        return
    _warned = True
    logging.getLogger("asgi_ipc").warning(
        "asgi_ipc runs its pure-Python engine, which works the same but slower: the compiled "
        "engine failed to build when asgi_ipc was installed (%s; all of it in %s). Install a C "
        "compiler and the Python headers (apt-get install gcc python3-dev) and install asgi_ipc "
        "again, or set ASGI_IPC_PURE_PYTHON=1 to choose the pure-Python engine",
        NOT_BUILT, BUILD_FAILED,
    )
