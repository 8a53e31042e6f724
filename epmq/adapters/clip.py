"""CLIP vision towers: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and ``CLIPModel``'s vision part.

Only the vision tower is quantized (paper §5.1, FusionBench's CLIP experts): the text tower, projections and logit
scale stay as they are.
"""

from epmq.adapters.base import (
    AwqGroup,
    ModelAdapter,
    Stack,
    module_path,
    register_adapter,
)


@register_adapter
class ClipVisionAdapter(ModelAdapter):
    model_types = ("clip_vision_model", "clip")

    def stacks(self, model):
        layers = getattr(model, "vision_model", model).encoder.layers
        return [Stack("vision", module_path(model, layers), layers)]

    awq_no_clip = ("q_proj", "k_proj")

    def run_model(self, model, batch):
        getattr(model, "vision_model", model)(pixel_values=batch["pixel_values"])

    def awq_activation_groups(self, block):
        return [AwqGroup("mlp.activation_fn", ("mlp.fc2",))]

    def awq_groups(self, block):
        # fc2 is not scaled: its input is quick_gelu(fc1(x)), and quick_gelu(x / s) != quick_gelu(x) / s,
        # so no fold into fc1 is exact (only into a scaled activation: awq_activation_groups).
        # It still gets AWQ's clip search and the grid.
        return [
            AwqGroup("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            AwqGroup("self_attn.v_proj", ("self_attn.out_proj",)),
            AwqGroup("layer_norm2", ("mlp.fc1",)),
        ]
