"""The compiled engine's extension modules; everything else is in pyproject.toml.

Each module of ``asgi_ipc.engine.compiled.MODULES`` is compiled by Cython from its own .py
file, typed by the .pxd beside it. Where that fails (no C compiler, no Python headers, no
Cython) the package installs without them and runs the pure-Python engine: the build says why
on stderr, which pip shows only with -v, so it also leaves the reason in the package, in
``asgi_ipc/engine/build-failed.txt``, for the package to say at run time (engine/compiled.py).

A build compiles the modules in parallel, without debug information (nobody debugs the
generated C, and -g doubled the compile time), and an editable install (``pip install -e .``,
whose build directory is new each time) compiles only the modules whose C source is newer than
the extension already beside it.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# asgi_ipc.engine.compiled.MODULES (not imported: the package is not importable at build time).
MODULES = ("clock", "journal", "heap", "index", "queues", "groups", "lent")
# asgi_ipc.engine.compiled.BUILD_FAILED, relative to the package.
BUILD_FAILED = os.path.join("asgi_ipc", "engine", "build-failed.txt")
HERE = os.path.dirname(os.path.abspath(__file__))

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

# Why the compiled engine, or part of it, was not built: one line each.
failures = []


def _skip(exc):
    failures.append(f"{type(exc).__name__}: {exc}".replace("\n", " ").rstrip("."))
    print(
        f"asgi_ipc: the compiled engine was not built ({failures[-1]}); "
        "the pure-Python engine will be used",
        file=sys.stderr,
    )


def _record_failures(root):
    """Write the failures into the package under ``root``, or remove a record left there."""
    path = os.path.join(root, BUILD_FAILED)
    if failures:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as record:
            record.write("\n".join(failures) + "\n")
    elif os.path.exists(path):
        os.remove(path)


class RecordingBuildPy(build_py):
    """Leave the record of a Cython that could not run in the package (without extensions,
    build_ext does not run)."""

    def run(self):
        super().run()
        _record_failures(HERE if self.editable_mode else self.build_lib)


class OptionalBuildExt(build_ext):
    """Build the extensions if this machine can; otherwise say so and install without them."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self):
        inplace = self.inplace  # build_ext.run clears it while it builds
        try:
            super().run()
        except Exception as exc:
            _skip(exc)
        _record_failures(HERE if inplace else self.build_lib)

    def build_extension(self, ext):
        if self.editable_mode and self._reuse(ext):
            return
        try:
            super().build_extension(ext)
        except Exception as exc:
            _skip(exc)

    def _reuse(self, ext):
        """Copy the extension already beside the sources into the build directory if it is
        newer than what it is compiled from, its .py and every .pxd of the engine (any of
        them may be cimported): True if so. Not the C source, which Cython may write again
        unchanged (it did, measured, in a copy of a fresh checkout, where every file has the
        same time), and whose time then says nothing."""
        built = os.path.join(HERE, self.get_ext_filename(ext.name))
        module = os.path.join(HERE, *ext.name.split(".")) + ".py"
        engine = os.path.dirname(module)
        sources = [module, *(os.path.join(engine, name) for name in os.listdir(engine)
                             if name.endswith(".pxd"))]
        if not os.path.exists(built) or any(
            os.path.getmtime(source) >= os.path.getmtime(built) for source in sources
        ):
            return False
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(built, target)
        return True


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError as exc:
        _skip(exc)
        return []
    from setuptools import Extension

    modules = [
        Extension(f"asgi_ipc.engine.{name}", [f"asgi_ipc/engine/{name}.py"],
                  extra_compile_args=["-O2", "-g0"])
        for name in MODULES
    ]
    try:
        built = cythonize(modules, compiler_directives=DIRECTIVES, quiet=True,
                          nthreads=os.cpu_count() or 1)
    except Exception as exc:
        _skip(exc)
        return []
    for extension in built:
        # So an in-place build does not try to copy one that failed into the sources.
        extension.optional = True
    return built


setup(ext_modules=extensions(),
      cmdclass={"build_py": RecordingBuildPy, "build_ext": OptionalBuildExt})
