"""The console of ``raydebias run`` / ``demo``: one line per stage, everything else in ``<run_dir>/logs/run.log``.

Without ``--verbose`` the process's stdout and stderr (file descriptors 1 and 2, so Ray's forwarded worker output,
Ray Data's progress logging and the Ray processes started from here too) are redirected to the log file, and the
console gets only what :class:`Console` writes: ``[i/N] stage … done in 12 s``. On a terminal a live line shows the
running stage's elapsed time and its latest ``a/b`` progress line from the log, with an ETA.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

_PROGRESS = re.compile(r"(?P<what>[A-Za-z_][\w ]*?)\s+(?P<a>\d+)/(?P<b>\d+)(?!\d)")


def _fmt(secs: float) -> str:
    secs = int(round(secs))
    return f"{secs // 60}:{secs % 60:02d}" if secs >= 60 else f"{secs} s"


def latest_progress(text: str) -> tuple[str, int, int] | None:
    """The last ``<what> a/b`` in ``text`` with 0 < a <= b (e.g. ``diffusion step 300/1000``), or None."""
    for line in reversed(text.splitlines()):
        for m in reversed(list(_PROGRESS.finditer(line))):
            a, b = int(m.group("a")), int(m.group("b"))
            if 0 < a <= b:
                return m.group("what").strip()[-24:], a, b
    return None


class Console:
    """Context manager owning the console for one run (see the module docstring)."""

    def __init__(self, log_path: Path, verbose: bool = False, live: bool | None = None):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self._live = live
        self._saved: tuple[int, int] | None = None
        self._stage: tuple[str, float, int] | None = None  # label, start time, log offset
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.out: TextIO = sys.stdout

    def __enter__(self) -> Console:
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        live = self.out.isatty() if self._live is None else self._live
        if live:
            self._thread = threading.Thread(target=self._tick, name="raydebias-console", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._saved is not None:
            self._clear()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self.out.close()
            self._saved = None
            self.out = sys.stdout

    def print(self, msg: str) -> None:
        """A line for the console (and, when quiet, for the log too)."""
        with self._lock:
            self._clear()
            print(msg, file=self.out, flush=True)
        if not self.verbose:
            print(msg, flush=True)  # fd 1 is the log file

    def progress(self, event: dict) -> None:
        """The pipeline's stage events: ``{"event": start|done|skip|failed, "i", "n", "stage", ...}``."""
        label = f"[{event['i']}/{event['n']}] {event['stage']}"
        kind = event["event"]
        if kind == "start":
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._stage = (label, time.time(), offset)
            if self.verbose:
                print(f"{label} …", flush=True)
            return
        self._stage = None
        if kind == "skip":
            self.print(f"{label:<34} skipped (completed, inputs unchanged)")
        elif kind == "done":
            self.print(f"{label:<34} done in {_fmt(event['seconds'])}")
        elif kind == "failed":
            self.print(f"{label:<34} FAILED after {_fmt(event['seconds'])}: {event['error']}")

    def _clear(self) -> None:
        if self._thread is not None:
            self.out.write("\r\033[K")

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            stage = self._stage
            if stage is None:
                continue
            label, t0, offset = stage
            elapsed = time.time() - t0
            line = f"{label:<34} {_fmt(elapsed)}"
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(max(offset, f.seek(0, 2) - 16384))
                    prog = latest_progress(f.read().decode("utf-8", "replace"))
            except OSError:
                prog = None
            if prog:
                what, a, b = prog
                line += f"  {what} {a}/{b}"
                if a < b:
                    line += f"  ETA {_fmt(elapsed * (b - a) / a)}"
            with self._lock:
                self.out.write("\r\033[K" + line[:150])
                self.out.flush()
