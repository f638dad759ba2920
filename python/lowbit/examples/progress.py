"""A one-line progress bar on stderr (no dependency): redrawn in place on a terminal, a line
every 10% otherwise (CI logs, pipes)."""
import sys
import time


class Progress:
    def __init__(self, label: str, total: int, start: int = 0, stream=None):
        self.label, self.total, self.done = label, total, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_decile = start * 10 // max(total, 1)

    def update(self, step: int, **fields):
        self.done = step
        decile = step * 10 // max(self.total, 1)
        if not self.tty and decile == self.last_decile and step != self.total:
            return
        self.last_decile = decile
        width = 24
        filled = width * step // max(self.total, 1)
        bar = "#" * filled + "-" * (width - filled)
        info = "  ".join(f"{k} {v}" for k, v in fields.items())
        line = f"{self.label} [{bar}] {step}/{self.total}  {info}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, message: str = ""):
        elapsed = time.perf_counter() - self.t0
        # (on a terminal this ends the bar's line; otherwise it is a line of its own)
        self.stream.write(f"  ({elapsed:.1f} s) {message}".rstrip() + "\n")
        self.stream.flush()
