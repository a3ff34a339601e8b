"""Long non-training loops report progress: a periodic log line when not on a terminal."""

import logging

from verl.utils import progress as progress_module
from verl.utils.progress import progress


def test_progress_yields_everything_and_logs_when_not_on_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)  # a line per item
    with caplog.at_level(logging.INFO, logger="verl.progress"):
        assert list(progress(iter(range(3)), "validation", total=3)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [line for line in lines if "/3 batch" in line]
    assert lines[0].startswith("validation: 1/3 batch") and lines[-1].startswith("validation: 3 batch done")
