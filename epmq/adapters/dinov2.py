"""DINOv2 towers (``Dinov2Model``): pre-norm ViT blocks with LayerScale after each branch.

LayerScale multiplies the attention and MLP outputs channel-wise after ``attention.output.dense``
and ``mlp.fc2``; it sits outside the linears, so it is neither merged differently nor quantized.
"""

from epmq.adapters.base import (
    AwqGroup,
    ModelAdapter,
    Stack,
    module_path,
    register_adapter,
)


@register_adapter
class Dinov2Adapter(ModelAdapter):
    model_types = ("dinov2",)

    def stacks(self, model):
        layers = getattr(model, "dinov2", model).encoder.layer
        return [Stack("vision", module_path(model, layers), layers)]

    awq_no_clip = ("attention.attention.query", "attention.attention.key")

    def run_model(self, model, batch):
        getattr(model, "dinov2", model)(pixel_values=batch["pixel_values"])

    def awq_groups(self, block):
        # Pre-norm blocks: norm1 feeds only query/key/value and norm2 only fc1, so their outputs
        # can absorb 1/s exactly; attention is linear in the values, channel by channel, so the
        # value projection absorbs the output projection's scales. fc2 follows GELU, which is
        # not homogeneous: no exact fold; it still gets AWQ's clip search and the grid.
        return [
            AwqGroup("norm1", ("attention.attention.query", "attention.attention.key", "attention.attention.value"), "attention"),
            AwqGroup("attention.attention.value", ("attention.output.dense",)),
            AwqGroup("norm2", ("mlp.fc1",)),
        ]
