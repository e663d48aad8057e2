"""Progress lines on stderr: a conversion's (convert.py: a bar, or a callback) and a batch
of requests' (chat_batch, `llamacpu batch`)."""

from __future__ import annotations

import sys
import time


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


class RequestProgress:
    """Requests done / total, completion tokens per second and ETA, one line on stderr
    (rewritten in place on a terminal, a line every 10 s elsewhere)."""

    def __init__(self, total: int, stream=None, done: int = 0):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.n, self.tokens = total, done, 0
        self.start_n = done
        self.t0 = self._last = time.monotonic()
        self._width = 0

    def done(self, completion_tokens: int) -> None:
        self.n += 1
        self.tokens += completion_tokens
        now = time.monotonic()
        if now - self._last >= (0.2 if self.tty else 10.0) or self.n == self.total:
            self._last = now
            self._write(now)

    def _write(self, now: float) -> None:
        dt = max(now - self.t0, 1e-9)
        ran = self.n - self.start_n
        eta = (self.total - self.n) * dt / ran if ran else 0.0
        line = (f"requests {self.n}/{self.total}  {self.tokens / dt:.1f} tokens/s  "
                f"ETA {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}")
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + pad)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
