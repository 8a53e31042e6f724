"""BERT-family encoders (``BertModel``, all-MiniLM-L6-v2): post-norm blocks, padded text."""

from epmq.adapters.base import (
    AwqGroup,
    ModelAdapter,
    Stack,
    module_path,
    register_adapter,
)


@register_adapter
class BertAdapter(ModelAdapter):
    model_types = ("bert",)

    def stacks(self, model):
        encoder = getattr(model, "bert", model).encoder
        return [Stack("encoder", module_path(model, encoder.layer), encoder.layer)]

    awq_no_clip = ("attention.self.query", "attention.self.key")

    def awq_groups(self, block):
        # Post-norm blocks: the norm before query/key/value (and before intermediate.dense) also
        # feeds the residual branch, so dividing its output by s would change the residual: no
        # exact fold. output.dense follows GELU: not homogeneous. Only the value -> attention
        # output projection is exact (attention is linear in the values, channel by channel).
        # The other linears get AWQ's clip search and the grid.
        return [AwqGroup("attention.self.value", ("attention.output.dense",))]

    def input_mask(self, stack, linear_name, batch):
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()
