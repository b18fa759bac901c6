"""Progress lines (``soar.progress``): rate and ETA arithmetic on a fake clock, throttling, the main process
only, a resumed loop's count."""

from __future__ import annotations

import io

from soar.progress import Progress, clock_text, rate_text


class FakeClock:
    """A clock the test moves: ``clock.now = 12.5``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reporter(total: int, **kwargs) -> tuple[Progress, FakeClock, io.StringIO]:
    clock, out = FakeClock(), io.StringIO()
    return Progress("pretrain:base", total, unit="step", clock=clock, stream=out, **kwargs), clock, out


def test_clock_and_rate_texts():
    assert [clock_text(s) for s in (0, 59.4, 59.6, 231, 3599.4, 3600, 45969, -3)] == [
        "0:00", "0:59", "1:00", "3:51", "59:59", "1:00:00", "12:46:09", "0:00"]
    assert rate_text(2.31, "step") == "2.31 s/step"
    assert rate_text(1.0, "step") == "1.00 s/step"
    assert rate_text(0.25, "image") == "4 image/s"
    assert rate_text(1 / 14.2, "image") == "14.2 image/s"


def test_eta_and_rate_are_exact_on_a_fake_clock():
    progress, clock, out = reporter(20000)
    clock.now = 231.0  # 100 steps in 231 s: 2.31 s/step, 19900 steps left: 45969 s
    line = progress.update(100, "loss=0.81")
    assert line == "pretrain:base step 100/20000 (0.5 %) 2.31 s/step, elapsed 3:51, ETA 12:46:09 loss=0.81"
    assert out.getvalue() == line + "\n"  # plain lines, no carriage return
    clock.now = 500.0
    assert progress.advance(150) == "pretrain:base step 250/20000 (1.2 %) 2.00 s/step, elapsed 8:20, ETA 10:58:20"
    clock.now = 540.0
    assert progress.update(20000) == "pretrain:base step 20000/20000 (100.0 %) 37 step/s, elapsed 9:00, ETA 0:00"


def test_lines_come_first_last_and_at_most_every_interval():
    progress, clock, out = reporter(100, every=10.0)
    shown = []
    for step in range(1, 101):
        clock.now = step * 3.0  # an item every 3 s
        if progress.update(step) is not None:
            shown.append(step)
    assert shown == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77, 81, 85, 89, 93,
                     97, 100]  # the first, then 12 s apart (the first item at least 10 s after), and the last
    assert len(out.getvalue().splitlines()) == len(shown) and "\r" not in out.getvalue()
    assert progress.update(100) is None  # the last line once


def test_a_short_loop_prints_its_first_and_last_item():
    progress, clock, out = reporter(50)
    for step in range(1, 51):
        clock.now = step * 0.01
        progress.update(step)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "pretrain:base step 1/50", "pretrain:base step 50/50"]


def test_every_zero_prints_every_update():
    progress, clock, out = reporter(3, every=0)
    for step in (1, 2, 3):
        clock.now = step
        progress.update(step)
    assert len(out.getvalue().splitlines()) == 3


def test_a_process_other_than_the_main_prints_nothing(capsys):
    progress, clock, out = reporter(10, main=False)
    default = Progress("sample base", 10, main=False, clock=clock)  # the default stream (stdout) too
    for step in range(1, 11):
        clock.now = 20.0 * step
        assert progress.update(step) is None
        assert default.advance() is None
    assert out.getvalue() == "" and capsys.readouterr().out == ""


def test_a_resumed_loop_counts_from_its_start():
    progress, clock, _ = reporter(1000, start=500)
    clock.now = 100.0  # 100 steps done here in 100 s, 400 left: the 500 before the resume are not counted
    assert progress.update(600) == "pretrain:base step 600/1000 (60.0 %) 1.00 s/step, elapsed 1:40, ETA 6:40"
    clock.now = 150.0  # 200 steps in 150 s
    assert progress.advance(100) == "pretrain:base step 700/1000 (70.0 %) 1.33 step/s, elapsed 2:30, ETA 3:45"


def test_start_none_counts_from_the_first_update():
    progress, clock, _ = reporter(1000, start=None, every=0)
    clock.now = 600.0  # set-up (and the steps before a resume) take 600 s: no rate yet
    assert progress.update(300, "loss=1") == "pretrain:base step 300/1000 (30.0 %) elapsed 10:00 loss=1"
    clock.now = 650.0  # 100 steps in 50 s
    assert progress.update(400) == "pretrain:base step 400/1000 (40.0 %) 2 step/s, elapsed 10:50, ETA 5:00"


def test_nothing_to_do_is_one_line():
    progress, _, out = reporter(0)
    assert progress.update(0, "(16 of 16 images cached before)") == (
        "pretrain:base step 0/0 (100.0 %) elapsed 0:00 (16 of 16 images cached before)")
    assert progress.update(0) is None and len(out.getvalue().splitlines()) == 1
