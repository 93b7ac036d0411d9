"""The compiled engine's extension modules; everything else is in pyproject.toml.

Each module of ``asgi_ipc.engine.compiled.MODULES`` is compiled by Cython from its own .py
file, typed by the .pxd beside it. Where that fails (no C compiler, no Python headers, no
Cython) the package installs without them and runs the pure-Python engine: ``build_ext``
reports why and goes on.
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# asgi_ipc.engine.compiled.MODULES (not imported: the package is not importable at build time).
MODULES = ("journal", "heap", "index", "queues", "groups")

DIRECTIVES = {
    "language_level": 3,
    # Corrupt segments must fail as they do in pure Python: every index checked against the
    # view, a negative Python index read as Python reads it (lists and views alike), and an
    # overflow of a typed integer raised rather than wrapped. Words read from the store are
    # unsigned, so a huge word never turns into a negative index.
    "boundscheck": True,
    "wraparound": True,
    "overflowcheck": True,
    "cdivision": False,
    "initializedcheck": True,
    # The .py annotations are for readers and type checkers; the .pxd files give the C types.
    "annotation_typing": False,
}


class OptionalBuildExt(build_ext):
    """Build the extensions if this machine can; otherwise say so and install without them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc):
        print(
            f"asgi_ipc: the compiled engine was not built ({type(exc).__name__}: {exc}); "
            "the pure-Python engine will be used",
            file=sys.stderr,
        )


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError as exc:
        OptionalBuildExt._skip(exc)
        return []
    from setuptools import Extension

    modules = [
        Extension(f"asgi_ipc.engine.{name}", [f"asgi_ipc/engine/{name}.py"],
                  extra_compile_args=["-O2"])
        for name in MODULES
    ]
    try:
        return cythonize(modules, compiler_directives=DIRECTIVES, quiet=True)
    except Exception as exc:
        OptionalBuildExt._skip(exc)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
