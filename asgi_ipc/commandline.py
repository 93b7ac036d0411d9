"""What the ``asgi-ipc`` commands share (cli.py, observe.py, bench/command.py): argument types
that keep every number a command takes within a range that makes sense, refused the way
argparse refuses (exit status 2, "argument --processes: expected ..."), and sizes in binary
units and plain tables, as every command shows them."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

N = TypeVar("N", int, float)


def bounded(kind: type[N], low: N, high: N, what: str = "") -> Callable[[str], N]:
    """An argparse type: a ``kind`` from ``low`` to ``high``, both included. NaN, infinities
    and anything outside the range are refused. ``what`` names it ("a TCP port"); by default
    "a whole number" or "a number"."""
    what = what or ("a whole number" if kind is int else "a number")
    refusal = f"expected {what} from {low:g} to {high:g}" if kind is float else (
        f"expected {what} from {low} to {high}")

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{refusal}, not {text!r}")
        return value

    return parse


def address(text: str) -> str:
    """An argparse type: a host name or address this machine can listen on."""
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise argparse.ArgumentTypeError(
            f"not an address to listen on: {text!r} ({exc})") from None
    return text


def columns(rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """``rows`` as lines of columns two spaces apart: the first ``left`` columns aligned left,
    the others right, except the last, which is never padded (names, however long)."""
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) if i < left else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row[:-1], widths, strict=False))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


def size(nbytes: float) -> str:
    """``nbytes`` in B, KiB, MiB, GiB or TiB, with one decimal beyond bytes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if round(nbytes, 1) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
