"""Peak resident-memory sampling of the current process (for sync reports and benches)."""

from __future__ import annotations

import os
import threading


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; 0 where unknown)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Context manager sampling RSS every ``interval_s`` in a thread.

    ``delta`` = peak RSS seen inside the block minus RSS at entry (bytes). Sampling
    can miss spikes shorter than the interval; the final sample is taken at exit.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)
