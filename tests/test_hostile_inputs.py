"""Hostile inputs to merge, quantize, export / load_model and the suite stages (issue 18).

Every refusal is checked the same way (:func:`refused`): exit code 2, one line naming the cause
(file, tensor or parameter) and no traceback, every input byte-identical afterwards (SHA-256 of
each file), and nothing new in the output's parent folder. Models are tiny and built from config;
the stages run in-process (``epmq.cli.main``), subprocesses only where a signal is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.checkpoint import load_model
from epmq.cli import main
from epmq.io import CheckpointError, atomic_write_json
from epmq.testing.models import tiny_clip_vision, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128  # tiny_llama's vocabulary


# ------------------------------------------------------------------------------------ helpers --
def tree_hashes(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files or folders)."""
    hashes = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            hashes[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def run_cli(*argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``python -m epmq ARGV`` run in-process (argparse errors included)."""
    capsys.readouterr()
    try:
        code = main([str(item) for item in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def refused(argv, *, inputs, out, match, capsys) -> str:
    """Run a stage that must refuse: exit 2, one line matching ``match``, inputs untouched,
    nothing new beside ``out``. Returns the error line."""
    out = Path(out)
    parent = out.parent if out.parent.exists() else None
    before_inputs = tree_hashes(*inputs)
    before_parent = sorted(os.listdir(parent)) if parent else None
    before_out = tree_hashes(out) if out.exists() else None
    code, err = run_cli(*argv, capsys=capsys)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert __import__("re").search(match, lines[0]), lines[0]
    assert tree_hashes(*inputs) == before_inputs, "an input changed"
    if parent:
        assert sorted(os.listdir(parent)) == before_parent, f"left behind: {set(os.listdir(parent)) - set(before_parent)}"
    assert (tree_hashes(out) if out.exists() else None) == before_out, "the existing output changed"
    return lines[0]


def perturbed_copy(source: Path, destination: Path, seed: int) -> Path:
    shutil.copytree(source, destination)
    state = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    save_file({key: value + 0.01 * torch.randn(value.shape, generator=generator) for key, value in state.items()},
              str(destination / "model.safetensors"))
    return destination


def text_calibration(path: Path, samples: int = 8, length: int = 16, **replace) -> Path:
    ids = torch.randint(0, VOCAB, (samples, length), generator=torch.Generator().manual_seed(1))
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tensors.update(replace)
    save_file({key: value for key, value in tensors.items() if value is not None}, str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny Llama (pretrained, two experts, their merge, an RTN checkpoint), two calibration
    files and a tiny CLIP vision tower with image calibration: built once, copied per test."""
    root = tmp_path_factory.mktemp("built")
    tiny_llama().save_pretrained(root / "base")
    perturbed_copy(root / "base", root / "e0", 0)
    perturbed_copy(root / "base", root / "e1", 1)
    text_calibration(root / "c0.safetensors")
    text_calibration(root / "c1.safetensors")
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(root / "base"), "--experts",
                 str(root / "e0"), str(root / "e1"), "--out", str(root / "merged")]) == 0
    assert main(["quantize", "--model", str(root / "merged"), "--method", "rtn", "--group-size", "32",
                 "--out", str(root / "q")]) == 0
    tiny_clip_vision().save_pretrained(root / "clip")
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    save_file({"pixel_values": pixels}, str(root / "img.safetensors"))
    return root


@pytest.fixture
def w(built, tmp_path, monkeypatch):
    """A fresh copy of the built world, the current directory inside it."""
    world = tmp_path / "w"
    shutil.copytree(built, world)
    monkeypatch.chdir(world)
    return world


def quantize_args(w, *extra, method="gptq", calib=("c0.safetensors", "c1.safetensors"), out="out"):
    return ["quantize", "--model", w / "merged", "--method", method, "--group-size", "32",
            "--calib", *[w / c for c in calib], "--out", w / out, *extra]


MERGE = ["merge", "--method", "task_arithmetic"]


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


def test_suite_calib_out_that_is_a_folder_is_refused(w, capsys):
    (w / "calib.safetensors").mkdir()
    refused(["suite", "calib", "--suite-config", ROOT / "epmq/suites/mini-clip8-smoke.yaml", "--task", "x",
             "--samples", "4", "--out", w / "calib.safetensors"],
            inputs=[w / "merged"], out=w / "calib.safetensors", match="is a directory", capsys=capsys)


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


# ----------------------------------------------------------- code through configuration ----
def _snakemake(config: Path, *targets, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--configfile", str(config),
         "--directory", str(cwd), "--cores", "1", *targets],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )


def _workflow_config(path: Path, suites: dict) -> Path:
    config = {
        "threads": 1,
        "suites": suites,
        "targets": {"t": {"suite": next(iter(suites)), "kind": "methods", "caption": "c",
                          "merges": ["simple_average"], "methods": ["rtn"], "reference_rows": []}},
    }
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_suite_config_path_with_braces_is_refused_by_the_schema(tmp_path):
    evil = tmp_path / "x$(touch${IFS}PWNED).yaml"
    evil.write_text("builder: mini-clip\nsuite: evil\n")
    config = _workflow_config(tmp_path / "config.json", {"evil": {"builder": "mini-clip", "suite_config": str(evil)}})
    result = _snakemake(config, "results/evil/data", cwd=tmp_path)
    assert result.returncode != 0
    assert "does not match '^[^{}]*$'" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()


@pytest.mark.slow
def test_suite_config_path_cannot_inject_shell(tmp_path):
    evil = tmp_path / "x$(touch PWNED; touch `echo PWNED2`).yaml"
    evil.write_text("builder: mini-clip\nsuite: evil\n")  # valid enough to plan; the job itself then fails
    config = _workflow_config(tmp_path / "config.json", {"evil": {"builder": "mini-clip", "suite_config": str(evil)}})
    result = _snakemake(config, "results/evil/data", cwd=tmp_path)
    assert result.returncode != 0  # the stage refuses the incomplete YAML
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists(), result.stderr
    log = (tmp_path / "logs/evil/suite_data.log").read_text()
    assert "PWNED" in log and "error:" in log  # the name reached the stage as one quoted argument


@pytest.mark.slow
def test_task_names_cannot_inject_shell(tmp_path):
    suite_yaml = tmp_path / "hub-evil.yaml"
    suite_yaml.write_text(textwrap.dedent(f"""
        base: {ROOT / "epmq/suites/paper/llama-3b.yaml"}
        suite: hub-evil
        builder: hub-llama
        experts_table: experts.tsv
        tasks: [math]
        eval_tasks: ["gsm8k$(touch${{IFS}}PWNED)"]
    """))
    config = _workflow_config(tmp_path / "config.json",
                              {"hub-evil": {"builder": "hub-llama", "suite_config": str(suite_yaml)}})
    (tmp_path / "experts.tsv").write_text("suite\trole\ttask\tsource\trevision\tnote\n")
    result = _snakemake(config, "-n", "results/hub-evil/eval/pretrained", cwd=tmp_path)
    assert result.returncode != 0
    assert "are not plain names" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.slow
def test_suite_named_dot_dot_is_refused_by_the_schema(tmp_path):
    config = _workflow_config(tmp_path / "config.json", {"..": {"builder": "mini-clip"}})
    result = _snakemake(config, "-n", cwd=tmp_path)
    assert result.returncode != 0
    assert "does not match" in result.stdout + result.stderr


@pytest.mark.slow
def test_suite_yaml_edits_rerun_the_jobs_that_read_it(tmp_path):
    base = tmp_path / "base.yaml"
    shutil.copy(ROOT / "epmq/suites/mini-clip8-smoke.yaml", tmp_path / "smoke.yaml")
    shutil.copy(ROOT / "epmq/suites/mini-clip8.yaml", base)
    text = (tmp_path / "smoke.yaml").read_text().replace("base: mini-clip8.yaml", "base: base.yaml")
    (tmp_path / "smoke.yaml").write_text(text)
    config = _workflow_config(tmp_path / "config.json",
                              {"mini": {"builder": "mini-clip", "suite_config": str(tmp_path / "smoke.yaml")}})
    data = tmp_path / "results/mini/data"
    data.mkdir(parents=True)
    future = data.stat().st_mtime + 1000
    os.utime(data, (future, future))
    assert "Nothing to be done" in _snakemake(config, "-n", "results/mini/data", cwd=tmp_path).stdout
    os.utime(base, (future + 10, future + 10))  # the inherited (packaged) defaults are edited
    plan = _snakemake(config, "-n", "results/mini/data", cwd=tmp_path)
    assert "suite_data" in plan.stdout and "base.yaml" in plan.stdout, plan.stdout


def test_config_files_name_the_yaml_its_bases_and_the_experts_table():
    from epmq.suites.base import config_files

    files = [str(path) for path in config_files(ROOT / "epmq/suites/paper/clip-b32-ta8.yaml")]
    assert files[0].endswith("clip-b32-ta8.yaml") and files[-1] == "config/experts.tsv"
    assert any(name.endswith("clip.base.yaml") for name in files)


def test_mini_llm3_expressions_are_data_not_code():
    from epmq.suites.expressions import ExpressionError, check_snippet, evaluate

    assert evaluate("a + b - c", {"a": 3, "b": 4, "c": 1}) == 6
    assert evaluate("c < a + b and not a == 0", {"a": 3, "b": 4, "c": 1}) is True
    for hostile in ["__import__('os').system('touch PWNED')", "().__class__.__base__", "open('x', 'w')",
                    "[x for x in (1,)]", "a ** 10 ** 10", "lambda: 1", "b.real"]:
        with pytest.raises(ExpressionError):
            evaluate(hostile, {"a": 1, "b": 2})
    assert check_snippet('s = "sun"\nprint(s.upper())')
    for hostile in ["import os", "print(().__class__)", "open('PWNED', 'w')", "while True:\n    pass",
                    "def f():\n    pass", "print(range(10 ** 9))", "print(range(1000000000))", "__builtins__"]:
        with pytest.raises(ExpressionError):
            check_snippet(hostile)


def test_a_suite_yaml_answer_cannot_run_code(tmp_path):
    from epmq.suites.base import packaged_config
    from epmq.suites.expressions import ExpressionError
    from epmq.suites.mini_llm3 import MiniLlm3
    from epmq.suites.mini_llm3.data import generate_items

    cfg = MiniLlm3.load_config(packaged_config("mini-llm3"))
    cfg["tasks"]["arith"]["templates"][0]["answer"] = f"open({str(tmp_path / 'PWNED')!r}, 'w')"
    with pytest.raises(ExpressionError, match="Call is not allowed"):
        generate_items(cfg, "arith", 50)
    assert not (tmp_path / "PWNED").exists()


def test_missing_local_model_is_not_taken_for_a_hub_id(w, capsys):
    refused(["quantize", "--model", "m/nonexist", "--method", "rtn", "--out", w / "q2"],
            inputs=[w / "merged"], out=w / "q2", match="--model m/nonexist does not exist", capsys=capsys)


def test_hub_cache_names_cannot_collide_or_escape(tmp_path):
    from epmq.hub.store import HubFetchError, resource_name

    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "b" / "model").mkdir(parents=True)
    assert resource_name(str(tmp_path / "a" / "model")) != resource_name(str(tmp_path / "b" / "model"))
    for revision in ["../../../etc", "main/../..", "/abs"]:
        with pytest.raises(HubFetchError, match="not a branch, tag or commit"):
            resource_name("owner/name", revision)
    assert "/" not in resource_name("owner/name", "refs/pr/3")


# ------------------------------------------------------------------ silently wrong results --
@pytest.mark.parametrize("method", ["gptq", "awq", "epmq"])
def test_calibration_with_no_counted_token_is_refused(w, capsys, method):
    text_calibration(w / "c1.safetensors", attention_mask=torch.zeros(8, 16, dtype=torch.long))
    extra = ["--experts", w / "e0", w / "e1"] if method == "epmq" else []
    refused(quantize_args(w, *extra, method=method), inputs=[w / "merged", w / "c0.safetensors", w / "c1.safetensors"],
            out=w / "out", match=r"c1.safetensors: attention_mask is all zero", capsys=capsys)


def test_a_layer_reached_by_no_token_is_refused():
    from epmq.config import method_params
    from epmq.engine import CalibrationTask, quantize_model
    from epmq.catalog import get_method

    model = tiny_llama()
    batches = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}]
    for method in ("gptq", "awq"):
        with pytest.raises(ValueError, match="no calibration token reaches model.layers.0"):
            quantize_model(model, get_method(method, method_params("quantize", group_size=32)),
                           [CalibrationTask("t", batches)])


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_nan_in_image_calibration_is_refused(w, capsys, method):
    pixels = load_file(str(w / "img.safetensors"))["pixel_values"]
    pixels[0, 0, 0, 0] = float("nan")
    save_file({"pixel_values": pixels}, str(w / "img.safetensors"))
    refused(["quantize", "--model", w / "clip", "--method", method, "--group-size", "32",
             "--calib", w / "img.safetensors", "--out", w / "out"],
            inputs=[w / "clip", w / "img.safetensors"], out=w / "out",
            match=r"img.safetensors: tensor 'pixel_values' contains NaN or Inf", capsys=capsys)


def test_json_is_strict_everywhere(tmp_path):
    with pytest.raises(ValueError, match=r"record.json: refusing to write NaN"):
        atomic_write_json(tmp_path / "record.json", {"objective": float("nan")})
    assert list(tmp_path.iterdir()) == []


def _tamper_tensor(q: Path, key: str, edit) -> None:
    state = load_file(str(q / "model.safetensors"))
    state[key] = edit(state[key].clone())
    save_file(state, str(q / "model.safetensors"), metadata={"format": "pt", "epmq_format": "epmq-packed-v1"})


LAYER = "model.layers.0.self_attn.q_proj"
TENSOR_TAMPERING = {
    "qzeros 255 on a 4-bit grid": (f"{LAYER}.qzeros", lambda t: t.fill_(255), r"qzeros holds 255, off the 4-bit grid"),
    "g_idx -1": (f"{LAYER}.g_idx", lambda t: t.fill_(-1), r"g_idx has groups in \[-1, -1\]"),
    "g_idx past the last group": (f"{LAYER}.g_idx", lambda t: t.fill_(2), r"g_idx has groups in \[2, 2\], outside \[0, 2\)"),
    "NaN scales": (f"{LAYER}.scales", lambda t: t.fill_(float("nan")), r"scales contains NaN or Inf"),
    "Inf scales": (f"{LAYER}.scales", lambda t: t.fill_(float("inf")), r"scales contains NaN or Inf"),
    "qweight of the wrong shape": (f"{LAYER}.qweight", lambda t: t[:, :-1].contiguous(), r"qweight' has shape"),
    "scales of the wrong dtype": (f"{LAYER}.scales", lambda t: t.to(torch.int32), r"scales' is I32"),
}


@pytest.mark.parametrize("case", list(TENSOR_TAMPERING))
def test_tampered_quantized_tensors_are_refused_on_load(w, capsys, case):
    key, edit, match = TENSOR_TAMPERING[case]
    _tamper_tensor(w / "q", key, edit)
    with pytest.raises(CheckpointError, match=match):
        load_model(w / "q")
    refused(["quantize", "--model", w / "q", "--method", "rtn", "--out", w / "again"], inputs=[w / "q"],
            out=w / "again", match=match, capsys=capsys)


INFO_TAMPERING = {
    "dtype int8": (lambda i: i.update(dtype="int8"), r"field 'dtype' is 'int8'"),
    "dtype unknown": (lambda i: i.update(dtype="float128"), r"field 'dtype' is 'float128'"),
    "bits as a string": (lambda i: i["layers"][LAYER].update(bits="4"), rf"layer '{LAYER}': 'bits' must be an integer"),
    "bits 99": (lambda i: i["layers"][LAYER].update(bits=99), r"'bits' must be an integer in 1..8"),
    "group size 0": (lambda i: i["layers"][LAYER].update(group_size=0), r"'group_size' must be -1 or a positive"),
    "sym as a string": (lambda i: i["layers"][LAYER].update(sym="yes"), r"'sym' must be true or false"),
    "layers a list": (lambda i: i.update(layers=list(i["layers"])), r"field 'layers' must map"),
    "layer entry a number": (lambda i: i["layers"].update({LAYER: 4}), r"expected an object with 'bits'"),
    "layer not in the model": (lambda i: i["layers"].update({"model.layers.9.mlp.fc": i["layers"][LAYER]}),
                               r"names 'model.layers.9.mlp.fc', not a linear"),
    "group size that does not fit the tensors": (lambda i: i["layers"][LAYER].update(group_size=16),
                                                 r"scales' has shape \(64, 2\), expected \(64, 4\)"),
    "no layers": (lambda i: i.pop("layers"), r"field 'layers' must map"),
}


@pytest.mark.parametrize("case", list(INFO_TAMPERING))
def test_edits_to_quantization_json_are_named_errors(w, capsys, case):
    edit, match = INFO_TAMPERING[case]
    file = w / "q" / "quantization.json"
    info = json.loads(file.read_text())
    edit(info)
    file.write_text(json.dumps(info))
    refused(["quantize", "--model", w / "q", "--method", "rtn", "--out", w / "again"], inputs=[w / "q"],
            out=w / "again", match=match, capsys=capsys)
    refused(["export", "--model", w / "q", "--out", w / "exported"], inputs=[w / "q"],
            out=w / "exported", match=match, capsys=capsys)


@pytest.mark.parametrize("text,match", [('{"format": "epmq-packed-v1", "layers": {', r"q/quantization.json: not valid JSON"),
                                        ("[1, 2]", r"q/quantization.json: expected a JSON object, found list"),
                                        ('{"layers": {}, "dtype": NaN}', r"q/quantization.json: not valid JSON")])
def test_bad_json_in_quantization_json_names_the_file(w, capsys, text, match):
    (w / "q" / "quantization.json").write_text(text)
    refused(["quantize", "--model", w / "q", "--method", "rtn", "--out", w / "again"], inputs=[w / "q"],
            out=w / "again", match=match, capsys=capsys)


def test_shard_index_pointing_outside_its_folder_is_refused(w, capsys):
    outside = w / "elsewhere.safetensors"
    shutil.copy(w / "base" / "model.safetensors", outside)
    keys = load_file(str(outside)).keys()
    (w / "base" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {key: "../elsewhere.safetensors" for key in keys}}))
    refused([*MERGE, "--pretrained", w / "base", "--experts", w / "e0", w / "e1", "--out", w / "out"],
            inputs=[w / "base", w / "e0", w / "e1", outside], out=w / "out",
            match=r"index.json names shards outside its folder", capsys=capsys)


# ----------------------------------------------------------- one line instead of a traceback --
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CALIBRATION_CASES = {
    "truncated": (lambda p: _truncate(p), r"c1.safetensors: cannot read calibration file"),
    "garbage": (lambda p: p.write_bytes(os.urandom(300)), r"c1.safetensors: cannot read calibration file"),
    "empty file": (lambda p: p.write_bytes(b""), r"c1.safetensors: cannot read calibration file"),
    "0 samples": (lambda p: text_calibration(p, samples=0), r"c1.safetensors: 0 calibration samples"),
    "float input_ids": (lambda p: text_calibration(p, input_ids=torch.rand(8, 16)),
                        r"c1.safetensors: tensor 'input_ids' must hold integers"),
    "float attention_mask": (lambda p: text_calibration(p, attention_mask=torch.ones(8, 16)),
                             r"c1.safetensors: tensor 'attention_mask' must hold integers"),
    "ids past the vocabulary": (lambda p: text_calibration(p, input_ids=torch.full((8, 16), VOCAB)),
                                rf"c1.safetensors: tensor 'input_ids' has ids in \[{VOCAB}, {VOCAB}\], outside"),
    "negative ids": (lambda p: text_calibration(p, input_ids=torch.full((8, 16), -3)),
                     r"c1.safetensors: tensor 'input_ids' has ids in \[-3, -3\]"),
    "no input_ids": (lambda p: text_calibration(p, input_ids=None), r"c1.safetensors: no 'input_ids' tensor"),
    "sample counts disagree": (lambda p: text_calibration(p, attention_mask=torch.ones(4, 16, dtype=torch.long)),
                               r"c1.safetensors: inputs disagree on the number of samples"),
    "scalar tensor": (lambda p: save_file({"input_ids": torch.tensor(3)}, str(p)), r"c1.safetensors: tensor 'input_ids' is a scalar"),
    "missing": (lambda p: p.unlink(), r"calibration file not found: .*c1.safetensors"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_bad_calibration_files_are_one_line_errors(w, capsys, case):
    edit, match = CALIBRATION_CASES[case]
    edit(w / "c1.safetensors")
    inputs = [w / "merged", w / "c0.safetensors"] + ([w / "c1.safetensors"] if (w / "c1.safetensors").exists() else [])
    refused(quantize_args(w), inputs=inputs, out=w / "out", match=match, capsys=capsys)


def test_three_dimensional_pixel_values_are_refused(w, capsys):
    save_file({"pixel_values": torch.randn(4, 32, 32)}, str(w / "img.safetensors"))
    refused(["quantize", "--model", w / "clip", "--method", "gptq", "--group-size", "32",
             "--calib", w / "img.safetensors", "--out", w / "out"], inputs=[w / "clip", w / "img.safetensors"],
            out=w / "out", match=r"img.safetensors: tensor 'pixel_values' has shape \(4, 32, 32\)", capsys=capsys)


ARGUMENT_CASES = {
    "alpha 1e300": (["--method", "epmq", "--experts", "e0", "e1", "--alpha", "1e300"], r"alpha=1e\+300 .*overflows"),
    "alpha nan": (["--alpha", "nan"], r"argument --alpha: expected a finite number"),
    "alpha inf": (["--alpha", "inf"], r"argument --alpha: expected a finite number"),
    "alpha negative": (["--alpha", "-1"], r"quantize/alpha: -1.0 is less than the minimum"),
    "percdamp nan": (["--percdamp", "nan"], r"argument --percdamp: expected a finite number"),
    "threads -1": (["--threads", "-1"], r"argument --threads: expected an integer >= 1"),
    "threads 0": (["--threads", "0"], r"argument --threads: expected an integer >= 1"),
    "batch size 0": (["--batch-size", "0"], r"argument --batch-size: expected an integer >= 1"),
    "device bogus": (["--device", "bogus"], r"argument --device: unknown device 'bogus'"),
    "set without value": (["--set", "static_groups"], r"--set expects KEY=VALUE"),
    "set nan": (["--set", "percdamp=.nan"], r"percdamp: nan is not a finite number"),
    "set unknown key": (["--set", "nonsense=1"], r"invalid configuration"),
    "experts and calibration disagree": (["--method", "epmq", "--experts", "e0"], r"got 1 experts but 2 calibration files"),
    "bits 0": (["--bits", "0"], r"quantize/bits: 0 is less than the minimum of 2"),
    "bits 9": (["--bits", "9"], r"quantize/bits: 9 is greater than the maximum of 8"),
    "group size 0": (["--group-size", "0"], r"group_size must be positive or -1, got 0"),
    "block size 0": (["--block-size", "0"], r"argument --block-size: expected an integer >= 1"),
    "task names and files disagree": (["--tasks", "a"], r"got 1 task names for 2 calibration files"),
    "unknown method": (["--method", "bogus"], r"argument --method: invalid choice: 'bogus'"),
    "hessian dtype float16": (["--hessian-dtype", "float16"], r"argument --hessian-dtype: invalid choice"),
    "awq grid 0": (["--set", "awq.n_grid=0"], r"quantize/awq/n_grid: 0 is less than the minimum of 1"),
}


@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
def test_bad_quantize_arguments_are_one_line_errors(w, capsys, case):
    extra, match = ARGUMENT_CASES[case]
    argv = quantize_args(w)
    if "--method" in extra:  # replace the method
        position = argv.index("--method")
        del argv[position : position + 2]
    refused([*argv, *[w / item if item in ("e0", "e1") else item for item in extra]],
            inputs=[w / "merged", w / "c0.safetensors", w / "c1.safetensors", w / "e0"], out=w / "out",
            match=match, capsys=capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a build or machine without CUDA")
def test_cuda_on_a_cpu_build_is_refused(w, capsys):
    refused([*quantize_args(w), "--device", "cuda"], inputs=[w / "merged"], out=w / "out",
            match=r"argument --device: 'cuda': this torch build or machine has no CUDA device", capsys=capsys)


MERGE_ARGUMENT_CASES = {
    "device bogus": (["--device", "bogus"], r"argument --device: unknown device 'bogus'"),
    "param without value": (["--param", "scaling"], r"--param expects KEY=VALUE"),
    "param nan": (["--param", "scaling=.nan"], r"scaling: nan is not a finite number"),
    "param string": (["--param", "scaling=abc"], r"scaling: 'abc' is not of type 'number'"),
    "missing expert": (["--experts", "nowhere"], r"checkpoint directory not found: nowhere"),
}


@pytest.mark.parametrize("case", list(MERGE_ARGUMENT_CASES))
def test_bad_merge_arguments_are_one_line_errors(w, capsys, case):
    extra, match = MERGE_ARGUMENT_CASES[case]
    experts = [] if "--experts" in extra else ["--experts", w / "e0", w / "e1"]
    refused([*MERGE, "--pretrained", w / "base", *experts, *extra, "--out", w / "out"],
            inputs=[w / "base", w / "e0", w / "e1"], out=w / "out", match=match, capsys=capsys)


@pytest.mark.parametrize("model,match", [("merged", r"merged has no quantization.json"),
                                         ("nowhere", r"--model nowhere does not exist")])
def test_export_of_what_quantize_did_not_write_is_refused(w, capsys, model, match):
    refused(["export", "--model", model, "--out", w / "ct"], inputs=[w / "merged"], out=w / "ct", match=match,
            capsys=capsys)


def test_exponent_values_without_a_dot_are_numbers(w, capsys):
    from epmq.config import parse_value

    assert parse_value("1e-5") == 1e-5 and parse_value("0.3") == 0.3 and parse_value("abc") == "abc"
    code, err = run_cli("merge", "--method", "wudi", "--pretrained", w / "base", "--experts", w / "e0", w / "e1",
                        "--param", "lr=1e-5", "--param", "steps=1", "--device", "cpu", "--out", w / "wudi", capsys=capsys)
    assert code == 0, err
    assert json.loads((w / "wudi" / "merge.json").read_text())["params"]["lr"] == 1e-5


def test_duplicate_expert_paths_are_warned(w, capsys, caplog):
    code, _ = run_cli(*MERGE, "--pretrained", w / "base", "--experts", w / "e0", w / "e0", "--out", w / "out",
                      capsys=capsys)
    assert code == 0
    assert any("--experts lists" in record.getMessage() and "twice" in record.getMessage() for record in caplog.records)


def test_duplicate_calibration_files_are_warned(w, capsys, caplog):
    code, _ = run_cli(*quantize_args(w, calib=("c0.safetensors", "c0.safetensors")), capsys=capsys)
    assert code == 0
    assert any("--calib lists" in record.getMessage() for record in caplog.records)


def test_every_written_record_is_standard_json(w):
    for file in [w / "merged" / "merge.json", w / "q" / "quantization.json"]:
        json.loads(file.read_text(), parse_constant=lambda name: pytest.fail(f"{file} holds {name}"))
    assert math.isfinite(json.loads((w / "q" / "quantization.json").read_text())["seconds"])
