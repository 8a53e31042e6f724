"""Each rule's work at the paper's real layer shapes, measured on this CPU and extrapolated to the paper.

Models: the real configurations of the CLIP ViT-B/32 and ViT-L/14 vision towers, FLAN-T5-base and
Llama-3.1-8B, cut to one block (T5: one encoder and one decoder block), random weights; experts are
perturbed copies. Llama's vocabulary is cut to 2,048 rows. Merges and evaluation run at the real
widths; quantization runs at 1/w of them (w = 2 for the CLIP towers and T5, 8 for Llama: hidden
512, MLP 1,792), since one real-width GPTQ solve of
Llama's ``down_proj`` takes about ten minutes on one core here. Calibration: 2 tasks of a few samples (below), not the paper's
K tasks of 256 samples. Every reduction is undone by the formula printed next to the figure.

Work per rule (the functions the rule's ``python -m epmq`` stage calls):

- merge: ``epmq.merge.streaming.merge_checkpoints`` (each operator of the paper's tables for the
  family; WUDI with 1 Adam step instead of its default number, 400) of the one-block checkpoints with K = 2 experts.
  Paper time = t x (P / p) x (K / 2) [x WUDI's steps]; paper memory = the model in its dtype
  (one output shard at most) + (m - model_meas) x (K / 2) x (T / t_max), T and t_max the largest
  tensor of the paper model and of the measured one.
- quantize: ``epmq.engine.quantize_model`` (RTN, GPTQ, AWQ, E-PMQ) on the merged one-block model.
  Paper time >= t x (B / b) x w^3 (the solver's cost grows with the cube of the width; the
  statistics' share, which grows with the tokens N / n, is not separated); paper memory = model + calibration tensors + m_fixed x w^2 +
  cached x N / n, where cached is what the engine holds per token (each block input, and for AWQ
  the fp outputs and one group's inputs in float32) and m_fixed = m - cached_meas.
- evaluate: ``epmq.checkpoint.load_model`` of the RTN checkpoint and one forward pass of a batch of
  the suite's evaluation batch size. Paper memory = the measured load ratio x model + the batch's
  activations (+ Llama's logits at the real vocabulary); paper time = t_batch x (B / b) per batch.

Flags: a rule whose extrapolated memory exceeds its ``mem_mb`` in ``profiles/slurm/config.yaml``.
Times are CPU times at ``--threads`` threads; the jobs run on GPUs (bench/gpu_check.py), so runtime
requests are not judged from them. All figures on this shared 2-core machine vary with its load.

    nice -n 10 python bench/paper_shapes.py [--families clip-b32 ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
K_MEASURED = 2


@dataclass
class Family:
    """One model family at the paper's shapes: config builder, paper depth, suite sizes."""

    name: str
    config: dict
    blocks_paper: int  # blocks of the paper model (T5: encoder + decoder)
    blocks_measured: int
    params_paper: float  # parameters of the paper model (vision tower / whole model)
    experts_paper: int  # the largest K of the family's suites
    tokens_per_sample_paper: int
    merges: list[str]
    methods: list[str]
    eval_batch: int
    dtype: torch.dtype = torch.float32
    samples_measured: int = 4  # per task
    tokens_per_sample_measured: int = 0  # text: sequence length measured (0: fixed by the model)
    quantize_width: int = 1  # widths divided by this for GPTQ/AWQ/E-PMQ
    largest_tensor_paper: float = 0.0  # elements
    vocab_paper: int = 0


def _clip(hidden, intermediate, layers, heads, patch):
    return dict(kind="clip", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=224, patch_size=patch, projection_dim=hidden)


FAMILIES = {
    "clip-b32": Family("clip-b32 (ViT-B/32, TALL20)", _clip(768, 3072, 1, 12, 32), 12, 1, 87.8e6, 20, 50,
                       ["simple_average", "task_arithmetic", "ties", "wudi"], ["rtn", "gptq", "awq", "epmq"], 128,
                       samples_measured=4, quantize_width=2, largest_tensor_paper=3072 * 768),
    "clip-l14": Family("clip-l14 (ViT-L/14, TALL20)", _clip(1024, 4096, 1, 16, 14), 24, 1, 303.2e6, 20, 257,
                       ["task_arithmetic", "ties"], ["rtn", "gptq", "awq", "epmq"], 128,
                       samples_measured=2, quantize_width=2, largest_tensor_paper=4096 * 1024),
    "flan-t5-base": Family("flan-t5-base (GLUE8)",
                           dict(kind="t5", d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=1,
                                num_decoder_layers=1, feed_forward_proj="gated-gelu", vocab_size=32128,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                tie_word_embeddings=False),
                           24, 2, 247.6e6, 8, 512, ["task_arithmetic", "ties"], ["rtn", "gptq", "awq", "epmq"], 32,
                           samples_measured=2, tokens_per_sample_measured=128, quantize_width=2,
                           largest_tensor_paper=32128 * 768),
    "llama-8b": Family("llama-8b (Llama-3.1-8B, 4 experts)",
                       dict(kind="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=2048,
                            tie_word_embeddings=False),
                       32, 1, 8.03e9, 4, 512, ["task_arithmetic"], ["rtn", "gptq", "awq", "epmq"], 8,
                       dtype=torch.bfloat16, samples_measured=2, tokens_per_sample_measured=128, quantize_width=8,
                       largest_tensor_paper=128256 * 4096, vocab_paper=128256),
}
SAMPLES_PAPER = 256  # calibration samples per task (config/paper.yaml)


# ------------------------------------------------------------------------------ measuring --
def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def measured(work):
    """(result, seconds, peak resident increment in bytes) of ``work()``; the peak is reset first."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    return result, seconds, max(0, _status_kib("VmHWM") - before) * 1024


# ------------------------------------------------------------------------------- building --
def build_model(family: Family, width_divisor: int = 1):
    import transformers

    spec = dict(family.config)
    kind = spec.pop("kind")
    if width_divisor > 1:
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "d_model",
                    "d_ff", "num_heads", "projection_dim"):
            if key in spec:
                spec[key] = max(1, spec[key] // width_divisor)
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**spec))
    elif kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**spec))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec))
    return model.to(family.dtype).eval()


def write_inputs(family: Family, root: Path, width_divisor: int = 1) -> tuple[Path, list[Path]]:
    """The one-block pretrained model and K_MEASURED perturbed experts, as safetensors directories."""
    from safetensors.torch import save_file

    from epmq.io import LazyCheckpoint

    model = build_model(family, width_divisor)
    model.save_pretrained(root / "pretrained")
    stored = set(LazyCheckpoint(root / "pretrained").keys())  # tied copies (T5's embeddings) are saved once
    experts = []
    for index in range(K_MEASURED):
        generator = torch.Generator().manual_seed(100 + index)
        state = {key: (value.float() + 0.01 * torch.randn(value.shape, generator=generator)).to(value.dtype).contiguous()
                 if value.is_floating_point() else value.contiguous()
                 for key, value in model.state_dict().items() if key in stored}
        experts.append(root / f"expert{index}")
        experts[-1].mkdir()
        save_file(state, str(experts[-1] / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(root / "pretrained" / "config.json", experts[-1] / "config.json")
    return root / "pretrained", experts


def calibration(family: Family, model, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = family.samples_measured
    kind = family.config["kind"]
    if kind == "clip":
        return {"pixel_values": torch.randn(n, 3, 224, 224, generator=generator).to(family.dtype)}
    length = family.tokens_per_sample_measured
    ids = torch.randint(0, model.config.vocab_size, (n, length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        batch["labels"] = ids[:, : length // 4]
        batch["decoder_attention_mask"] = torch.ones_like(batch["labels"])
    return batch


def tokens_per_sample_measured(family: Family) -> int:
    if family.config["kind"] == "clip":
        return (224 // family.config["patch_size"]) ** 2 + 1
    if family.config["kind"] == "t5":
        return family.tokens_per_sample_measured * 5 // 4  # encoder tokens + decoder tokens
    return family.tokens_per_sample_measured


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


# ------------------------------------------------------------------------------ the rules --
@dataclass
class Row:
    rule: str
    family: str
    work: str
    seconds: float
    peak_mib: float
    paper_hours: float | None
    paper_gib: float
    formula: str


def measure_family(family: Family, workdir: Path, threads: int) -> list[Row]:
    from epmq.checkpoint import load_model, save_quantized
    from epmq.config import method_params
    from epmq.engine import CalibrationTask, quantize_model
    from epmq.io import LazyCheckpoint
    from epmq.merge.streaming import merge_checkpoints
    from epmq.catalog import get_method

    rows = []
    gib = 1 << 30
    dtype_bytes = torch.tensor([], dtype=family.dtype).element_size()
    model_paper = family.params_paper * dtype_bytes
    pretrained, experts = write_inputs(family, workdir / "real")
    reduced = build_model(family)
    p_measured = sum(p.numel() for p in reduced.parameters())
    largest = max(p.numel() for p in reduced.parameters())
    size_measured = model_bytes(reduced)
    del reduced
    k_ratio = family.experts_paper / K_MEASURED
    for merge in family.merges:
        params = {"steps": 1} if merge == "wudi" else {}
        out = workdir / f"merged-{merge}"
        _, seconds, peak = measured(lambda: merge_checkpoints(merge, pretrained, experts, out, params))
        steps = method_params("merge", "wudi")["steps"] if merge == "wudi" else 1
        hours = seconds * family.params_paper / p_measured * k_ratio * steps / 3600
        memory = model_paper + max(0, peak - size_measured) * k_ratio * family.largest_tensor_paper / largest
        rows.append(Row("merge", family.name, merge, seconds, peak / MIB, hours, memory / gib,
                        f"t*P/p*K/2{f'*{steps}' if steps > 1 else ''}; model+(m-model_meas)*K/2*T/t_max"))
        if merge != "task_arithmetic":
            shutil.rmtree(out)
    # quantize: on the task-arithmetic merge, or a width-reduced one
    if family.quantize_width > 1:
        qpretrained, qexperts = write_inputs(family, workdir / "narrow", family.quantize_width)
        merged_dir = merge_checkpoints("task_arithmetic", qpretrained, qexperts, workdir / "narrow-merged")
    else:
        qexperts, merged_dir = experts, workdir / "merged-task_arithmetic"
    base = load_model(merged_dir)
    tokens_measured = K_MEASURED * family.samples_measured * tokens_per_sample_measured(family)
    tokens_paper = family.experts_paper * SAMPLES_PAPER * family.tokens_per_sample_paper
    token_ratio = tokens_paper / tokens_measured
    width = family.quantize_width
    block_ratio = family.blocks_paper / family.blocks_measured
    hidden = base.config.d_model if family.config["kind"] == "t5" else base.config.hidden_size
    intermediate = base.config.d_ff if family.config["kind"] == "t5" else base.config.intermediate_size
    if family.config["kind"] == "clip":  # pixel_values float32 of every calibration image
        calib_paper = family.experts_paper * SAMPLES_PAPER * 3 * 224 * 224 * 4
    else:  # token ids (int64) and masks
        calib_paper = tokens_paper * 8 * 4
    quantized_dir = None
    for name in family.methods:
        model = load_model(merged_dir)
        tasks = [CalibrationTask(f"t{i}", [calibration(family, model, seed=i)], LazyCheckpoint(path))
                 for i, path in enumerate(qexperts)]
        method = get_method(name, method_params("quantize", bits=4, group_size=128))
        result, seconds, peak = measured(lambda: quantize_model(model, method, tasks))
        # per token the engine holds each block input; AWQ also the fp outputs and one group's float32 inputs
        per_token = hidden * dtype_bytes * (2 if name == "awq" else 1) + (intermediate * 4 if name == "awq" else 0)
        cached_measured = per_token * tokens_measured if method.needs_calibration else 0
        fixed = max(0, peak - cached_measured)
        cached_paper = per_token * width * tokens_paper if method.needs_calibration else 0
        memory = model_paper + calib_paper + fixed * width**2 + cached_paper
        hours = seconds * block_ratio * width**3 / 3600
        rows.append(Row("quantize", family.name, name, seconds, peak / MIB, hours, memory / gib,
                        f">= t*B/b*{width}^3; model+calib+m_fixed*{width}^2+cached*N/n (N/n={token_ratio:.0f})"))
        if name == "rtn" and quantized_dir is None and width == 1:
            quantized_dir = save_quantized(workdir / "rtn", model,
                                           {n: layer.replacement for n, layer in result.replacements.items()},
                                           {"method": "rtn"})
        del model, result, tasks
    del base
    if quantized_dir is None:  # evaluate the real-width model
        model = load_model(workdir / "merged-task_arithmetic")
        result = quantize_model(model, get_method("rtn", method_params("quantize", bits=4, group_size=128)))
        quantized_dir = save_quantized(workdir / "rtn", model, {n: l.replacement for n, l in result.replacements.items()},
                                       {"method": "rtn"})
        del model, result
    # the load's peak in a fresh process (here, memory freed by earlier steps would absorb it)
    load_ratio = _load_memory().measure_in_subprocess(quantized_dir)["ratio"]
    loaded, load_seconds, _ = measured(lambda: load_model(quantized_dir))
    load_peak = load_ratio * model_bytes(loaded)
    batch = calibration(family, loaded, seed=9)
    repeat = max(1, math.ceil(family.eval_batch / family.samples_measured))
    batch = {key: torch.cat([value] * repeat)[: family.eval_batch] for key, value in batch.items()}
    with torch.no_grad():
        _, forward_seconds, forward_peak = measured(lambda: loaded(**batch))
    logits_paper = 0
    if family.vocab_paper:
        logits_paper = family.eval_batch * family.tokens_per_sample_paper * family.vocab_paper * 4 * 2
    memory = load_ratio * model_paper + forward_peak + logits_paper
    rows.append(Row("evaluate", family.name, f"load + batch {family.eval_batch}", load_seconds + forward_seconds,
                    (load_peak + forward_peak) / MIB, forward_seconds * block_ratio / 3600, memory / gib,
                    f"load {load_ratio:.2f}x model + batch activations{' + logits' if logits_paper else ''}; "
                    "time per batch t*B/b"))
    del loaded
    return rows


def format_row(row: Row) -> str:
    hours = f"{row.paper_hours:.2f}" if row.paper_hours is not None else "-"
    return (f"{row.rule:<9} {row.family:<34} {row.work:<18} {row.seconds:>7.1f} {row.peak_mib:>9.0f} {hours:>13} "
            f"{row.paper_gib:>9.1f}  {row.formula}")


def _load_memory():
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_memory", ROOT / "bench" / "load_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_attempt(value):
    """A profile resource on a job's first attempt: ``64000`` or ``"64000 * attempt"`` -> 64000."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*\*\s*attempt\s*", value)
        if not match:
            raise SystemExit(f"profiles/slurm/config.yaml: resource {value!r} is neither a number nor 'N * attempt'")
        return int(match.group(1))
    return value


def profile_requests() -> dict[str, dict]:
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    default = profile.get("default-resources", {})
    requests = {rule: {**default, **profile.get("set-resources", {}).get(rule, {})} for rule in ("merge", "quantize", "evaluate")}
    return {rule: {**request, **{key: first_attempt(request[key]) for key in ("mem_mb", "runtime") if key in request},
                   "threads": profile.get("set-threads", {}).get(rule, 1)} for rule, request in requests.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["flan-t5-base", "llama-8b", "clip-b32", "clip-l14"],
                        choices=list(FAMILIES))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="paper-shapes-"))
    try:
        for name in args.families:
            family_dir = scratch / name
            family_dir.mkdir(parents=True)
            family_rows = measure_family(FAMILIES[name], family_dir, args.threads)
            for row in family_rows:
                print(format_row(row), flush=True)
            rows += family_rows
            shutil.rmtree(family_dir)
            print(f"[{name} measured: {time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} s CPU]",
                  flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    requests = profile_requests()
    print(f"\nCPUs: {len(os.sched_getaffinity(0))}, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    header = (f"{'rule':<9} {'family':<34} {'work':<18} {'meas s':>7} {'meas MiB':>9} {'paper h (CPU)':>13} "
              f"{'paper GiB':>9}  formula (P, p: parameters; K: experts; B, b: blocks; w: width divisor; N, n: tokens)")
    print(header)
    flagged = []
    for row in rows:
        print(format_row(row))
        if row.paper_gib * 1024 > requests[row.rule]["mem_mb"]:  # SLURM's MB are MiB
            flagged.append(row)
    print("\nprofiles/slurm/config.yaml requests and the largest extrapolated need:")
    for rule, request in requests.items():
        need = max((row.paper_gib for row in rows if row.rule == rule), default=0.0)
        print(f"  {rule:<9} mem_mb {request['mem_mb']:>6} ({request['mem_mb'] / 1024:.1f} GiB), cpus_per_task "
              f"{request.get('cpus_per_task')}, threads {request['threads']}, runtime {request['runtime']} min; "
              f"need {need:.1f} GiB")
    for row in flagged:
        print(f"FLAG: {row.rule} {row.family} {row.work}: needs {row.paper_gib:.1f} GiB, "
              f"profile gives {requests[row.rule]['mem_mb']} MB")
    print(f"{'no rule flagged' if not flagged else f'{len(flagged)} flagged'}; total {time.perf_counter() - started:.0f} s "
          f"wall, {time.process_time():.0f} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
