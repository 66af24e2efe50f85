"""A batch's output and error files: lines appended durably as requests finish, and what a resume reads back.

Each line is one `write` of one whole line on an O_APPEND descriptor, then fsync: after kill -9 a file holds every
line written before, and at most a torn last line, which `recover` cuts off (that request runs again). Which input
lines are done is a bitmap (one bit per line), read back from the output lines' ids (records.line_of), so a
100,000-line batch keeps 12.5 KB for it, not a set of custom_ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .records import line_of


class Appender:
    """Appends JSON lines to one file; `append_many` writes a group with one fsync (the expired lines)."""

    def __init__(self, path: Path, fsync: bool = True):
        self.path, self.fsync = path, fsync
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, entry: dict) -> None:
        self.append_many([entry])

    def append_many(self, entries: Iterable[dict]) -> None:
        data = "".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False) + "\n" for e in entries).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        if self.fsync:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LineSet:
    """Input line numbers (1-based) as a growable bitmap."""

    def __init__(self):
        self.bits = bytearray()

    def add(self, n: int) -> None:
        byte = n >> 3
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits) + 1024))
        self.bits[byte] |= 1 << (n & 7)

    def __contains__(self, n: int) -> bool:
        byte = n >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << (n & 7)))


def recover(path: Path, done: LineSet) -> int:
    """Cut a torn last line off `path` (a crash mid-append), mark the input line of every whole line in `done`;
    the number of whole lines. Reads one line at a time."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    with open(path, "rb+") as f:
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # find the last newline, reading backwards a block at a time
                end = size
                while end > 0:
                    start = max(0, end - 65536)
                    f.seek(start)
                    block = f.read(end - start)
                    k = block.rfind(b"\n")
                    if k >= 0:
                        end = start + k + 1
                        break
                    end = start
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        f.seek(0)
        lines = 0
        for raw in f:
            try:
                n = line_of(json.loads(raw).get("id"))
            except (ValueError, AttributeError):
                continue
            if n is not None and n not in done:
                done.add(n)
                lines += 1
        return lines
