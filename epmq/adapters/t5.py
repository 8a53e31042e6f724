"""T5 encoder-decoders (``T5ForConditionalGeneration``, FLAN-T5): encoder blocks, then decoder blocks.

Calibration runs teacher-forced: each batch carries the task input (``input_ids``,
``attention_mask``) and the target (``labels`` or ``decoder_input_ids``, with an optional
``decoder_attention_mask``). The decoder's inputs are captured after the whole encoder is
quantized, so cross-attention sees the quantized encoder's states. Padding tokens are left out of
every statistic: encoder masks for the encoder and for cross-attention keys/values, decoder masks
for the rest of the decoder.
"""

from torch import nn

from epmq.adapters.base import (
    AwqGroup,
    ModelAdapter,
    Stack,
    module_path,
    register_adapter,
)

_CROSS_ATTENTION_FROM_ENCODER = ("EncDecAttention.k", "EncDecAttention.v")


@register_adapter
class T5Adapter(ModelAdapter):
    model_types = ("t5", "mt5", "umt5")

    def stacks(self, model):
        return [
            Stack("encoder", module_path(model, model.encoder.block), model.encoder.block),
            Stack("decoder", module_path(model, model.decoder.block), model.decoder.block),
        ]

    # transformers' T5 weight init reads ``.weight`` of every attention linear, even when loaded,
    # and pack-quantized linears have ``weight_packed`` only: int8 codes keep a ``weight``.
    compressed_tensors_format = "int-quantized"
    awq_no_clip = ("SelfAttention.q", "SelfAttention.k", "EncDecAttention.q", "EncDecAttention.k")

    def awq_groups(self, block):
        # T5's RMS norms have a weight only (no bias, no mean): dividing it by s is exact.
        groups = [
            AwqGroup("layer.0.layer_norm", ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v"),
                     "layer.0.SelfAttention"),
            AwqGroup("layer.0.SelfAttention.v", ("layer.0.SelfAttention.o",)),
        ]
        if block.is_decoder:
            # Cross-attention keys/values read the encoder's output, produced by the encoder's
            # final norm that every decoder block shares: not folded. Their output projection is.
            groups += [
                AwqGroup("layer.1.layer_norm", ("layer.1.EncDecAttention.q",)),
                AwqGroup("layer.1.EncDecAttention.v", ("layer.1.EncDecAttention.o",)),
            ]
        ff = len(block.layer) - 1
        dense = block.layer[ff].DenseReluDense
        if hasattr(dense, "wi_0"):  # gated: wo's input is act(wi_0 x) * wi_1 x, exact through wi_1
            groups += [
                AwqGroup(f"layer.{ff}.layer_norm", (f"layer.{ff}.DenseReluDense.wi_0", f"layer.{ff}.DenseReluDense.wi_1"),
                         f"layer.{ff}.DenseReluDense"),
                AwqGroup(f"layer.{ff}.DenseReluDense.wi_1", (f"layer.{ff}.DenseReluDense.wo",)),
            ]
        else:
            groups.append(AwqGroup(f"layer.{ff}.layer_norm", (f"layer.{ff}.DenseReluDense.wi",)))
            if isinstance(dense.act, nn.ReLU):  # relu(x / s) = relu(x) / s for s > 0
                groups.append(AwqGroup(f"layer.{ff}.DenseReluDense.wi", (f"layer.{ff}.DenseReluDense.wo",)))
        return groups

    def run_model(self, model, batch):
        model(**batch, use_cache=False)

    def next_block_inputs(self, output, args, kwargs):
        # T5Block(hidden, attention_mask, position_bias, encoder_hidden_states, encoder_attention_mask,
        # encoder_decoder_position_bias): the first block computes the relative position biases,
        # every later block reuses them.
        args = list(args)
        args[1] = output[1]
        if len(args) > 4 and output[2] is not None:
            args[4] = output[2]
        return tuple(args), kwargs

    def input_mask(self, stack, linear_name, batch):
        if stack.name == "encoder" or linear_name.endswith(_CROSS_ATTENTION_FROM_ENCODER):
            mask = batch.get("attention_mask")
        else:
            mask = batch.get("decoder_attention_mask")
        return None if mask is None else mask.bool()
