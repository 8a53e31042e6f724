"""Decoder-only language models: one adapter for every family whose blocks are (input norm,
self-attention, norm, gated MLP), with what differs per family declared as data.

The engine needs nothing family-specific beyond where the blocks are (``model.model.layers``) and
how to run a batch; the linears and which of them share an input are discovered by running a
block (:func:`epmq.adapters.base.linear_groups`). Only AWQ needs names: which module produces each
scaling group's input, and whether dividing its output by ``s`` is exact. Those names are the
:class:`DecoderFamily` rows below; adding a family is one row.
"""

from __future__ import annotations

from dataclasses import dataclass

from epmq.adapters.base import ADAPTERS, AwqGroup, ModelAdapter, Stack, module_path


@dataclass(frozen=True)
class DecoderFamily:
    """Module names (relative to a decoder block) and foldability facts of one family."""

    name: str  # what a user calls the family (error messages, README)
    model_types: tuple[str, ...]  # HF ``config.model_type`` values
    #: linears reading the attention norm's output: q/k/v, or one fused ``qkv_proj`` (Phi-3)
    attention_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    #: the value projection when it is a linear of its own (a slice of a fused qkv cannot take a
    #: per-row fold without also scaling q and k)
    value: str | None = "self_attn.v_proj"
    attention_output: str = "self_attn.o_proj"
    attention_norm: str = "input_layernorm"
    #: the norm whose output the MLP reads (Gemma 2/3 put ``post_attention_layernorm`` on the
    #: attention branch's output and a ``pre_feedforward_layernorm`` before the MLP)
    mlp_norm: str = "post_attention_layernorm"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    #: the linear whose output multiplies act(gate) elementwise (None when fused with gate)
    mlp_up: str | None = "mlp.up_proj"
    mlp_output: str = "mlp.down_proj"
    #: whether the norms compute ``x_hat * weight`` (so dividing weight by s divides the output by
    #: s); Gemma's compute ``x_hat * (1 + weight)``, which ``fold_scales`` cannot divide exactly
    norms_fold: bool = True
    #: linears whose AWQ clip search is skipped (queries and keys, as in llm-awq / AutoAWQ)
    awq_no_clip: tuple[str, ...] = ("q_proj", "k_proj")


GEMMA_NORMS = {"norms_fold": False}
FAMILIES = (
    DecoderFamily("Llama", ("llama",)),
    DecoderFamily("Mistral", ("mistral",)),
    # q/k/v carry biases: a fold scales input columns only, so they stay as they are, and v's
    # bias is divided with its rows by ``fold_scales``.
    DecoderFamily("Qwen2", ("qwen2",)),
    # per-head q_norm/k_norm sit after q/k: no effect on the folds of the norm before them or of v -> o.
    DecoderFamily("Qwen3", ("qwen3",)),
    DecoderFamily("Gemma", ("gemma",), **GEMMA_NORMS),
    DecoderFamily("Gemma 2", ("gemma2",), mlp_norm="pre_feedforward_layernorm", **GEMMA_NORMS),
    DecoderFamily("Gemma 3", ("gemma3_text",), mlp_norm="pre_feedforward_layernorm", **GEMMA_NORMS),
    DecoderFamily(
        "Phi-3", ("phi3",), attention_inputs=("self_attn.qkv_proj",), value=None,
        mlp_inputs=("mlp.gate_up_proj",), mlp_up=None, awq_no_clip=("qkv_proj",),
    ),
)


class DecoderAdapter(ModelAdapter):
    """Any decoder-only LM of a :class:`DecoderFamily` (``<Family>ForCausalLM``)."""

    def __init__(self, family: DecoderFamily):
        self.family = family
        self.model_types = family.model_types
        self.awq_no_clip = family.awq_no_clip

    def stacks(self, model):
        return [Stack("decoder", module_path(model, model.model.layers), model.model.layers)]

    def awq_groups(self, block):
        family = self.family
        groups = []
        if family.norms_fold:
            groups.append(AwqGroup(family.attention_norm, family.attention_inputs, "self_attn"))
        # Under grouped-query attention v has fewer output channels than o has inputs: one v
        # channel feeds several heads, so no per-channel fold exists (as in llm-awq).
        if family.value is not None:
            value, output = block.get_submodule(family.value), block.get_submodule(family.attention_output)
            if value.out_features == output.in_features:
                groups.append(AwqGroup(family.value, (family.attention_output,)))
        if family.norms_fold:
            groups.append(AwqGroup(family.mlp_norm, family.mlp_inputs, "mlp"))
        # down's input is act(gate) * up: scaling up's output channels by 1/s is exact.
        if family.mlp_up is not None:
            groups.append(AwqGroup(family.mlp_up, (family.mlp_output,)))
        return groups

    def run_model(self, model, batch):
        # The LM head is not quantized and its logits are not needed: run the base model only.
        model.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)

    def input_mask(self, stack, linear_name, batch):
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()


def _register(families: tuple[DecoderFamily, ...]) -> None:
    for family in families:
        ADAPTERS.update(dict.fromkeys(family.model_types, DecoderAdapter(family)))


_register(FAMILIES)
