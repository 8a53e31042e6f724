"""Decoder-only Llama-family language models (``LlamaForCausalLM``)."""

from epmq.adapters.base import ModelAdapter, Stack, module_path, register_adapter


@register_adapter
class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)

    def stacks(self, model):
        return [Stack("decoder", module_path(model, model.model.layers), model.model.layers)]

    def run_model(self, model, batch):
        # The LM head is not quantized and its logits are not needed: run the base model only.
        model.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)

    def input_mask(self, stack, linear_name, batch):
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()
