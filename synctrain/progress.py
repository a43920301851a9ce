"""What the driver shows while a job runs: a progress bar on a terminal, a line per N steps
elsewhere.

Theory of operation. The driver polls its ranks about once a second (see
:mod:`synctrain.driver.shell`); :meth:`ProgressDisplay.show` gets rank 0's new reports and its
progress answer: the optimizer step, the first prepared loader's epoch and the samples consumed
over all ranks, and in async mode the staleness its parameters have (``Strategy.progress``).
The display keeps the latest of each and derives samples/s over a sliding window of those
answers (:data:`RATE_WINDOW_S`); a step or sample count that goes back (a recovery redid steps)
restarts the window. :meth:`ProgressDisplay.note` gets the shell's failures, new generations
and recoveries as they happen.

Where it goes. On a terminal, a tqdm bar of optimizer steps (a total and an ETA once the loop
reports ``total_steps``) with the latest values as its postfix, and a line above the bar for
each failure or recovery. Elsewhere (a pipe, a file, CI) a bar would be a stream of carriage
returns, so one plain line every ``every_steps`` steps (default: about 20 lines a job once a
total is known, else every :data:`DEFAULT_EVERY_STEPS` steps), one per failure or recovery,
and a last one when the job ends. Both write to stderr unless told otherwise.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any, TextIO

#: samples/s is measured over the progress answers of about this many seconds.
RATE_WINDOW_S = 10.0
#: Without a known total, a line every this many steps when the output is not a terminal.
DEFAULT_EVERY_STEPS = 50
#: Lines per job aimed at once the total is known (every_steps = total / this).
LINES_PER_JOB = 20
#: Reported values shown beside the step (the first ones reported; ``loss`` first).
MAX_SHOWN_VALUES = 6
#: Progress answers kept for the rate (one a second: more than the window needs).
MAX_RATE_SAMPLES = 64
#: Report keys that are not values to show.
HIDDEN_KEYS = ("step", "total_steps")


class ProgressDisplay:
    """Rank 0's reports and progress as a bar (terminal) or lines (anything else).

    A total, and so an ETA, is shown once a report carries ``"total_steps"``: only the loop
    knows how many epochs it runs, so it says so, e.g. once before training:
    ``synctrain.report({"total_steps": epochs * len(loader) // grad_accum_steps})`` (``len``
    of a prepared loader is this rank's batches per epoch, one optimizer step each). The
    latest such value wins; a step that goes back (a recovery redoing steps) moves the bar back.
    ``tty``: None detects it from ``stream``.
    """

    def __init__(self, enabled: bool, job_name: str, *, stream: TextIO | None = None,
                 tty: bool | None = None, every_steps: int | None = None) -> None:
        self.enabled = bool(enabled)
        self.job_name = job_name
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else bool(tty)
        assert every_steps is None or every_steps >= 1, every_steps
        self._every_fixed = every_steps
        self._lock = threading.Lock()  # note() may come from the shell's restart threads
        self.step = 0
        self.total: int | None = None
        self.values: dict[str, Any] = {}
        self.epoch: int | None = None
        self.staleness: float | None = None
        self.failures = 0
        self.recoveries = 0
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=MAX_RATE_SAMPLES)
        self._started = time.monotonic()
        self._last_line_step: int | None = None
        self._bar = None
        if self.enabled and self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=job_name, unit="step", dynamic_ncols=True, file=self.stream)

    # ---- input -------------------------------------------------------------------------
    def show(self, reports: list[dict[str, Any]], progress: dict[str, Any] | None = None) -> None:
        """Rank 0's new reports (each with ``"step"``) and its latest progress answer."""
        if not self.enabled or (not reports and not progress):
            return
        with self._lock:
            for report in reports:
                total = _total_steps(report.get("total_steps"))
                if total is not None:
                    self.total = total
                for key, value in report.items():
                    if key not in HIDDEN_KEYS and (key in self.values or len(self.values) < MAX_SHOWN_VALUES):
                        self.values[key] = value
            step = self.step
            if reports:
                step = int(reports[-1].get("step", step))
            if progress and isinstance(progress.get("step"), int) and progress.get("started"):
                step = max(step, int(progress["step"])) if reports else int(progress["step"])
            self._take_progress(progress or {})
            self._advance(step)

    def note(self, kind: str, text: str) -> None:
        """A failure, a new generation or a recovery, shown at once on a line of its own."""
        if not self.enabled:
            return
        with self._lock:
            if kind == "failure":
                self.failures += 1
            elif kind == "recovered":
                self.recoveries += 1
            self._write_line(f"synctrain: {self.job_name}: {text}")
            if self._bar is not None:
                self._bar.set_postfix_str(self.postfix(), refresh=True)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self.enabled and not self.tty and self._last_line_step != self.step:
                self._write_line(self.line())

    # ---- what is shown -----------------------------------------------------------------
    @property
    def samples_per_s(self) -> float | None:
        if len(self._rate) < 2:
            return None
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def postfix(self) -> str:
        """The values beside the step: reported values (``loss`` first), epoch, samples/s,
        staleness (async), failures and recoveries (once there is one)."""
        shown = sorted(self.values.items(), key=lambda kv: kv[0] != "loss")
        parts = [f"{k}={_fmt(v)}" for k, v in shown]
        if self.epoch is not None:
            parts.append(f"epoch={self.epoch}")
        rate = self.samples_per_s
        if rate is not None:
            parts.append(f"samples/s={rate:.4g}")
        if self.staleness is not None:
            parts.append(f"staleness={self.staleness:.2g}")
        if self.failures:
            parts.append(f"failures={self.failures}")
        if self.recoveries:
            parts.append(f"recovered={self.recoveries}")
        return ", ".join(parts)

    def line(self) -> str:
        """One line of the non-terminal display."""
        total = f"/{self.total} ({100 * self.step / self.total:.0f}%)" if self.total else ""
        elapsed = time.monotonic() - self._started
        rest = self.postfix()
        return f"{self.job_name}: step {self.step}{total} {elapsed:.0f}s" + (f" {rest}" if rest else "")

    @property
    def every_steps(self) -> int:
        if self._every_fixed is not None:
            return self._every_fixed
        if self.total:
            return max(1, -(-self.total // LINES_PER_JOB))
        return DEFAULT_EVERY_STEPS

    # ---- internals ---------------------------------------------------------------------
    def _take_progress(self, progress: dict[str, Any]) -> None:
        if isinstance(progress.get("epoch"), int):
            self.epoch = progress["epoch"]
        staleness = progress.get("staleness_mean", progress.get("staleness"))
        if isinstance(staleness, (int, float)) and not isinstance(staleness, bool):
            self.staleness = float(staleness)
        samples = progress.get("samples")
        if isinstance(samples, int) and not isinstance(samples, bool):
            now = time.monotonic()
            if self._rate and samples < self._rate[-1][1]:
                self._rate.clear()  # went back: a recovery redoes samples
            self._rate.append((now, samples))
            while len(self._rate) > 2 and now - self._rate[0][0] > RATE_WINDOW_S:
                self._rate.popleft()

    def _advance(self, step: int) -> None:
        went_back = step < self.step
        self.step = step
        if self._bar is not None:
            if self.total is not None:
                self._bar.total = self.total
            if step >= self._bar.n and not went_back:
                self._bar.update(step - self._bar.n)  # through update(): the rate, hence the ETA
            else:
                self._bar.n = step
            self._bar.set_postfix_str(self.postfix(), refresh=False)
            self._bar.refresh()
            return
        every = self.every_steps
        last = self._last_line_step
        if last is None or went_back or step // every > last // every:
            self._write_line(self.line())
            self._last_line_step = step

    def _write_line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)  # above the bar, which is redrawn
            return
        print(text, file=self.stream, flush=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _total_steps(value: Any) -> int | None:
    """A reported ``total_steps`` as a positive int; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    return int(value) if float(value).is_integer() else None


__all__ = ["ProgressDisplay"]
