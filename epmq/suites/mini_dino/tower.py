"""mini-dino's tower: the DINOv2 ViT-S/14 converted from the installed ONNX file (checked against
onnxruntime, resized to the working resolution), its inputs, and what its experts train."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epmq.suites.mini_dino import dinov2_onnx


def to_pixel_values(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Grey images in [0, 1], [N, 1, h, w] -> the backbone's input: resized, three channels, normalised."""
    size = cfg["backbone"]["image_size"]
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(cfg["backbone"]["pixel_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["backbone"]["pixel_std"]).view(1, 3, 1, 1)
    return ((images.expand(-1, 3, -1, -1) - mean) / std).float().contiguous()


def converted_backbone(cfg: dict):
    """The pretrained tower from the installed ONNX file, checked once; ``(model, record)``."""
    spec = cfg["backbone"]
    path = dinov2_onnx.locate_onnx(spec["package"], spec["file"])
    digest = dinov2_onnx.sha256_of(path)
    if digest != spec["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} differs from backbone.sha256 {spec['sha256']} in the suite YAML")
    model, proto = dinov2_onnx.load_backbone(path, spec["config"])
    check = dinov2_onnx.check_against_onnxruntime(model, proto, n_images=spec["check"]["images"], seed=cfg["seed"])
    if check["max_abs_diff"] > spec["check"]["tolerance"] * max(1.0, check["max_abs_value"]):
        raise ValueError(f"{path}: converted backbone differs from onnxruntime by {check['max_abs_diff']:.3g}")
    native = model.config.image_size
    dinov2_onnx.resize_position_embeddings(model, spec["image_size"])
    if spec["layers"] is not None:
        dinov2_onnx.keep_first_layers(model, spec["layers"])
    record = {"file": str(path), "package": spec["package"], "sha256": digest, "native_image_size": native,
              "image_size": spec["image_size"], "layers": model.config.num_hidden_layers, "onnxruntime_check": check}
    return model, record


def trainable_parameters(model, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``all``: the whole tower; ``blocks``: the transformer blocks only (embeddings and final norm frozen)."""
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or name.startswith("encoder.layer."))
        if param.requires_grad:
            params.append((name, param))
    return params
