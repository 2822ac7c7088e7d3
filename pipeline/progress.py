"""Progress for people: a tqdm bar with ETA on a terminal, a plain line now and then otherwise.

Library code never prints; a front end (a launcher, the recipe's CLI) makes a
`Progress` and hands its `update` to the long-running call as a callback:

    bar = Progress(total=cfg.train.max_steps, desc="train", initial=start)
    run(task, ds, on_step=lambda step, metrics: bar.update(step, loss=metrics.get("loss")))
    bar.close()

On a TTY that is a live bar with rate and ETA. Without one (CI, `nohup`, a
cluster's log file) a bar would fill the log with carriage returns, so the same
calls write one plain line every `interval_s` seconds and one at the end.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any


class Progress:
    """Position `done` of `total` units, shown as a bar (TTY) or periodic lines."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, stream: IO[str] | None = None,
                 interval_s: float = 30.0, enabled: bool = True, tty: bool | None = None):
        self.total, self.desc, self.done = total, desc, initial
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.enabled = enabled
        self._start, self._start_done = time.monotonic(), initial
        self._last_line = self._start
        self._bar = None
        is_tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        if enabled and is_tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, done: int, **postfix: Any) -> None:
        """Move to position `done` (absolute, not an increment); `postfix` values are shown beside it."""
        if not self.enabled:
            return
        shown = {k: _fmt(v) for k, v in postfix.items() if v is not None}
        if self._bar is not None:
            self._bar.update(done - self.done)
            self.done = done
            if shown:
                self._bar.set_postfix(shown, refresh=False)
            return
        self.done = done
        now = time.monotonic()
        if now - self._last_line >= self.interval_s or done >= self.total:
            self._last_line = now
            self.stream.write(self._line(now, shown) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, now: float, shown: dict[str, str]) -> str:
        elapsed = now - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.nan
        extra = "".join(f" {k}={v}" for k, v in shown.items())
        return (f"{self.desc}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)"
                f" {_clock(elapsed)} elapsed, ETA {_clock(eta)}{extra}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
