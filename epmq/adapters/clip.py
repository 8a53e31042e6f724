"""CLIP vision towers: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and ``CLIPModel``'s vision part.

Only the vision tower is quantized (method.md section 6): the text tower, projections and logit
scale stay as they are.
"""

from epmq.adapters.base import ModelAdapter, Stack, module_path, register_adapter


@register_adapter
class ClipVisionAdapter(ModelAdapter):
    model_types = ("clip_vision_model", "clip")

    def stacks(self, model):
        layers = getattr(model, "vision_model", model).encoder.layers
        return [Stack("vision", module_path(model, layers), layers)]

    def run_model(self, model, batch):
        getattr(model, "vision_model", model)(pixel_values=batch["pixel_values"])
