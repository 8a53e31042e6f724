"""Hostile outputs (issue 18): an --out that would lose data, and interrupted writes. Checked as in
``tests/test_hostile_inputs.py`` (``tests.hostile_helpers.refused``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.hostile_helpers import (  # noqa: F401  (fixtures: built, w)
    MERGE, ROOT, built, refused, run_cli, tree_hashes, w,
)


# ------------------------------------------------------------------------ data loss: --out --
def test_merge_out_that_holds_the_inputs_is_refused(w, capsys):
    v = w / "v"
    v.mkdir()
    for name in ("base", "e0", "e1"):
        shutil.move(w / name, v / name)
    refused([*MERGE, "--pretrained", v / "base", "--experts", v / "e0", v / "e1", "--out", v],
            inputs=[v], out=v, match=r"--out .*v contains the input", capsys=capsys)


def test_quantize_out_that_holds_model_and_calibration_is_refused(w, capsys):
    v3 = w / "v3"
    v3.mkdir()
    shutil.move(w / "merged", v3 / "model")
    shutil.move(w / "c0.safetensors", v3 / "c.safetensors")
    refused(["quantize", "--model", v3 / "model", "--method", "gptq", "--calib", v3 / "c.safetensors", "--out", v3],
            inputs=[v3], out=v3, match="contains the input", capsys=capsys)


def test_quantize_in_place_is_refused(w, capsys):
    refused(["quantize", "--model", w / "merged", "--method", "rtn", "--out", w / "merged"],
            inputs=[w / "merged"], out=w / "merged", match=r"--out .*merged is the input", capsys=capsys)


def test_out_inside_an_input_is_refused(w, capsys):
    refused([*MERGE, "--pretrained", w / "base", "--experts", w / "e0", w / "e1", "--out", w / "e0" / "merged"],
            inputs=[w / "base", w / "e0", w / "e1"], out=w / "e0" / "merged", match="inside the input", capsys=capsys)


def test_export_over_its_input_is_refused(w, capsys):
    refused(["export", "--model", w / "q", "--out", w / "q"], inputs=[w / "q"], out=w / "q",
            match="is the input", capsys=capsys)


@pytest.mark.parametrize("stage", ["merge", "quantize", "export", "suite"])
def test_non_empty_foreign_out_is_refused_without_overwrite(w, capsys, stage):
    out = w / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    argv = {
        "merge": [*MERGE, "--pretrained", w / "base", "--experts", w / "e0", w / "e1", "--out", out],
        "quantize": ["quantize", "--model", w / "merged", "--method", "rtn", "--out", out],
        "export": ["export", "--model", w / "q", "--out", out],
        "suite": ["suite", "data", "--suite-config", ROOT / "epmq/suites/mini-clip8-smoke.yaml", "--out", out],
    }[stage]
    refused(argv, inputs=[w / "base", w / "merged", w / "q"], out=out, match="non-empty directory.*--overwrite",
            capsys=capsys)


def test_overwrite_replaces_a_foreign_out_and_a_previous_output_is_replaced_without_it(w, capsys):
    out = w / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("replace me")
    argv = [*MERGE, "--pretrained", w / "base", "--experts", w / "e0", w / "e1", "--out", out]
    assert run_cli(*argv, "--overwrite", capsys=capsys)[0] == 0
    assert not (out / "notes.txt").exists() and (out / "merge.json").is_file()
    assert run_cli(*argv, capsys=capsys)[0] == 0  # its own previous output: merge.json marks it
    assert run_cli("quantize", "--model", w / "merged", "--method", "rtn", "--out", w / "q", capsys=capsys)[0] == 0


def test_out_is_a_regular_file(w, capsys):
    (w / "report.pdf").write_text("%PDF")
    refused(["quantize", "--model", w / "merged", "--method", "rtn", "--out", w / "report.pdf"],
            inputs=[w / "merged", w / "report.pdf"], out=w / "report.pdf", match="is a file", capsys=capsys)


def test_overwrite_replaces_a_file_and_leaves_nothing_beside_it(w, capsys):
    (w / "report.pdf").write_text("%PDF")
    before = sorted(os.listdir(w))
    assert run_cli("quantize", "--model", w / "merged", "--method", "rtn", "--out", w / "report.pdf", "--overwrite",
                   capsys=capsys)[0] == 0
    assert (w / "report.pdf" / "quantization.json").is_file() and sorted(os.listdir(w)) == before


def test_out_dot_is_refused(w, capsys, monkeypatch):
    work = w / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    refused(["quantize", "--model", w / "merged", "--method", "rtn", "--out", "."],
            inputs=[w / "merged"], out=work / "x", match="current directory", capsys=capsys)
    refused([*MERGE, "--pretrained", w / "base", "--experts", w / "e0", "--out", ".."],
            inputs=[w / "base"], out=work / "x", match="current directory", capsys=capsys)


def test_out_under_a_regular_file_is_refused(w, capsys):
    (w / "file").write_text("x")
    refused(["quantize", "--model", w / "merged", "--method", "rtn", "--out", w / "file" / "q"],
            inputs=[w / "merged", w / "file"], out=w / "file", match="file is not a directory", capsys=capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_an_unwritable_folder_is_refused(w, capsys):
    locked = w / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(["quantize", "--model", w / "merged", "--method", "rtn", "--out", locked / "q"],
                inputs=[w / "merged"], out=locked / "q", match="no permission", capsys=capsys)
    finally:
        locked.chmod(0o700)


def test_out_where_the_user_may_not_write_is_refused(w, capsys, monkeypatch):
    # the permission check itself (the test above needs a non-root user to see a real chmod refuse)
    import epmq.io.paths

    monkeypatch.setattr(epmq.io.paths.os, "access", lambda path, mode: Path(path) != w / "locked")
    (w / "locked").mkdir()
    refused(["quantize", "--model", w / "merged", "--method", "rtn", "--out", w / "locked" / "q"],
            inputs=[w / "merged"], out=w / "locked" / "q", match=r"no permission to write in .*locked", capsys=capsys)


@pytest.mark.parametrize("command", ["fetch", "align"])
def test_hub_commands_check_their_out(w, capsys, command, monkeypatch):
    from epmq.hub.cli import main as hub_main

    monkeypatch.chdir(w.parent)
    before = tree_hashes(w / "base", w / "e0")
    argv = {"fetch": ["fetch", "--source", str(w / "base"), "--out", str(w)],
            "align": ["align", "--src", str(w / "e0"), "--like", str(w / "base"), "--out", str(w / "e0")]}[command]
    assert hub_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("contains the input" in err or "is the input" in err), err
    assert tree_hashes(w / "base", w / "e0") == before


def test_suite_calib_out_that_is_a_foreign_folder_is_refused(w, capsys):
    (w / "calib").mkdir()
    (w / "calib" / "notes.txt").write_text("mine")
    refused(["suite", "calib", "--suite-config", ROOT / "epmq/suites/mini-clip8-smoke.yaml", "--tasks", "x",
             "--samples", "4", "--out", w / "calib"],
            inputs=[w / "merged"], out=w / "calib", match="did not write", capsys=capsys)


# ------------------------------------------------------------- interrupted writes, SIGTERM --
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from epmq.io import atomic_output_dir
    with atomic_output_dir(sys.argv[1]) as tmp:
        (Path(tmp) / "shard.safetensors").write_bytes(b"x" * 1_000_000)
        print("WRITING", flush=True)
        time.sleep(60)
""")


def _writer(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "WRITING"  # the test decides when to kill: now, mid-write
    return process


@pytest.mark.slow
def test_sigterm_while_writing_removes_the_temporary(tmp_path):
    out = tmp_path / "merged"
    process = _writer(out)
    assert any(p.name.startswith(".merged.tmp-") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_kill_9_leftovers_are_removed_by_the_next_run(w, capsys):
    out = w / "merged2"
    process = _writer(out)
    process.kill()
    process.wait(timeout=30)
    (w / f".merged2.old-{process.pid}").mkdir()  # as if killed between the two renames
    leftovers = [p for p in w.iterdir() if p.name.startswith(".merged2.")]
    assert len(leftovers) == 2
    argv = [*MERGE, "--pretrained", w / "base", "--experts", w / "e0", w / "e1", "--out", out]
    assert run_cli(*argv, capsys=capsys)[0] == 0
    assert not [p for p in w.iterdir() if p.name.startswith(".merged2.")]


@pytest.mark.slow
def test_a_live_writers_temporary_is_left_alone(tmp_path):
    from epmq.io import remove_stale_temporaries

    process = _writer(tmp_path / "out")
    try:
        assert remove_stale_temporaries(tmp_path / "out") == []
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
