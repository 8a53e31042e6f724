"""Export to compressed-tensors: transformers loads it, lm-eval evaluates it, the logits are ours."""

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from epmq.checkpoint import load_model, save_quantized  # noqa: E402
from epmq.cli import main  # noqa: E402
from epmq.config import method_params  # noqa: E402
from epmq.engine import CalibrationTask, quantize_model  # noqa: E402
from epmq.io import LazyCheckpoint  # noqa: E402
from epmq.catalog import get_method  # noqa: E402
from epmq.testing.models import outlier_llama, save_experts  # noqa: E402


def character_tokenizer(directory):
    """A 256-token tokenizer built here: one token per printable character, plus specials."""
    characters = [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), 256)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(directory)
    return wrapped


@pytest.fixture(scope="module")
def epmq_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = outlier_llama()
    experts = [LazyCheckpoint(path) for path in save_experts(model, tmp, 2)]
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    tasks = [CalibrationTask(f"t{i}", [{"input_ids": ids[4 * i : 4 * i + 4]}], e) for i, e in enumerate(experts)]
    result = quantize_model(model, get_method("epmq", method_params("quantize", bits=4, group_size=32)), tasks)
    out = save_quantized(tmp / "epmq", model, {n: layer.replacement for n, layer in result.replacements.items()}, {"method": "epmq"})
    character_tokenizer(tmp / "tokenizer")
    return tmp, out


def test_transformers_loads_the_export_with_our_logits(epmq_checkpoint):
    tmp, quantized = epmq_checkpoint
    assert main(["export", "--model", str(quantized), "--tokenizer", str(tmp / "tokenizer"), "--out", str(tmp / "ct")]) == 0
    config = json.loads((tmp / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    exported = AutoModelForCausalLM.from_pretrained(tmp / "ct").eval()
    ours = load_model(quantized)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_lm_eval_evaluates_the_export(epmq_checkpoint, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tmp, quantized = epmq_checkpoint
    out = tmp / "ct-lm-eval"
    assert main(["export", "--model", str(quantized), "--tokenizer", str(tmp / "tokenizer"), "--out", str(out)]) == 0
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0}) + "\n"
                            for a in range(8)))
    (tmp_path / "tiny.yaml").write_text(
        "task: epmq_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["epmq_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)), batch_size=4, device="cpu",
    )
    accuracy = results["results"]["epmq_tiny_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0


def test_act_order_with_permuted_groups_is_refused(tmp_path, capsys):
    model = outlier_llama()
    ids = torch.randint(0, 256, (4, 16))
    params = method_params("quantize", bits=4, group_size=32, act_order=True)
    result = quantize_model(model, get_method("gptq", params), [CalibrationTask("t", [{"input_ids": ids}])])
    out = save_quantized(tmp_path / "q", model, {n: layer.replacement for n, layer in result.replacements.items()}, {})
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "ct")]) == 2
    assert "not representable" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
