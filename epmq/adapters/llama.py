"""Decoder-only Llama-family language models (``LlamaForCausalLM``)."""

from epmq.adapters.base import (
    AwqGroup,
    ModelAdapter,
    Stack,
    module_path,
    register_adapter,
)


@register_adapter
class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)

    def stacks(self, model):
        return [Stack("decoder", module_path(model, model.model.layers), model.model.layers)]

    awq_no_clip = ("q_proj", "k_proj")

    def awq_groups(self, block):
        groups = [AwqGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
        # Under grouped-query attention v_proj has fewer output channels than o_proj has inputs:
        # one v channel feeds several heads, so no per-channel fold exists (as in llm-awq).
        if block.self_attn.v_proj.out_features == block.self_attn.o_proj.in_features:
            groups.append(AwqGroup("self_attn.v_proj", ("self_attn.o_proj",)))
        groups.append(AwqGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
        # down_proj's input is act(gate) * up: scaling up's output channels by 1/s is exact.
        groups.append(AwqGroup("mlp.up_proj", ("mlp.down_proj",)))
        return groups

    def run_model(self, model, batch):
        # The LM head is not quantized and its logits are not needed: run the base model only.
        model.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)

    def input_mask(self, stack, linear_name, batch):
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()
