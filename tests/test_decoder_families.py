"""Every decoder family through one adapter: merge, quantize (rtn/gptq/awq/epmq), export to
compressed-tensors, reload with transformers, same logits as our dequantized model."""

import json

import pytest
import torch

from baselines.awq import fold_scales
from epmq.adapters import adapter_for
from epmq.adapters.decoder import FAMILIES as DECLARED
from epmq.checkpoint import load_model
from epmq.cli import main
from tests.decoder_models import FAMILIES, VOCAB, save_calibration, save_family, tiny_decoder

pytest.importorskip("compressed_tensors")


def test_every_declared_family_is_built_here():
    declared = {model_type for family in DECLARED for model_type in family.model_types}
    assert set(FAMILIES) == declared


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_awq_folds_leave_the_function_unchanged(family, kv_heads):
    """Each declared AWQ group is exactly foldable: random scales folded in, same logits."""
    model = tiny_decoder(family, kv_heads=kv_heads).double()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        block = model.model.layers[0]
        groups = adapter_for(model).awq_groups(block)
        assert groups, family
        g = torch.Generator().manual_seed(1)
        for group in groups:
            linears = [block.get_submodule(name) for name in group.linears]
            scales = 0.5 + torch.rand(linears[0].in_features, generator=g, dtype=torch.float64)
            fold_scales(block, group.previous, linears, scales)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-9, rtol=1e-9)


def test_gqa_drops_the_value_fold_and_gemma_the_norm_folds():
    gqa = adapter_for(tiny_decoder("llama", kv_heads=2)).awq_groups(tiny_decoder("llama", kv_heads=2).model.layers[0])
    assert [g.previous for g in gqa] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    gemma = tiny_decoder("gemma2")
    assert [g.previous for g in adapter_for(gemma).awq_groups(gemma.model.layers[0])] == ["self_attn.v_proj", "mlp.up_proj"]
    phi = tiny_decoder("phi3")
    assert [(g.previous, g.linears) for g in adapter_for(phi).awq_groups(phi.model.layers[0])] == [
        ("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))]


def test_a_family_without_adapter_is_refused_in_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    assert main(["quantize", "--model", str(tmp_path / "gpt2"), "--method", "rtn", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gpt2' has no adapter" in err
    for model_type in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "clip", "t5", "bert"):
        assert model_type in err
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def merged_family(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    base, experts = save_family(tiny_decoder(family), tmp, 2)
    args = ["merge", "--method", "task_arithmetic", "--pretrained", str(base), "--experts", *map(str, experts),
            "--param", "scaling=0.5", "--out", str(tmp / "merged")]
    assert main(args) == 0
    return family, tmp, experts, save_calibration(tmp, 2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "epmq"])
def test_quantize_export_reload(merged_family, method):
    from transformers import AutoModelForCausalLM

    family, tmp, experts, calib = merged_family
    quantized, exported = tmp / f"q-{method}", tmp / f"ct-{method}"
    args = ["quantize", "--model", str(tmp / "merged"), "--method", method, "--bits", "4", "--group-size", "32",
            "--calib", *map(str, calib), "--out", str(quantized)]
    if method == "epmq":
        args += ["--experts", *map(str, experts)]
    assert main(args) == 0
    assert main(["export", "--model", str(quantized), "--out", str(exported)]) == 0
    assert json.loads((exported / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    ours = load_model(quantized)
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(theirs) is type(ours)
    merged = load_model(tmp / "merged")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ours(ids).logits
        assert torch.allclose(theirs(ids).logits, logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, logits, atol=1e-3)  # it was quantized
