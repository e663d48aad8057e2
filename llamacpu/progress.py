"""Progress on stderr: a conversion's bar or callback (Progress, convert.py), and a batch job's
requests done / total with tokens/s and ETA (JobProgress, batch.py)."""

from __future__ import annotations

import sys
import time


_open = None  # the stream whose last progress line is still open (drawn without its newline)


def mark_open(stream, is_open: bool) -> None:
    """A progress line was drawn on `stream`, left open (redrawn in place) or ended."""
    global _open
    _open = stream if is_open else None


def end_open_line() -> None:
    """End a progress line left open (an interrupt mid-bar), so what is printed next starts
    on a line of its own instead of after the bar."""
    global _open
    if _open is not None:
        try:
            _open.write("\n")
            _open.flush()
        except (OSError, ValueError):
            pass
        _open = None


class Progress:
    """Tensors done / bytes, rate, ETA on stderr; a bar only on a TTY."""

    def __init__(self, progress, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.callback = progress if callable(progress) else None
        self.bar = (progress is True and not quiet and hasattr(self.stream, "isatty")
                    and self.stream.isatty())
        self.quiet = quiet
        self._last = 0.0
        self.phase, self.total_n, self.total_b = "", 0, 0
        self.t0 = time.monotonic()

    def start(self, phase: str, total_n: int, total_b: int):
        self.phase, self.total_n, self.total_b = phase, total_n, total_b
        self.t0 = time.monotonic()
        self._last = 0.0
        self._finished = False
        self._width = 0
        self.update(0, 0)

    def update(self, done_n: int, done_b: int):
        if self.callback is not None:
            self.callback(self.phase, done_n, self.total_n, done_b, self.total_b)
        if not self.bar or self._finished:
            return
        now = time.monotonic()
        final = done_b >= self.total_b and done_n >= self.total_n
        if not final and now - self._last < 0.1:
            return
        self._last = now
        self._finished = final
        dt = max(now - self.t0, 1e-9)
        frac = done_b / self.total_b if self.total_b else 1.0
        rate = done_b / dt
        eta = (self.total_b - done_b) / rate if rate > 0 else 0.0
        width = 24
        fill = int(frac * width)
        count = f" {done_n}/{self.total_n} tensors" if self.total_n else ""
        line = (f"\r{self.phase:<10} [{'#' * fill}{'.' * (width - fill)}]{count} "
                f"{fmt_bytes(done_b)}/{fmt_bytes(self.total_b)} {fmt_bytes(rate)}/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        pad = " " * max(0, self._width - len(line))  # erase what a longer line left
        self._width = len(line)
        self.stream.write(line + pad + ("\n" if final else ""))
        self.stream.flush()
        mark_open(self.stream, not final)

    def message(self, text: str):
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def fmt_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class JobProgress:
    """Requests done / total, failed ones, generated tokens/s and ETA, on stderr.

    On a TTY one line redrawn in place (at most 10 times a second, like Progress); elsewhere
    (a log file, CI) a plain line every `every` seconds. close() prints the final line.
    `done` counts rows from earlier runs (a resumed job); the rates count this run only."""

    def __init__(self, total: int, done: int = 0, failed: int = 0, quiet: bool = False, stream=None,
                 every: float = 10.0, label: str = "batch"):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.quiet, self.every, self.label = quiet, every, label
        self.total, self.done0 = total, done
        self.done, self.failed, self.tokens = done, failed, 0
        self.t0 = self._last = time.monotonic()
        self._width = 0

    def update(self, n: int = 1, tokens: int = 0, failed: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        self.failed += failed
        now = time.monotonic()
        if now - self._last >= (0.1 if self.tty else self.every):
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        dt = max(now - self.t0, 1e-9)
        ran = self.done - self.done0
        width = 24
        fill = int(width * self.done / self.total) if self.total else width
        eta = (self.total - self.done) * dt / ran if ran else None
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} requests{failed} "
                f"{self.tokens / dt:.1f} tok/s ETA {fmt_eta(eta) if eta is not None else '?'}")

    def _draw(self, now: float, final: bool = False) -> None:
        self._last = now
        if self.quiet:
            return
        line = self.line(now)
        if self.tty:
            pad = " " * max(0, self._width - len(line))  # erase what a longer line left
            self._width = len(line)
            self.stream.write("\r" + line + pad + ("\n" if final else ""))
            mark_open(self.stream, not final)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic(), final=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            if self.tty and self._width:   # below the bar, which the next update redraws
                self.stream.write("\r" + " " * self._width + "\r")
                self._width = 0
                mark_open(self.stream, False)
            self.stream.write(text + "\n")
            self.stream.flush()
