"""Progress bars whose rate and ETA count only the steps' own time: compiling is left out.

A jitted program compiles on its first use (per scale interval in training, per scale in the demo's teacher,
on the first batch of a sampler), which takes tens of seconds on a CPU against a second or less per step. tqdm's
own rate counts that time as a step and shows an ETA of hours after step 1; `StepClock` leaves it out: explicit
compile seconds (`exclude`) are subtracted from the step they fell in, and a step that compiled implicitly
(`step(compiled=True)`) is not timed at all. The rate is the mean over every timed step so far.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator


class StepClock:
    """Seconds per step over timed steps (compile time excluded), and the ETA of the steps left."""

    def __init__(self, total: int, done: int = 0, now: Callable[[], float] = time.perf_counter):
        self.total, self.done, self._now = total, done, now
        self._mark, self._excluded = now(), 0.0
        self.seconds, self.timed = 0.0, 0  # own time of the timed steps, and how many

    def exclude(self, seconds: float) -> None:
        """`seconds` (a compile) of the current step's time are not the step's own."""
        self._excluded += seconds

    def step(self, n: int = 1, compiled: bool = False) -> None:
        """`n` steps finished since the last call; `compiled`: they include an implicit compile (not timed)."""
        now = self._now()
        if not compiled:
            self.seconds += max(now - self._mark - self._excluded, 0.0)
            self.timed += n
        self.done += n
        self._mark, self._excluded = now, 0.0

    def seconds_per_step(self) -> float | None:
        return self.seconds / self.timed if self.timed else None

    def eta(self) -> float | None:
        """Seconds until `total` at the mean own time per step; None before a step was timed."""
        per = self.seconds_per_step()
        return None if per is None else max(self.total - self.done, 0) * per


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m:02d}:{s % 60:02d}"


def _format_rate(per: float | None) -> str:
    if per is None:
        return "? s/it"
    return f"{per:.2f} s/it" if per >= 1.0 else f"{1.0 / max(per, 1e-9):.2f} it/s"


class Progress:
    """A tqdm bar (stderr) fed by a `StepClock`: `[elapsed<eta, rate, postfix]` with compile time left out."""

    BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{clock_eta}, {clock_rate}{postfix}]"

    def __init__(self, total: int, initial: int = 0, desc: str = "", disable: bool = False):
        from tqdm.auto import tqdm

        clock = self.clock = StepClock(total, initial)
        self._compiling: str | None = None
        outer = self

        class _Bar(tqdm):
            @property
            def format_dict(self):
                d = super().format_dict
                d["clock_eta"] = _format_eta(clock.eta())
                d["clock_rate"] = (f"compiling {outer._compiling}" if outer._compiling
                                   else _format_rate(clock.seconds_per_step()))
                return d

        self.bar = _Bar(total=total, initial=initial, desc=desc, disable=disable, bar_format=self.BAR)

    def update(self, n: int = 1, compiled: bool = False) -> None:
        self.clock.step(n, compiled)
        self.bar.update(n)

    @contextlib.contextmanager
    def compiling(self, what: str) -> Iterator[None]:
        """Says `compiling <what>` on the bar while the block runs; its seconds do not count as step time."""
        self._compiling, t0 = what, time.perf_counter()
        self.bar.refresh()
        try:
            yield
        finally:
            self.clock.exclude(time.perf_counter() - t0)
            self._compiling = None
            self.bar.refresh()

    def set_postfix(self, values: dict | None = None, **more) -> None:
        self.bar.set_postfix({**(values or {}), **more})

    def write(self, message: str, file=sys.stderr) -> None:
        self.bar.write(message, file=file)

    def close(self) -> None:
        self.bar.close()
