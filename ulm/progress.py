"""Progress reports for long work: a tqdm bar on a terminal, plain log lines anywhere else.

A bar redraws itself with '\\r' several times a second; written to a file (systemd, docker, `make serve > log`)
every redraw becomes a line. So when the stream is not a terminal, `progress_bar` returns a `LineProgress`: the
same tqdm counters, reported as whole lines at most every LINE_INTERVAL_S seconds, and once more at the end.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINE_INTERVAL_S = 15.0


def progress_bar(iterable=None, *, disable: bool = False, file=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal, else a LineProgress; `disable` turns either off."""
    stream = file if file is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, disable=disable, file=stream, dynamic_ncols=True, **kwargs)
    return LineProgress(iterable, disable=disable, out=stream, **kwargs)


class _Discard:
    """Where tqdm's own drawing goes: its '\\r' redraws and end-of-bar newlines."""

    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LineProgress(tqdm):
    """tqdm whose display is one whole line on `out` (no bar, no '\\r'), at most every `mininterval` seconds."""

    monitor_interval = 0  # no monitor thread: it would force redraws between our lines

    def __init__(self, iterable=None, *, out=None, mininterval: float = LINE_INTERVAL_S, **kwargs):
        self.out = out if out is not None else sys.stderr
        self.line_t, self.line_n = -float("inf"), None  # when the last line was written, and at which count
        super().__init__(iterable, file=_Discard(), mininterval=mininterval, ncols=0, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or time.monotonic() - self.line_t < self.mininterval:  # "" is tqdm clearing its bar
            return True
        self.write_line()
        return True

    def write_line(self) -> None:
        self.line_t, self.line_n = time.monotonic(), self.n
        print(self.__str__(), file=self.out, flush=True)

    def close(self) -> None:
        if not self.disable and self.n != self.line_n:  # the final count, however soon after the last line
            self.write_line()
        super().close()
