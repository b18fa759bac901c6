"""Progress lines (``soar.progress``): rate and ETA arithmetic on a fake clock, throttling, the main process
only, a resumed loop's count; and the library noise ``stages.common.quiet_libraries`` silences."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest
import torch

from soar.progress import Progress, clock_text, rate_text
from stages import common


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
    assert rate_text(0.25, "image") == "4.00 image/s"
    assert rate_text(1 / 14.2, "image") == "14.2 image/s"
    assert rate_text(1 / 1783.4, "caption") == "1783 caption/s"  # never 1.78e+03


def test_eta_and_rate_are_exact_on_a_fake_clock():
    progress, clock, out = reporter(20000)
    clock.now = 231.0  # 100 steps in 231 s: 2.31 s/step, 19900 steps left: 45969 s
    line = progress.update(100, "loss=0.81")
    assert line == "pretrain:base step 100/20000 (0.5 %) 2.31 s/step, elapsed 3:51, ETA 12:46:09 loss=0.81"
    assert out.getvalue() == line + "\n"  # plain lines, no carriage return
    clock.now = 500.0
    assert progress.advance(150) == "pretrain:base step 250/20000 (1.2 %) 2.00 s/step, elapsed 8:20, ETA 10:58:20"
    clock.now = 540.0
    assert progress.update(20000) == "pretrain:base step 20000/20000 (100.0 %) 37.0 step/s, elapsed 9:00, ETA 0:00"


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
    assert progress.update(400) == "pretrain:base step 400/1000 (40.0 %) 2.00 step/s, elapsed 10:50, ETA 5:00"


def test_nothing_to_do_is_one_line():
    progress, _, out = reporter(0)
    assert progress.update(0, "(16 of 16 images cached before)") == (
        "pretrain:base step 0/0 (100.0 %) elapsed 0:00 (16 of 16 images cached before)")
    assert progress.update(0) is None and len(out.getvalue().splitlines()) == 1


# --- library noise -----------------------------------------------------------------------------------------

class Records(logging.Handler):
    """Collects the messages of the records that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def noisy_libraries(monkeypatch):
    """The libraries as a process that never called ``quiet_libraries`` has them (restored afterwards), and the
    records that reach diffusers' library logger (its own handler's stream is pytest's, not the test's)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    def reset() -> None:
        for name in common.HARMLESS_LOG_MESSAGES:
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, common.DropMessage)]:
                logger.removeFilter(f)
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()  # huggingface_hub's bars too

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    reset()
    records = Records()
    logging.getLogger("diffusers").addHandler(records)
    yield records
    logging.getLogger("diffusers").removeHandler(records)
    reset()


def load_and_cast(folder) -> None:
    """What the stages do with a model: load the bundle, cast the transformer (sampling on a GPU casts to bf16)."""
    from soar.models.bundle import load_bundle

    load_bundle(folder).transformer.to(torch.bfloat16)


def test_loading_the_tiny_model_prints_no_bar_and_no_float32_warning(noisy_libraries, tmp_path, capfd):
    from helpers import TINY_ARCH, TRAIN_CAPTIONS

    from soar.models.tiny import TinyModelConfig, write_tiny_model

    write_tiny_model(tmp_path / "model", TinyModelConfig(**TINY_ARCH), TRAIN_CAPTIONS, seed=0)
    capfd.readouterr()
    load_and_cast(tmp_path / "model")  # the libraries' own output: what the test would miss if it changed
    before = "".join(capfd.readouterr())
    assert "Loading weights" in before and "\r" in before, before
    assert any("should be kept in float32: []" in m for m in noisy_libraries.messages), noisy_libraries.messages
    noisy_libraries.messages.clear()
    common.quiet_libraries()
    common.quiet_libraries()  # idempotent: one filter per message
    write_tiny_model(tmp_path / "again", TinyModelConfig(**TINY_ARCH), TRAIN_CAPTIONS, seed=0)  # "Writing model shards"
    load_and_cast(tmp_path / "again")
    after = "".join(capfd.readouterr())
    assert after == "" and noisy_libraries.messages == [], (after, noisy_libraries.messages)
    assert [sum(isinstance(f, common.DropMessage) for f in logging.getLogger(name).filters)
            for name in common.HARMLESS_LOG_MESSAGES] == [1] * len(common.HARMLESS_LOG_MESSAGES)


@pytest.mark.parametrize(("name", "message", "shown"), [
    ("diffusers.models.modeling_utils", "There are modules in AutoencoderKL that should be kept in float32: []. "
                                        "Casting directly with `to()` can lead to inconsistent results", False),
    ("diffusers.models.modeling_utils", "There are modules in T5 that should be kept in float32: ['wo']. "
                                        "Casting directly with `to()` can lead to inconsistent results", True),
    ("diffusers.models.modeling_utils", "Some weights of the model checkpoint were not used", True),
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
     False),
    ("DeepSpeed", "Setting ds_accelerator to cuda (auto detect)", True),
])
def test_only_the_exact_harmless_messages_are_dropped(noisy_libraries, name, message, shown):
    common.quiet_libraries()
    logger = logging.getLogger(name)
    assert bool(logger.filter(logger.makeRecord(name, logging.WARNING, __file__, 0, message, (), None))) is shown


def test_after_import_acts_once_the_module_has_run(tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    common.after_import("late_module", lambda module: seen.append(module.VALUE + 1))
    common.after_import("late_module", lambda module: seen.append(-1))  # one pending hook per module
    assert seen == [] and "late_module" not in sys.modules
    import late_module

    assert seen == [42] and late_module.VALUE == 41
    assert not any(isinstance(f, common.AfterImport) for f in sys.meta_path)
    common.after_import("late_module", lambda module: seen.append(module.VALUE))  # imported: acts at once
    assert seen == [42, 41]
    del sys.modules["late_module"]


def test_quiet_libraries_imports_no_library_and_quiets_them_as_they_load():
    """A stage that never uses diffusers (score, report) does not pay its seconds-long import for the quieting."""
    code = ("import sys\nfrom stages import common\ncommon.quiet_libraries()\n"
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n"
            "from diffusers.utils import logging as d\nfrom transformers.utils import logging as t\n"
            "print(d.is_progress_bar_enabled(), t.is_progress_bar_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "False False"], out
