"""Hostile inputs (silently wrong results, one line instead of a traceback) to merge, quantize, export / load_model and the suite stages (issue 18).

Every refusal is checked the same way (:func:`refused`): exit code 2, one line naming the cause
(file, tensor or parameter) and no traceback, every input byte-identical afterwards (SHA-256 of
each file), and nothing new in the output's parent folder. Models are tiny and built from config;
the stages run in-process (``epmq.cli.main``), subprocesses only where a signal is needed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.checkpoint import load_model
from epmq.io import CheckpointError, atomic_write_json
from epmq.testing.models import tiny_llama

from tests.hostile_helpers import (  # noqa: F401  (fixtures: built, w)
    MERGE, VOCAB, built, quantize_args, refused, run_cli, text_calibration, w,
)


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
