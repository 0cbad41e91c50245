"""Following a running job's log.txt and metrics.jsonl as they grow.

The supervisor pumps both tailers on every turn of its loop and once more after
the job process exited, so everything the job wrote reaches its callbacks.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

LOG_CHUNK = 64 * 1024
# Per pump at most this much is forwarded, so a chatty job cannot starve the
# supervisor's heartbeats and cancel checks; the rest follows on the next pumps.
BYTES_PER_PUMP = 16 * LOG_CHUNK
# A partial line (no newline yet, e.g. a progress bar) is held back this long
# before it is forwarded anyway, so the live log does not look frozen.
PARTIAL_LINE_HOLD_S = 1.0


def utf8_safe_cut(data: bytes) -> int:
    """Largest n <= len(data) such that data[:n] does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)  # ASCII: complete
        if byte >= 0xC0:  # a lead byte: complete only if its whole sequence is there
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # not valid UTF-8 anyway; decoding with "replace" copes


class LogTailer:
    """Forward new bytes of a log file as ``on_log(byte offset, text)`` chunks of
    at most LOG_CHUNK bytes.

    A chunk ends on a line break (\\n or \\r, so progress bars count) whenever it
    contains one; a trailing partial line is held back until it completes, the
    job ends (``pump(final=True)``) or it has waited ``partial_line_hold_s``.
    """

    def __init__(self, path: Path, on_log: Callable[[int, str], None],
                 partial_line_hold_s: float = PARTIAL_LINE_HOLD_S) -> None:
        self.path = path
        self.on_log = on_log
        self.partial_line_hold_s = partial_line_hold_s
        self.offset = 0
        self._fh: BinaryIO | None = None
        self._partial_since: float | None = None

    def pump(self, *, final: bool) -> None:
        budget = None if final else BYTES_PER_PUMP
        while budget is None or budget > 0:
            data = self._read(LOG_CHUNK)
            if not data:
                return
            cut = self._cut(data, final)
            if cut == 0:
                return
            self.on_log(self.offset, data[:cut].decode("utf-8", errors="replace"))
            self.offset += cut
            self._partial_since = None
            if budget is not None:
                budget -= cut

    def _cut(self, data: bytes, final: bool) -> int:
        """How many bytes of ``data`` (read at self.offset) to forward now."""
        full = len(data) == LOG_CHUNK
        if final and not full:
            return len(data)  # the job is over: the rest goes out as it is
        last_break = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if last_break >= 0:
            return last_break + 1
        if full:
            # LOG_CHUNK bytes without a line break: split anyway, but not inside a character.
            return utf8_safe_cut(data) or len(data)
        now = time.monotonic()
        if self._partial_since is None:
            self._partial_since = now
        if now - self._partial_since >= self.partial_line_hold_s:
            return utf8_safe_cut(data)
        return 0

    def _read(self, size: int) -> bytes:
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")
            except FileNotFoundError:
                return b""
        self._fh.seek(self.offset)
        return self._fh.read(size)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class MetricsTailer:
    """Forward each complete JSON-object line of a metrics file to ``on_metric``.

    An incomplete trailing line waits for its newline; a line that is not a JSON
    object is skipped and counted (a metric must never fail the job).
    """

    def __init__(self, path: Path, on_metric: Callable[[dict], None]) -> None:
        self.path = path
        self.on_metric = on_metric
        self.offset = 0
        self.skipped = 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(BYTES_PER_PUMP)
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if end == 0:
            return
        self.offset += end
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.skipped += 1
                continue
            if isinstance(record, dict):
                self.on_metric(record)
            else:
                self.skipped += 1
