"""Progress on long work: a tqdm bar on a terminal, a few plain log lines in log files, never carriage returns."""

import logging
import os
import subprocess
import sys

import pytest

from epmq import progress as progress_module
from epmq.progress import progress, quiet_foreign_bars
from tests.decoder_models import save_calibration, save_family, tiny_decoder


def test_without_a_terminal_at_most_ten_lines_and_every_item(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="epmq.progress"):
        assert list(progress(range(100), "work", unit="step")) == list(range(100))
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 10 and lines[-1].startswith("work: 100/100 step") and "ETA 0.0 s" in lines[-1]


def test_fast_loops_stay_silent_in_logs(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="epmq.progress"):
        assert list(progress(iter(range(50)), "inner", total=50)) == list(range(50))
    assert caplog.records == []


def test_on_a_terminal_a_tqdm_bar_with_counts(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    assert list(progress(range(7), "blocks", unit="block")) == list(range(7))
    assert "blocks" in capsys.readouterr().err


def test_other_libraries_bars_are_silenced_only_without_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    quiet_foreign_bars()
    assert "TQDM_DISABLE" not in os.environ
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    quiet_foreign_bars()
    assert os.environ["TQDM_DISABLE"] == "1"


@pytest.mark.slow
def test_stage_logs_hold_no_carriage_returns(tmp_path):
    base, experts = save_family(tiny_decoder("llama"), tmp_path, 2)
    calib = save_calibration(tmp_path, 2)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("TQDM_DISABLE", None)
    commands = [
        ["merge", "--method", "wudi", "--pretrained", str(base), "--experts", *map(str, experts), "--out", str(tmp_path / "m")],
        ["quantize", "--model", str(tmp_path / "m"), "--method", "gptq", "--group-size", "32",
         "--calib", *map(str, calib), "--out", str(tmp_path / "q")],
        ["export", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "ct")],
    ]
    for command in commands:
        with open(tmp_path / "log", "w") as log:  # stderr is a file, as under Snakemake
            done = subprocess.run([sys.executable, "-m", "epmq", *command], stdout=log, stderr=subprocess.STDOUT, env=env)
        text = (tmp_path / "log").read_text()
        assert done.returncode == 0, text
        assert "\r" not in text and "it/s" not in text, text
