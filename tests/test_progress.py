"""The progress bars' ETA leaves compile time out (swd_jax.train.progress), on a fake clock."""
from swd_jax.train.progress import Progress, StepClock, _format_eta


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_excludes_compile_seconds_and_compiled_steps():
    now = FakeTime()
    clock = StepClock(total=10, done=2, now=now)  # resumed at step 2
    assert clock.eta() is None  # nothing timed yet: no guess
    now.t += 40.0  # step 3: 38 s compiling, 2 s of its own
    clock.exclude(38.0)
    clock.step()
    assert clock.seconds_per_step() == 2.0 and clock.eta() == 7 * 2.0
    now.t += 30.0  # step 4 compiled implicitly (a new shape): not timed at all
    clock.step(compiled=True)
    assert clock.timed == 1 and clock.done == 4 and clock.eta() == 6 * 2.0
    now.t += 3.0  # steps 5, 6: 1.5 s each; mean over timed steps (2 + 3) / 3
    clock.step(2)
    assert clock.seconds_per_step() == 5.0 / 3 and clock.eta() == 4 * 5.0 / 3
    now.t += 1.0
    clock.exclude(5.0)  # a compile longer than the window never makes a step's time negative
    clock.step()
    assert clock.seconds == 5.0 and clock.timed == 4
    now.t += 1.0
    clock.step(10)  # past the total: ETA 0, not negative
    assert clock.eta() == 0.0


def test_eta_format_and_bar_fields():
    assert [_format_eta(s) for s in (None, 59.6, 61, 3 * 3600 + 62)] == ["?", "01:00", "01:01", "3:01:02"]
    bar = Progress(5, desc="x", disable=True)
    with bar.compiling("scale interval 1"):
        assert bar._compiling == "scale interval 1"
    assert bar._compiling is None and bar.clock._excluded >= 0.0
    bar.update(1)
    bar.close()
